"""Start-up validation of a config: one clear message per problem, naming field, value and fix.

Everything that can be checked before data is loaded or anything is compiled is checked here, so
a bad run fails in a second rather than after an hour.
"""

import difflib
import math
import os

import ml_collections

from fedjax_med import attacks
from fedjax_med.aggregation import registry
from fedjax_med.aggregation.compression import KINDS as COMPRESSION_KINDS
from fedjax_med.aggregation.server_opt import SERVER_OPTIMIZERS
from fedjax_med.client import CLIENT_OPTIMIZERS
from fedjax_med.data.canaries import KINDS as CANARY_KINDS
from fedjax_med.data.nih_metadata import CXR_LABELS
from fedjax_med.data.partition import STRATEGIES as PARTITIONS
from fedjax_med.data.registry import BRATS_VERSIONS, DATASETS, SYNTHETIC, TASK_OF
from fedjax_med.models import COMPUTE_DTYPES, MODELS
from fedjax_med.tasks import TASKS

# The accepted values of each choice field. Most are read from the module that implements them.
CHOICES = {
    'task': tuple(TASKS),
    'mode': ('federated', 'centralized', 'local'),
    'data.name': DATASETS,
    'data.partition': PARTITIONS,
    'model.name': tuple(MODELS),
    'model.compute_dtype': tuple(COMPUTE_DTYPES),
    'local.optimizer': tuple(CLIENT_OPTIMIZERS),
    'local.schedule': ('constant', 'cosine', 'exponential'),
    'local.sampling': ('shuffle', 'poisson'),
    'server.optimizer': SERVER_OPTIMIZERS,
    # A live view of the registry: an aggregator registered later is valid too.
    'server.aggregator': registry.AGGREGATORS.keys(),
    'dp.mode': ('none', 'sample', 'client'),
    'dp.accountant': ('rdp', 'pld'),
    'compression.kind': COMPRESSION_KINDS,
    'compression.broadcast_dtype': ('float32', 'bfloat16'),
    'attack.mode': attacks.MODES,
}
POSITIVE = (
    'num_rounds',
    'local.unroll_steps',
    'data.resolution',
    'data.num_clients',
    'local.batch_size',
    'local.epochs',
    'local.learning_rate',
    'eval_every',
    'eval_batch_size',
    'checkpoint_every',
    'checkpoints_to_keep',
    'model.width',
    'model.depth',
    'data.patches_per_case',
    'data.slices_per_case',
    'data.dirichlet_alpha',
    'data.findings_per_client',
    'data.empty_slice_stride',
    'server.learning_rate',
    'server.epsilon',
    'local.decay_rate',
    'dp.clip_learning_rate',
)
NON_NEGATIVE = (
    'clients_per_round',
    'clients_in_parallel',
    'local.prox_mu',
    'data.patch_size',
    'data.quantity_sigma',
    'data.max_cases',
    'dp.noise_multiplier',
    'dp.target_epsilon',
    'dp.chunk_size',
    'secagg.dropout_fraction',
    'secagg.threshold',
    'secagg.neighbours',
    'dp.count_noise_std',
    'server.krum_byzantine',
    'server.multi_krum_m',
    'attack.num_malicious',
)
# Fields checked against a range: (test, message after 'config.FIELD=VALUE '). NaN fails every
# test; a value that is not finite is reported once, by the finiteness check.
RANGES = {
    'local.momentum': (
        lambda v: 0 <= v < 1,
        "must be in [0, 1) (the momentum optimiser's decay); e.g. 0.9.",
    ),
    'server.momentum': (
        lambda v: 0 <= v < 1,
        "must be in [0, 1) (fedavgm's server momentum); e.g. 0.9.",
    ),
    'server.beta1': (lambda v: 0 <= v < 1, 'must be in [0, 1) (fedadam / fedyogi); e.g. 0.9.'),
    'server.beta2': (lambda v: 0 <= v < 1, 'must be in [0, 1) (fedadam / fedyogi); e.g. 0.99.'),
    'dp.target_quantile': (
        lambda v: 0 < v < 1,
        'must be in (0, 1) (the fraction of hospital '
        'updates adaptive clipping aims to leave unclipped); e.g. 0.5.',
    ),
    'dp.delta': (
        lambda v: 0 <= v < 1,
        'must be in [0, 1) (0 means 1 / (10 n) per hospital); e.g. 1e-5.',
    ),
    'compression.bits': (
        lambda v: v == int(v) and 1 <= v <= 24,
        'must be an integer in 1..24 (bits per coordinate of a quantised update); e.g. 8.',
    ),
    'compression.topk_fraction': (
        lambda v: 0 < v <= 1,
        'must be in (0, 1] (the fraction of coordinates top-k sends); e.g. 0.01.',
    ),
    'secagg.clip': (
        lambda v: v > 0,
        'must be > 0 (the per-coordinate clip of the fixed-point encoding); e.g. 1.0.',
    ),
    'server.norm_bound': (
        lambda v: v > 0,
        "must be > 0 (the L2 norm norm_bound clips each hospital's update to); e.g. 1.0.",
    ),
    'attack.scale': (
        lambda v: v > 0,
        'must be > 0 (scale sends scale x the update, sign_flip -scale x the update); e.g. 10.',
    ),
    'attack.backdoor_fraction': (
        lambda v: 0 < v <= 1,
        'must be in (0, 1] (the fraction of each malicious batch stamped with the trigger); '
        'e.g. 0.5.',
    ),
}
# Numeric fields for which infinity means something (no count release); NaN never does.
MAY_BE_INFINITE = ('dp.count_noise_std',)


class ConfigError(ValueError):
    """A config that cannot run. `problems` holds one message per problem, each naming the field,
    its value and the fix; str() lists them all (a ValueError, so existing callers still catch it).
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__('Invalid configuration:\n  - ' + '\n  - '.join(self.problems))


def _did_you_mean(value, allowed) -> str:
    """' Did you mean 'x'?' for a string close to one of `allowed` (case first), else ''."""
    if not isinstance(value, str):
        return ''
    names = [a for a in allowed if isinstance(a, str)]
    same_case = [a for a in names if a.lower() == value.lower()]
    close = same_case or difflib.get_close_matches(value, names, n=1)
    return f' Did you mean {close[0]!r}?' if close else ''


def field_names(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
    """Dotted names of every leaf field of `config` ('data.num_clients', ...)."""
    names = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            names += field_names(value, f'{prefix}{key}.')
        else:
            names.append(f'{prefix}{key}')
    return names


def unknown_field_problem(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    """The problem with overriding `config.<dotted>` when that field does not exist (None when it
    does), with the closest field names as suggestions."""
    node = config
    for part in dotted.split('.'):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            break
        node = node[part]
    else:
        return None
    names = field_names(config)
    leaf = dotted.rsplit('.', 1)[-1]
    same_leaf = [n for n in names if n.rsplit('.', 1)[-1] == leaf]
    close = list(dict.fromkeys(same_leaf + difflib.get_close_matches(dotted, names, n=3)))[:3]
    hint = f' Did you mean {" or ".join(f"--config.{n}" for n in close)}?' if close else ''
    return (
        f'--config.{dotted}: config has no field {dotted!r}.{hint} Every field is listed, '
        'with a comment, in configs/base.py.'
    )


def _nonfinite_problems(config: ml_collections.ConfigDict) -> tuple[list[str], set[str]]:
    """(one problem per float field that is NaN or infinite, the set of those fields)."""
    problems, fields = [], set()
    for field in field_names(config):
        value = _get(config, field)
        if not isinstance(value, float) or math.isfinite(value):
            continue
        if field in MAY_BE_INFINITE and not math.isnan(value):
            continue
        fields.add(field)
        rule = (
            '> 0'
            if field in POSITIVE
            else '>= 0'
            if field in NON_NEGATIVE
            else RANGES[field][1].split(' (')[0].removeprefix('must be ')
            if field in RANGES
            else ''
        )
        problems.append(
            f'config.{field}={value!r} must be a finite number' + (f' {rule}' if rule else '') + '.'
        )
    return problems, fields


def _get(config, dotted):
    value = config
    for part in dotted.split('.'):
        value = value[part]
    return value


def _patch_problems(config: ml_collections.ConfigDict) -> list[str]:
    """2-D slices or 3-D patches: what the U-Net sees must halve cleanly at every level."""
    data, problems = config.data, []
    levels = 2 ** (config.model.depth - 1)
    patch = data.patch_size
    if patch <= 0:
        if config.model.name == 'unet' and data.resolution % levels:
            problems.append(
                f'config.data.resolution={data.resolution} must be divisible by '
                f'2**(model.depth-1)={levels} for the U-Net.'
            )
        return problems
    if config.task != 'brats':
        problems.append(
            f'config.data.patch_size={patch} cuts 3-D patches from BraTS volumes; '
            f'config.task={config.task!r} has none. Set config.data.patch_size=0.'
        )
    if config.model.name != 'unet':
        problems.append(
            f'config.data.patch_size={patch} needs the 3-D-capable U-Net; set '
            f"config.model.name='unet' (got {config.model.name!r})."
        )
    if patch % levels:
        problems.append(
            f'config.data.patch_size={patch} must be a multiple of '
            f'2**(model.depth-1)={levels} for the U-Net; use e.g. '
            f'{max(levels, patch // levels * levels)}.'
        )
    if patch > data.resolution:
        problems.append(
            f'config.data.patch_size={patch} exceeds the volume size '
            f'config.data.resolution={data.resolution}; use a patch_size <= '
            f'{data.resolution} or a larger resolution.'
        )
    if not 0.0 <= data.tumour_patch_fraction <= 1.0:
        problems.append(
            f'config.data.tumour_patch_fraction={data.tumour_patch_fraction} must be in [0, 1].'
        )
    return problems


def _aggregator_problems(config: ml_collections.ConfigDict) -> list[str]:
    """An aggregator other than the weighted mean (e.g. a robust one, which sorts each hospital's
    update) needs the updates in the clear and un-noised (`registry.AggregatorSpec`); without a
    federation (centralized, local) the aggregator is never used."""
    sc, problems = config.server, []
    if not 0.0 <= sc.trim_fraction < 0.5:
        problems.append(
            f'config.server.trim_fraction={sc.trim_fraction!r} must be in [0, 0.5) '
            '(the fraction dropped from each end of every coordinate); e.g. 0.1.'
        )
    spec = registry.AGGREGATORS.get(sc.aggregator)
    if config.mode != 'federated' or spec is None:
        return problems
    problems += _krum_problems(config)
    if sc.aggregator == 'norm_bound' and config.dp.mode == 'client':
        problems.append(
            "config.server.aggregator='norm_bound' is redundant under config.dp.mode='client': "
            "client-level DP already clips every hospital's update, to config.dp.clip_norm="
            f"{config.dp.clip_norm!r}. Use config.server.aggregator='weighted' and set the "
            'bound with config.dp.clip_norm.'
        )
    if not spec.needs_clear_updates:
        return problems
    if config.secagg.enabled:
        problems.append(
            f"config.server.aggregator={sc.aggregator!r} needs each hospital's update "
            'in the clear, but config.secagg.enabled=True shows the server only their '
            "sum. Use config.server.aggregator='weighted' or 'uniform' with secure "
            'aggregation, or set config.secagg.enabled=False.'
        )
    if config.dp.mode == 'client':
        problems.append(
            f'config.server.aggregator={sc.aggregator!r} cannot run under '
            "config.dp.mode='client': client-level DP noises the sum of clipped "
            'updates and the privacy accounting covers only that noised sum. Use '
            "config.server.aggregator='weighted' or 'uniform' with client-level DP, "
            "or config.dp.mode='sample' or 'none' with this aggregator."
        )
    return problems


def _cohort(config: ml_collections.ConfigDict) -> tuple[int, str]:
    """(the hospitals taking part in every round, that cohort in words for messages)."""
    k, per_round = config.data.num_clients, config.clients_per_round
    if 0 < per_round < k:
        return per_round, f'config.clients_per_round={per_round} hospitals take part a round'
    return k, f'all config.data.num_clients={k} hospitals take part every round'


def _krum_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Krum's cohort: n > 2f + 2 (Blanchard et al. 2017); multi-Krum averages at most n - f."""
    sc, problems = config.server, []
    if sc.aggregator not in ('krum', 'multi_krum') or sc.krum_byzantine < 0:
        return problems  # a negative f is reported as such
    f, (n, cohort) = sc.krum_byzantine, _cohort(config)
    if n < 2 * f + 3:
        fix = (
            f'lower config.server.krum_byzantine to at most {(n - 3) // 2}'
            if n >= 3
            else 'use at least 3 hospitals per round'
        )
        problems.append(
            f'config.server.krum_byzantine={f} needs at least 2f + 3 = {2 * f + 3} hospitals '
            f'per round (Krum withstands f Byzantine hospitals when 2f + 2 < n), but {cohort}. '
            f'{fix[:1].upper()}{fix[1:]}, or take more hospitals per round.'
        )
    elif sc.aggregator == 'multi_krum' and sc.multi_krum_m > n - f:
        problems.append(
            f'config.server.multi_krum_m={sc.multi_krum_m} exceeds the {n - f} updates '
            f'multi-Krum may average ({cohort}, minus config.server.krum_byzantine={f}). Use '
            f'1..{n - f}, or 0 for {n - f}.'
        )
    return problems


def _attack_problems(config: ml_collections.ConfigDict, unknown: set[str]) -> list[str]:
    """The attack simulation (attacks.py): who attacks, and what the mode needs."""
    a, problems = config.attack, []
    if 'attack.mode' in unknown:
        return problems
    if a.mode == 'none':
        if a.num_malicious > 0:
            problems.append(
                f'config.attack.num_malicious={a.num_malicious} would be ignored: '
                "config.attack.mode='none' simulates no attack. Set config.attack.mode to one of "
                f'{", ".join(map(repr, attacks.MODES[1:]))}, or config.attack.num_malicious=0.'
            )
        return problems
    if config.mode != 'federated':
        problems.append(
            f'config.attack.mode={a.mode!r} simulates malicious hospitals of a federation; it '
            f"has no meaning with config.mode={config.mode!r}. Set config.mode='federated' or "
            "config.attack.mode='none'."
        )
    k = config.data.num_clients
    if k > 0 and a.num_malicious >= k:
        problems.append(
            f'config.attack.num_malicious={a.num_malicious} leaves no honest hospital among '
            f'config.data.num_clients={k}; use at most {k - 1}.'
        )
    if a.mode != 'backdoor':
        return problems
    if config.task != 'chestxray14':
        problems.append(
            "config.attack.mode='backdoor' stamps a trigger on chest X-rays and sets a finding "
            f'on; it is not implemented for config.task={config.task!r}. Use '
            "config.attack.mode='label_flip', 'sign_flip' or 'scale'."
        )
        return problems
    if a.backdoor_target not in CXR_LABELS:
        problems.append(
            f'config.attack.backdoor_target={a.backdoor_target!r} is not a chest X-ray finding; '
            f'use one of {", ".join(map(repr, CXR_LABELS))}.'
            f'{_did_you_mean(a.backdoor_target, CXR_LABELS)}'
        )
    if not 1 <= a.trigger_size <= config.data.resolution:
        problems.append(
            f'config.attack.trigger_size={a.trigger_size!r} must be in 1..'
            f'config.data.resolution={config.data.resolution} (the side of the trigger square, '
            'in pixels); e.g. 3.'
        )
    return problems


# Long on purpose: one flat list of data checks, a few lines each, so that every data problem of
# a config is reported at once.
def _data_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Data fields that would otherwise fail deep in the readers, or be silently ignored."""
    data, problems = config.data, []
    if data.name in SYNTHETIC:
        if not data.num_train > 0:
            problems.append(
                f'config.data.num_train={data.num_train!r} must be > 0: the synthetic '
                'twin generates num_train training examples over all hospitals '
                f'(plus num_test={data.num_test!r} for testing); e.g. 2000.'
            )
        if not data.num_test > 0:
            problems.append(
                f'config.data.num_test={data.num_test!r} must be > 0: without test '
                'examples every evaluation is empty (metrics NaN); e.g. 500.'
            )
    if (
        config.task == 'brats'
        and data.partition == 'pathological'
        and data.findings_per_client >= 3
    ):
        # BraTS cases are classed by tumour-size tertile (data/sources.py): 3 classes.
        problems.append(
            f'config.data.findings_per_client={data.findings_per_client} with '
            "config.data.partition='pathological' gives every BraTS hospital all 3 "
            'tumour-size classes, which is an IID split. Set '
            'config.data.findings_per_client=1 or 2.'
        )
    if not 0 <= data.test_fraction < 1:
        problems.append(
            f'config.data.test_fraction={data.test_fraction!r} must be in [0, 1) (the '
            "fraction of each hospital's patients held out for testing); e.g. 0.2."
        )
    # Options of the BraTS TFDS readers (tfds_io.load_arrays, brats.BratsConfig).
    via_tfds = data.name in BRATS_VERSIONS or (
        data.name == 'synthetic_brats' and data.synthetic_via_tfds
    )
    if data.max_cases > 0 and not via_tfds:
        problems.append(
            f'config.data.max_cases={data.max_cases} subsets BraTS cases read through '
            f'TFDS; it has no effect with config.data.name={data.name!r}'
            + (
                ' unless config.data.synthetic_via_tfds=True'
                if data.name == 'synthetic_brats'
                else ''
            )
            + '. Set config.data.max_cases=0'
            + (' (or lower config.data.num_train).' if data.name == 'synthetic_brats' else '.')
        )
    builder_options = [
        f'config.data.{f}={data[f]!r}'
        for f, changed in (
            ('brain_slices_only', not data.brain_slices_only),
            ('empty_slice_stride', data.empty_slice_stride > 1),
        )
        if changed
    ]
    if builder_options and data.name not in BRATS_VERSIONS:
        problems.append(
            f'{" and ".join(builder_options)}: options of the real BraTS builder '
            f'({", ".join(BRATS_VERSIONS)}); they have no effect with '
            f'config.data.name={data.name!r}. Leave them at their defaults '
            '(brain_slices_only=True, empty_slice_stride=1).'
        )
    if data.empty_slice_stride > 1 and data.patch_size > 0:
        problems.append(
            f'config.data.empty_slice_stride={data.empty_slice_stride} thins 2-D '
            f'slices, but config.data.patch_size={data.patch_size} reads 3-D volumes, '
            'which keep every slice (patches oversample tumour instead, '
            'config.data.tumour_patch_fraction). Set config.data.empty_slice_stride=1.'
        )
    return problems


def _dp_problems(config: ml_collections.ConfigDict, unknown: set[str]) -> list[str]:
    dp, problems = config.dp, []
    if 'dp.mode' in unknown:  # already reported; its other checks would only repeat it
        return problems
    if dp.mode == 'none':
        ignored = [
            f'config.dp.{f}={dp[f]!r}' for f in ('noise_multiplier', 'target_epsilon') if dp[f] > 0
        ]
        if ignored:
            problems.append(
                f"{' and '.join(ignored)} would be ignored: config.dp.mode='none' "
                "trains without differential privacy. Set config.dp.mode='sample' "
                "(DP-SGD in each hospital, with config.local.sampling='poisson') or "
                "'client' (DP-FedAvg) to train privately, or set "
                f'{" and ".join(i.split("=")[0] + "=0" for i in ignored)} '
                'to train without DP.'
            )
        return problems
    if dp.mode == 'sample' and dp.adaptive_clip:
        problems.append(
            'config.dp.adaptive_clip=True adapts the clip norm of hospital updates '
            "(dp.mode='client'); DP-SGD (dp.mode='sample') clips examples at the fixed "
            'config.dp.clip_norm. Set config.dp.adaptive_clip=False.'
        )
    if dp.mode == 'sample' and config.local.sampling != 'poisson':
        problems.append(
            "config.dp.mode='sample' needs config.local.sampling='poisson' (the "
            'privacy accounting assumes Poisson subsampling); set it.'
        )
    if dp.noise_multiplier == 0 and dp.target_epsilon == 0:
        problems.append(
            f'config.dp.mode={dp.mode!r} needs config.dp.noise_multiplier > 0 or '
            'config.dp.target_epsilon > 0.'
        )
    if not dp.clip_norm > 0:
        problems.append(f'config.dp.clip_norm={dp.clip_norm!r} must be > 0.')
    if dp.mode == 'client' and config.mode != 'federated':
        problems.append(
            f"config.dp.mode='client' protects hospitals in a federation; it has no "
            f"meaning with config.mode={config.mode!r}. Use dp.mode='sample'."
        )
    return problems


def _public_data_problems(config: ml_collections.ConfigDict) -> list[str]:
    """The public (pretraining) split and warm starts from another run's parameters."""
    data, problems = config.data, []
    fraction = data.get('public_fraction', 0.0)
    if not 0 <= fraction < 1:
        problems.append(
            f'config.data.public_fraction={fraction!r} must be in [0, 1): the '
            'fraction of patients held out of every hospital as a public set.'
        )
    train_on = data.get('train_on', 'hospitals')
    if train_on not in ('hospitals', 'public'):
        problems.append(
            f"config.data.train_on={train_on!r} is not known; use 'hospitals' or 'public'."
        )
    elif train_on == 'public':
        if not fraction > 0:
            problems.append(
                "config.data.train_on='public' needs a public set: set "
                'config.data.public_fraction > 0 (e.g. 0.1).'
            )
        if config.mode != 'centralized':
            problems.append(
                f"config.data.train_on='public' trains one model on the public set; "
                f"set config.mode='centralized' (got {config.mode!r})."
            )
    if data.get('max_images_per_patient', 4) < 0:
        problems.append(
            f'config.data.max_images_per_patient={data.max_images_per_patient!r} '
            'must be >= 0 (0 = every image of a patient).'
        )
    init_from = config.get('init_from', '')
    if init_from:
        path = os.path.expanduser(init_from)
        if not os.path.isdir(path):  # a workdir, or its checkpoints/ folder
            problems.append(
                f'config.init_from={init_from!r} is not a folder; give the workdir '
                'of a finished run (or its checkpoints/ folder).'
            )
    return problems


def _audit_problems(config: ml_collections.ConfigDict) -> list[str]:
    """The one-run privacy audit (`config.audit`, data/canaries.py); nothing while it is off."""
    audit = config.get('audit')
    if audit is None:
        return []
    m, problems = audit.num_canaries, []
    if not (isinstance(m, int) and m >= 0):
        return [f'config.audit.num_canaries={m!r} must be an integer >= 0 (0 = no audit).']
    if m == 0:
        return []
    if m < 2:
        problems.append(
            f'config.audit.num_canaries={m} is too few to guess on; use at least 2 (a '
            'useful audit needs hundreds, e.g. 200).'
        )
    k = config.data.num_clients
    if not (isinstance(audit.hospital, int) and 0 <= audit.hospital < k):
        problems.append(
            f'config.audit.hospital={audit.hospital!r} must be a hospital index in 0..{k - 1} '
            f'(config.data.num_clients={k}).'
        )
    if audit.canary not in CANARY_KINDS:
        problems.append(
            f'config.audit.canary={audit.canary!r} is not known; use one of '
            f'{", ".join(map(repr, CANARY_KINDS))}.{_did_you_mean(audit.canary, CANARY_KINDS)}'
        )
    if not 0 < audit.confidence < 1:
        problems.append(
            f'config.audit.confidence={audit.confidence!r} must be in (0, 1); e.g. 0.95.'
        )
    fractions = audit.guess_fractions
    if not (
        isinstance(fractions, tuple | list) and fractions and all(0 < f <= 1 for f in fractions)
    ):
        problems.append(
            f'config.audit.guess_fractions={fractions!r} must be a non-empty list of '
            'fractions in (0, 1] of the canaries to guess on; e.g. (0.1, 0.2, 0.5).'
        )
    if config.dp.mode == 'client':
        problems.append(
            'config.audit.num_canaries > 0 audits the example-level guarantee; under '
            "config.dp.mode='client' the accountant's epsilon protects whole hospitals, which "
            "one hospital's canaries do not test. Use config.dp.mode='sample' or 'none', or "
            'config.audit.num_canaries=0.'
        )
    if config.data.get('train_on', 'hospitals') == 'public':
        problems.append(
            'config.audit.num_canaries > 0 plants canaries in a hospital, but '
            "config.data.train_on='public' trains on the public set only. Set "
            'config.audit.num_canaries=0.'
        )
    return problems


def _secagg_graph(m: int, neighbours: int, threshold: int) -> tuple[int | None, int, int]:
    """(SecAgg+ degree k, or None for the complete graph; each hospital's number of neighbours;
    the Shamir threshold t) for a cohort of m, as `secagg_protocol.run_protocol` sets them."""
    k = neighbours if 0 < neighbours < m - 1 else None
    degree = m - 1 if k is None else k
    return k, degree, threshold or degree // 2 + 1


def _secagg_failure(m: int, neighbours: int, threshold: int, dropped: int) -> str | None:
    """Why `secagg_protocol.run_protocol` can fail for a cohort of m with `dropped` of them
    dropping (None if it never does): a short reason, for the messages and for searching fixes."""
    k, degree, t = _secagg_graph(m, neighbours, threshold)
    if k is not None and m * k % 2:
        return 'parity'
    if t > degree:
        return 'threshold'
    # A surviving hospital keeps degree - (its dropped neighbours) answering neighbours, at worst
    # degree - dropped (all of them its neighbours; always so in the complete graph).
    if degree - min(dropped, degree) < t:
        return 'dropout'
    return None


# Long on purpose: the protocol's feasibility rules (threshold, neighbours, dropouts) depend on
# each other and are checked in the order the protocol would meet them.
def _secagg_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Settings with which `secagg_protocol.run_protocol` would stop the run in some round."""
    sa, num_clients, per_round = config.secagg, config.data.num_clients, config.clients_per_round
    if not (
        num_clients > 0
        and 0 <= per_round <= num_clients
        and 0 <= sa.dropout_fraction < 1
        and sa.threshold >= 0
        and sa.neighbours >= 0
    ):
        return []  # already reported
    m = per_round if 0 < per_round < num_clients else num_clients
    cohort = (
        f'config.clients_per_round={m} hospitals per round'
        if 0 < per_round < num_clients
        else f'all config.data.num_clients={m} hospitals in every round'
    )
    if m < 2:
        why, fix = (
            ('config.data.num_clients=1', 'config.data.num_clients >= 2')
            if num_clients < 2
            else ('config.clients_per_round=1', 'config.clients_per_round >= 2 (0 = all)')
        )
        return [
            f'config.secagg.enabled=True needs at least 2 hospitals per round (the sum of one '
            f"hospital's update is that update), but {why}. Set {fix}, or "
            'config.secagg.enabled=False.'
        ]
    dropped = math.floor(sa.dropout_fraction * m)
    failure = _secagg_failure(m, sa.neighbours, sa.threshold, dropped)
    if failure is None:
        return []
    k, degree, t = _secagg_graph(m, sa.neighbours, sa.threshold)
    t_text = (
        f'config.secagg.threshold={t}'
        if sa.threshold
        else f't={t} (config.secagg.threshold=0: a majority of {degree})'
    )
    if failure == 'parity':
        even = [c for c in (k - 1, k + 1) if c >= 2 and not m * c % 2]
        return [
            f'config.secagg.neighbours={k} is odd and so is the cohort ({cohort}): no '
            f'{k}-regular neighbour graph on {m} hospitals exists (SecAgg+ needs an even '
            f'number of hospitals times neighbours). Use an even config.secagg.neighbours '
            f'({" or ".join(map(str, even))}) or 0 for the complete graph.'
        ]
    graph = (
        f'its config.secagg.neighbours={k} neighbours'
        if k is not None
        else f'the other {degree} hospitals of its round (complete graph)'
    )
    if failure == 'threshold':
        return [
            f'config.secagg.threshold={t} exceeds the {degree} hospitals each one shares its '
            f'secrets with ({graph}); use a threshold in [1, {degree}], or 0 for the default '
            f'majority ({degree // 2 + 1}).'
        ]
    # failure == 'dropout'. Fixes that each change one field.
    fixes = []
    good_k = [c for c in range(1, m - 1) if not _secagg_failure(m, c, sa.threshold, dropped)]
    complete_ok = not _secagg_failure(m, 0, sa.threshold, dropped)
    if k is not None and good_k:
        fixes.append(
            f'raise config.secagg.neighbours to at least {min(good_k)}'
            + (' (or 0 for the complete graph)' if complete_ok else '')
        )
    elif k is not None and complete_ok:
        fixes.append('set config.secagg.neighbours=0 (complete graph)')
    if degree - dropped >= 1:
        fixes.append(
            f'lower config.secagg.threshold to at most {degree - dropped} (weaker '
            'against colluding hospitals)'
        )
    survivable = degree - t  # dropouts per round that this graph and threshold survive
    if survivable >= 0:
        fixes.append(
            f'lower config.secagg.dropout_fraction below {(survivable + 1) / m:.3g} '
            f'(at most {survivable} of {m} dropping)'
        )
    fix = '; or '.join(fixes)
    when = (
        f'when all {dropped} dropped are among them, only {degree - min(dropped, degree)} answer'
        if k is not None
        else f'only {degree - dropped} answer'
    )
    stops = (
        'that round cannot remove the masks and stops the run'
        if k is not None
        else 'so no round can remove the masks and the run stops in its first round'
    )
    return [
        f'config.secagg.dropout_fraction={sa.dropout_fraction!r} drops {dropped} of the {m} '
        f'hospitals of each round. Each hospital shares its secrets with {graph}; {when} the '
        f'unmasking, fewer than the Shamir threshold {t_text}: {stops}. '
        f'{fix[:1].upper()}{fix[1:]}.'
    ]


# Long on purpose: one flat list of checks, a few lines each, so that every problem of a config
# is reported at once.
def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError (a ValueError) with one message per problem found (all at once)."""
    problems, nonfinite = _nonfinite_problems(config)
    unknown = set()
    for field, allowed in CHOICES.items():
        value = _get(config, field)
        if value not in allowed:
            unknown.add(field)
            problems.append(
                f'config.{field}={value!r} is not known; use one of '
                f'{", ".join(map(repr, allowed))}.{_did_you_mean(value, allowed)}'
            )
    for field in POSITIVE:
        if not _get(config, field) > 0:
            problems.append(f'config.{field}={_get(config, field)!r} must be > 0.')
    for field in NON_NEGATIVE:
        if not _get(config, field) >= 0:
            problems.append(f'config.{field}={_get(config, field)!r} must be >= 0.')
    for field, (ok, rule) in RANGES.items():
        if not ok(_get(config, field)):
            problems.append(f'config.{field}={_get(config, field)!r} {rule}')
    k = config.data.num_clients
    if config.clients_per_round > k:
        problems.append(
            f'config.clients_per_round={config.clients_per_round} exceeds '
            f'config.data.num_clients={k}; use at most {k} (0 means all).'
        )
    task = TASK_OF.get(config.data.name)
    if task and task != config.task and 'task' not in unknown:
        problems.append(
            f'config.data.name={config.data.name!r} is {task} data but '
            f'config.task={config.task!r}; set config.task={task!r}.'
        )
    if config.task == 'brats' and config.model.name != 'unet' and 'model.name' not in unknown:
        problems.append(
            f"config.model.name={config.model.name!r} cannot segment; use 'unet' "
            "for config.task='brats'."
        )
    if config.task == 'chestxray14' and config.model.name == 'unet':
        problems.append(
            "config.model.name='unet' is a segmentation model; use 'resnet18' or "
            "'resnet_small' for config.task='chestxray14'."
        )
    if not 0 <= config.model.negative_slope < 1:
        problems.append(
            f'config.model.negative_slope={config.model.negative_slope!r} must be in '
            '[0, 1): 0 is ReLU, 0.01-0.2 the usual leaky ReLUs.'
        )
    problems += _patch_problems(config)
    problems += _aggregator_problems(config)
    problems += _data_problems(config)
    problems += _dp_problems(config, unknown)
    problems += _public_data_problems(config)
    problems += _audit_problems(config)
    problems += _attack_problems(config, unknown)
    if config.secagg.enabled:
        if config.mode != 'federated':
            problems.append(
                f"config.secagg.enabled=True needs config.mode='federated' (got "
                f'{config.mode!r}): there is nothing to aggregate.'
            )
        if not config.secagg.dropout_fraction < 1:
            problems.append(
                f'config.secagg.dropout_fraction={config.secagg.dropout_fraction} must be < 1.'
            )
        if config.compression.kind == 'topk':
            problems.append(
                "config.compression.kind='topk' sends a sparse update, which "
                'secure aggregation cannot sum without revealing the positions; '
                "use 'quantize' or 'none' with config.secagg.enabled=True."
            )
        if config.mode == 'federated':
            problems += _secagg_problems(config)
    # A NaN or infinite field is reported once, by the finiteness check, not by its range too.
    problems = [
        p
        for p in problems
        if p.startswith(
            tuple(f'config.{f}={_get(config, f)!r} must be a finite' for f in nonfinite)
        )
        or not p.startswith(tuple(f'config.{f}=' for f in nonfinite))
    ]
    if problems:
        raise ConfigError(problems)
