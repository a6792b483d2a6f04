"""What the server and the hospitals of a deployment share, without Flower: the run's config and
the checks that it can be deployed.

Both sides load the same config from the same description, the Flower run config's `config`
(`FILE[:VARIANT]`, a config file of configs/, as `--config` takes it) and `overrides`
(space-separated `field=value`, as `--config.field=value` takes them), so that a hospital trains
exactly what the server plans. A relative config path is read from the working directory, or
else from the repository that holds this package.
"""

import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_TYPE_NAMES = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}


class DeployError(ValueError):
    """A setting of the deployment that cannot work, in one line for the person running it."""


def load_config(spec: str, overrides: str = '') -> ml_collections.ConfigDict:
    """The config `spec` names (`FILE[:VARIANT]`) with `overrides` applied ('a.b=1 c=x').

    Raises:
      DeployError: a missing file, an unknown field or a value of the wrong type.
    """
    from ml_collections import config_flags

    if not spec:
        raise DeployError(
            'run config `config` is empty; give a config file, e.g. '
            '--run-config "config=\'configs/chestxray14.py:smoke\'".'
        )
    path, _, variant = spec.partition(':')
    if not os.path.isabs(path) and not os.path.isfile(path):
        path = os.path.join(REPO, path)
    if not os.path.isfile(path):
        raise DeployError(
            f'config={spec!r}: there is no file {spec.partition(":")[0]!r}; give a config file '
            'of configs/ such as configs/chestxray14.py:smoke.'
        )
    parser = config_flags.config_flags.ConfigFileFlagParser('config')
    try:
        config = parser.parse(f'{path}:{variant}' if variant else path)
    except Exception as e:  # the config file's own error, in one line
        raise DeployError(f'config={spec!r}: {str(e).strip().splitlines()[-1]}') from None
    for item in overrides.split():
        field, sep, value = item.partition('=')
        if not sep:
            raise DeployError(f'overrides: {item!r} is not field=value, e.g. num_rounds=3.')
        set_field(config, field, value)
    return config


def set_field(config: ml_collections.ConfigDict, field: str, value: str) -> None:
    """config.<field> (dotted) = `value` (text), converted to the field's type."""
    *parents, leaf = field.split('.')
    node = config
    for name in parents:
        node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise DeployError(
            f'overrides: {field}={value}: there is no config field {field!r}; see '
            'configs/base.py for the fields.'
        )
    current = node[leaf]
    kind = type(current) if current is not None else None
    try:
        if kind is bool or (kind is None and value.lower() in ('true', 'false')):
            if value.lower() not in ('true', 'false', '1', '0'):
                raise ValueError(value)
            converted = value.lower() in ('true', '1')
        elif kind is None:
            converted = value
        else:
            converted = kind(value)
    except ValueError:
        raise DeployError(
            f'overrides: {field}={value}: config.{field} takes {_TYPE_NAMES.get(kind, kind)}, '
            f'not {value!r}.'
        ) from None
    node[leaf] = converted


def deploy_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Why this config cannot run as a deployment (one line each; [] when it can).

    A deployed hospital computes its update alone, so whatever needs the other hospitals inside
    the round, or one process playing all of them, stays in the simulation.
    """
    problems = []
    if config.mode != 'federated':
        problems.append(
            f'config.mode={config.mode!r}: a deployment trains one global model; set '
            "config.mode='federated' (local and centralised baselines are simulation only)."
        )
    if config.compression.kind != 'none':
        problems.append(
            f'config.compression.kind={config.compression.kind!r}: update compression is not '
            "deployed yet; set config.compression.kind='none'."
        )
    if config.dp.mode == 'client':
        problems.append(
            "config.dp.mode='client': client-level DP adds its noise at aggregation, which a "
            "deployment does not do yet; use config.dp.mode='sample' (DP-SGD at each hospital) "
            "or 'none'."
        )
    if (
        config.dp.mode == 'sample'
        and config.dp.target_epsilon > 0
        and not (config.dp.noise_per_hospital)
    ):
        problems.append(
            'config.dp.noise_per_hospital=False: the one sigma of every hospital needs every '
            "hospital's size, which no hospital knows; set config.dp.noise_per_hospital=True "
            '(each hospital calibrates its own sigma to the target).'
        )
    if config.secagg.enabled and config.secagg.dropout_fraction > 0:
        problems.append(
            f'config.secagg.dropout_fraction={config.secagg.dropout_fraction:g}: a deployment '
            'does not simulate dropouts (a hospital that stops answering is one); set '
            'config.secagg.dropout_fraction=0.'
        )
    if config.data.get('train_on', 'hospitals') != 'hospitals':
        problems.append(
            "config.data.train_on='public': pretraining on the public set is simulation only; "
            "set config.data.train_on='hospitals'."
        )
    if config.attack.mode != 'none':
        problems.append(
            f'config.attack.mode={config.attack.mode!r}: the attack simulation plays malicious '
            "hospitals inside the simulation only; set config.attack.mode='none'."
        )
    if config.audit.num_canaries:
        problems.append(
            f'config.audit.num_canaries={config.audit.num_canaries}: the canary audit needs one '
            'process that knows which canaries were trained on; set config.audit.num_canaries=0 '
            '(audit the deployed model with python -m fedjax_med.audit instead).'
        )
    return problems
