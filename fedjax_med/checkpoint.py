"""Orbax checkpoints of everything a resumed run needs.

A checkpoint holds the `ServerState` pytree (parameters, server optimiser state, round, DP clip,
per-hospital state such as error-feedback residuals) and a JSON record of the host state: the
privacy accountant's step counts, the metrics history and the resolved config. Randomness needs
no saving: every draw is derived from (seed, round, hospital, purpose).

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; an unfinished one is ignored on restore.
"""

import copy
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

# Fields that may change between a run and its resumption (they do not change the result of the
# rounds already run). Any other difference is an error: the resumed run would not be the run
# that was checkpointed. num_rounds is fixed too when the DP noise is calibrated from it
# (`noise_calibrated_to_num_rounds`).
RESUMABLE_FIELDS = (
    'num_rounds',
    'eval_every',
    'eval_batch_size',
    'eval_case_metrics',
    'tensorboard',
    'checkpoint_every',
    'checkpoints_to_keep',
    'data.data_dir',
    'data.manual_dir',
    'clients_in_parallel',
    'dp.fast_clipping',
    'audit.confidence',
    'audit.guess_fractions',
)  # how hospitals are scheduled, gradients computed or a run scored, not what they compute


class Checkpointer:
    """Save / restore `(ServerState, host_state: dict)` pairs by round number."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=options,
            item_handlers={
                'state': ocp.StandardCheckpointHandler(),
                'host': ocp.JsonCheckpointHandler(),
            },
        )

    def latest_round(self) -> int | None:
        return self._manager.latest_step()

    def reload(self) -> None:
        """Re-reads which checkpoints exist (after folders were moved out of the directory)."""
        self._manager.reload()

    def save(self, round_index: int, state, host_state: dict) -> None:
        self._manager.save(
            round_index,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state)
            ),
        )
        self._manager.wait_until_finished()

    def restore(self, round_index: int, like_state):
        """Restores into the shapes, dtypes and shardings of `like_state`.

        Per-hospital state (local-mode models, top-k residuals) has a client axis padded to a
        multiple of the device count, so a run resumed on another number of devices finds it
        longer or shorter than stored. Rows past the real hospitals are padding: such a leaf is
        read as stored, cut or extended along the client axis with `like_state`'s (fresh,
        inert) padding rows, and placed as `like_state` is.
        """
        stored = {
            m.name: tuple(m.shape)
            for m in jax.tree.leaves(self._manager.item_metadata(round_index)['state'])
        }
        paths, treedef = jax.tree_util.tree_flatten_with_path(like_state)
        shapes = [stored.get('.'.join(_key_name(k) for k in path), x.shape) for path, x in paths]
        one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = [
            jax.ShapeDtypeStruct(
                shape, x.dtype, sharding=(x.sharding if shape == x.shape else one_device)
            )
            for shape, (_, x) in zip(shapes, paths, strict=True)
        ]
        restored = self._manager.restore(
            round_index,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(jax.tree.unflatten(treedef, abstract)),
                host=ocp.args.JsonRestore(),
            ),
        )
        leaves = [
            x if x.shape == like.shape else _resize_client_axis(x, like)
            for x, (_, like) in zip(jax.tree.leaves(restored['state']), paths, strict=True)
        ]
        return jax.tree.unflatten(treedef, leaves), restored['host']

    def restore_host(self, round_index: int) -> dict:
        """The host state alone (the config check on resume needs no model or data)."""
        return self._manager.restore(
            round_index, args=ocp.args.Composite(host=ocp.args.JsonRestore())
        )['host']

    def restore_arrays(self, round_index: int | None = None):
        """(state as nested dicts of numpy arrays, host_state) without a target (for analysis)."""
        round_index = self.latest_round() if round_index is None else round_index
        # Restore onto one local device, so any device count can read any checkpoint.
        metadata = self._manager.item_metadata(round_index)['state']
        one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), metadata
        )
        restored = self._manager.restore(
            round_index,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()
            ),
        )
        return jax.tree.map(np.asarray, restored['state']), restored['host']

    def close(self) -> None:
        self._manager.close()


# Fields added after checkpoints were first written, with the behaviour a checkpoint that lacks
# them was trained with: such a checkpoint resumes when the config asks for that same behaviour.
ADDED_FIELDS = {
    'dp.fast_clipping': False,
    'data.patch_size': 0,
    'data.patches_per_case': 8,
    'data.tumour_patch_fraction': 0.5,
    'data.synthetic_signal': 1.0,
    'server.trim_fraction': 0.1,
    'model.negative_slope': 0.0,
    'dp.noise_per_hospital': False,
    'data.max_cases': 0,
    'data.brain_slices_only': True,
    'data.empty_slice_stride': 1,
    'data.synthetic_via_tfds': False,
    'data.max_images_per_patient': 4,
    'data.public_fraction': 0.0,
    'data.train_on': 'hospitals',
    'init_from': '',
    'tensorboard': False,
    'audit.num_canaries': 0,
    'audit.hospital': 0,
    'audit.canary': 'noise',
    'audit.confidence': 0.95,
    'audit.guess_fractions': [0.1, 0.2, 0.5],
    'server.krum_byzantine': 1,
    'server.multi_krum_m': 0,
    'server.norm_bound': 1.0,
    'attack.mode': 'none',
    'attack.num_malicious': 0,
    'attack.scale': 10.0,
    'attack.backdoor_fraction': 0.5,
    'attack.backdoor_target': 'Mass',
    'attack.trigger_size': 3,
}


def with_added_fields(saved: dict) -> dict:
    """A saved config (a run's config.json) completed with the ADDED_FIELDS it predates, set to the
    behaviour it ran with, so that code reading today's fields can rebuild its model and data."""
    out = copy.deepcopy(saved)
    for dotted, value in ADDED_FIELDS.items():
        *parents, leaf = dotted.split('.')
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node.setdefault(leaf, value)
    return out


def _inert_fields(config: dict) -> set[str]:
    """Fields that cannot change what a run with this config computes: a difference in them alone
    is no reason to refuse a resume (e.g. how sigma would be calibrated, in a run without one)."""
    return _inert_dp_fields(config) | _inert_defence_fields(config)


def _inert_dp_fields(config: dict) -> set[str]:
    dp = config.get('dp', {})
    # Without canaries, which hospital would hold them and of what kind changes nothing.
    audit = config.get('audit', {})
    inert = set() if audit.get('num_canaries', 0) else {'audit.hospital', 'audit.canary'}
    if dp.get('mode', 'none') == 'none':
        # Without DP no noise is drawn: a leftover target or multiplier changes nothing (and
        # today's validation asks for them to be 0, which must not block the resume).
        return inert | {'dp.noise_per_hospital', 'dp.target_epsilon', 'dp.noise_multiplier'}
    if dp.get('mode') == 'sample' and dp.get('target_epsilon', 0) > 0:
        return inert
    return inert | {'dp.noise_per_hospital'}


def _inert_defence_fields(config: dict) -> set[str]:
    """The options of an aggregator the run does not use, and of the attack simulation when off."""
    aggregator = config.get('server', {}).get('aggregator', 'weighted')
    inert = set()
    if aggregator not in ('krum', 'multi_krum'):
        inert |= {'server.krum_byzantine', 'server.multi_krum_m'}
    if aggregator == 'krum':
        inert.add('server.multi_krum_m')
    if aggregator != 'norm_bound':
        inert.add('server.norm_bound')
    if config.get('attack', {}).get('mode', 'none') == 'none':
        inert |= {f'attack.{f}' for f in ('scale', 'backdoor_fraction', 'backdoor_target')}
        inert.add('attack.trigger_size')
    return inert


def noise_calibrated_to_num_rounds(config: dict) -> bool:
    """Whether the run's DP noise is calibrated from num_rounds (privacy/plan.py: DP on with
    dp.target_epsilon > 0; otherwise dp.noise_multiplier is used as given)."""
    dp = config.get('dp', {})
    return dp.get('mode', 'none') != 'none' and dp.get('target_epsilon', 0) > 0


def config_differences(saved: dict, current: dict) -> list[str]:
    """Config fields whose values differ, each as 'name: checkpoint has a, config has b', ignoring
    RESUMABLE_FIELDS and fields inert in both runs; a field the checkpoint predates counts as its
    ADDED_FIELDS value. num_rounds counts, with the reason, when the saved run's noise was
    calibrated from it."""
    ignore = set(RESUMABLE_FIELDS) | (_inert_fields(saved) & _inert_fields(current))
    diffs = _differences(saved, current, '', ignore)
    old, new = saved.get('num_rounds'), current.get('num_rounds')
    if old != new and noise_calibrated_to_num_rounds(saved):
        # The resumed run would recalibrate the noise for `new` rounds, while the rounds already
        # run used the noise for `old`: the accounted epsilon would be wrong.
        diffs.insert(
            0,
            (
                f'num_rounds: checkpoint has {old!r}, config has {new!r}. The DP noise is '
                'calibrated to num_rounds '
                f'(config.dp.target_epsilon={saved["dp"]["target_epsilon"]})'
                f' and the rounds already run used the noise for {old} rounds, so another '
                'num_rounds would change the noise mid-run and misreport epsilon. Keep '
                f'--config.num_rounds={old}, or start a new --workdir.'
            ),
        )
    return diffs


def _differences(saved: dict, current: dict, prefix: str, ignore: set[str]) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        name = f'{prefix}{key}'
        b = current.get(key)
        # A whole section the checkpoint predates (e.g. audit) counts as empty: its fields then
        # take their ADDED_FIELDS values one by one.
        a = saved.get(key, ADDED_FIELDS.get(name, {} if isinstance(b, dict) else None))
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, name + '.', ignore)
        elif a != b and name not in ignore:
            diffs.append(f'{name}: checkpoint has {a!r}, config has {b!r}')
    return diffs


def _key_name(key) -> str:
    """One step of a pytree path as Orbax names it in a checkpoint ('params', '0', ...)."""
    for attr in ('name', 'key', 'idx'):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _resize_client_axis(stored: jax.Array, like: jax.Array) -> jax.Array:
    """`stored` cut or extended along its leading (client) axis to `like`'s length, new rows
    taken from `like`, placed with `like`'s sharding; any other mismatch is an error."""
    if stored.shape[1:] != like.shape[1:] or stored.ndim == 0:
        raise ValueError(
            f"Checkpoint array of shape {stored.shape} does not fit this run's "
            f'{like.shape}: the checkpoint is of a different model or data.'
        )
    n = min(stored.shape[0], like.shape[0])
    rows = np.concatenate([np.asarray(stored)[:n], np.asarray(like)[n:]], axis=0)
    return jax.device_put(rows.astype(like.dtype), like.sharding)


def load_params(source: str, like_params):
    """The global model parameters of another run's latest checkpoint, as numpy arrays with the
    structure of `like_params` (a warm start: `config.init_from`).

    `source` is that run's workdir or its checkpoints/ folder. A local-mode run has one model per
    hospital and cannot serve; a model of another shape is refused, naming the first mismatch.
    Returns (params, round of the checkpoint, the source run's config).
    """
    path = os.path.expanduser(source)
    if os.path.isdir(os.path.join(path, 'checkpoints')):
        path = os.path.join(path, 'checkpoints')
    checkpointer = Checkpointer(path)
    try:
        latest = checkpointer.latest_round()
        if latest is None:
            raise ValueError(
                f'config.init_from={source!r}: no checkpoint in {path}; give the '
                'workdir of a run that has saved at least one round.'
            )
        state, host = checkpointer.restore_arrays(latest)
    finally:
        checkpointer.close()
    like = jax.tree_util.tree_flatten_with_path(like_params)[0]
    stored = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(state['params'])[0]
    }
    leaves = []
    for key, x in like:
        name = jax.tree_util.keystr(key)
        value = stored.get(name)
        if value is None or value.shape != x.shape:
            found = 'missing' if value is None else f'shape {value.shape}'
            raise ValueError(
                f'config.init_from={source!r}: parameter {name} is {found} there but '
                f'{x.shape} in this model; warm-start from a run of the same '
                'config.model (and not a local-mode run, which keeps one model per '
                'hospital).'
            )
        leaves.append(np.asarray(value, x.dtype))
    params = jax.tree.unflatten(jax.tree.structure(like_params), leaves)
    return params, latest, host.get('config', {})
