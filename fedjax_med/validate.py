"""Start-up validation of a config: one clear message per problem, naming field, value and fix.

Everything that can be checked before data is loaded or anything is compiled is checked here, so
a bad run fails in a second rather than after an hour.
"""

import ml_collections

from fedjax_med.aggregation.fedavg import AGGREGATORS
from fedjax_med.aggregation.robust import ROBUST_AGGREGATORS
from fedjax_med.aggregation.server_opt import SERVER_OPTIMIZERS
from fedjax_med.client import CLIENT_OPTIMIZERS
from fedjax_med.models import COMPUTE_DTYPES, MODELS

CHOICES = {
    'task': ('chestxray14', 'brats'),
    'mode': ('federated', 'centralized', 'local'),
    'data.name': ('synthetic_cxr', 'nih_chestxray14', 'synthetic_brats', 'brats2020', 'brats2021',
                  'msd_brain'),
    'data.partition': ('iid', 'dirichlet', 'pathological', 'quantity', 'natural'),
    'model.name': tuple(MODELS),
    'model.compute_dtype': tuple(COMPUTE_DTYPES),
    'local.optimizer': tuple(CLIENT_OPTIMIZERS),
    'local.schedule': ('constant', 'cosine', 'exponential'),
    'local.sampling': ('shuffle', 'poisson'),
    'server.optimizer': SERVER_OPTIMIZERS,
    'server.aggregator': AGGREGATORS,
    'dp.mode': ('none', 'sample', 'client'),
    'dp.accountant': ('rdp', 'pld'),
    'compression.kind': ('none', 'quantize', 'topk'),
    'compression.broadcast_dtype': ('float32', 'bfloat16'),
}
POSITIVE = ('num_rounds', 'local.unroll_steps', 'data.resolution', 'data.num_clients',
            'local.batch_size',
            'local.epochs', 'local.learning_rate', 'eval_every', 'eval_batch_size',
            'checkpoint_every', 'checkpoints_to_keep', 'model.width', 'model.depth',
            'data.patches_per_case')
NON_NEGATIVE = ('clients_per_round', 'clients_in_parallel', 'local.prox_mu', 'data.patch_size',
                'dp.noise_multiplier', 'dp.target_epsilon',
                'dp.delta', 'dp.chunk_size', 'secagg.dropout_fraction', 'secagg.threshold',
                'secagg.neighbours')
TASK_OF_DATA = {'synthetic_cxr': 'chestxray14', 'nih_chestxray14': 'chestxray14',
                'synthetic_brats': 'brats', 'brats2020': 'brats', 'brats2021': 'brats',
                'msd_brain': 'brats'}


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
            problems.append(f'config.data.resolution={data.resolution} must be divisible by '
                            f'2**(model.depth-1)={levels} for the U-Net.')
        return problems
    if config.task != 'brats':
        problems.append(f'config.data.patch_size={patch} cuts 3-D patches from BraTS volumes; '
                        f'config.task={config.task!r} has none. Set config.data.patch_size=0.')
    if config.model.name != 'unet':
        problems.append(f'config.data.patch_size={patch} needs the 3-D-capable U-Net; set '
                        f"config.model.name='unet' (got {config.model.name!r}).")
    if patch % levels:
        problems.append(f'config.data.patch_size={patch} must be a multiple of '
                        f'2**(model.depth-1)={levels} for the U-Net; use e.g. '
                        f'{max(levels, patch // levels * levels)}.')
    if patch > data.resolution:
        problems.append(f'config.data.patch_size={patch} exceeds the volume size '
                        f'config.data.resolution={data.resolution}; use a patch_size <= '
                        f'{data.resolution} or a larger resolution.')
    if not 0.0 <= data.tumour_patch_fraction <= 1.0:
        problems.append(f'config.data.tumour_patch_fraction={data.tumour_patch_fraction} must '
                        'be in [0, 1].')
    return problems


def _aggregator_problems(config: ml_collections.ConfigDict) -> list[str]:
    """A robust aggregator sorts each hospital's update, so it needs them in the clear and
    un-noised; without a federation (centralized, local) the aggregator is never used."""
    sc, problems = config.server, []
    if not 0.0 <= sc.trim_fraction < 0.5:
        problems.append(f'config.server.trim_fraction={sc.trim_fraction!r} must be in [0, 0.5) '
                        '(the fraction dropped from each end of every coordinate); e.g. 0.1.')
    if config.mode != 'federated' or sc.aggregator not in ROBUST_AGGREGATORS:
        return problems
    if config.secagg.enabled:
        problems.append(f"config.server.aggregator={sc.aggregator!r} needs each hospital's update "
                        'in the clear, but config.secagg.enabled=True shows the server only their '
                        "sum. Use config.server.aggregator='weighted' or 'uniform' with secure "
                        'aggregation, or set config.secagg.enabled=False.')
    if config.dp.mode == 'client':
        problems.append(f'config.server.aggregator={sc.aggregator!r} cannot run under '
                        "config.dp.mode='client': client-level DP noises the sum of clipped "
                        'updates and the privacy accounting covers only that noised sum. Use '
                        "config.server.aggregator='weighted' or 'uniform' with client-level DP, "
                        "or config.dp.mode='sample' or 'none' with a robust aggregator.")
    return problems


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError with one message per problem found (all of them at once)."""
    problems = []
    for field, allowed in CHOICES.items():
        value = _get(config, field)
        if value not in allowed:
            problems.append(f'config.{field}={value!r} is not known; use one of '
                            f'{", ".join(map(repr, allowed))}.')
    for field in POSITIVE:
        if not _get(config, field) > 0:
            problems.append(f'config.{field}={_get(config, field)!r} must be > 0.')
    for field in NON_NEGATIVE:
        if _get(config, field) < 0:
            problems.append(f'config.{field}={_get(config, field)!r} must be >= 0.')
    k = config.data.num_clients
    if config.clients_per_round > k:
        problems.append(f'config.clients_per_round={config.clients_per_round} exceeds '
                        f'config.data.num_clients={k}; use at most {k} (0 means all).')
    task = TASK_OF_DATA.get(config.data.name)
    if task and task != config.task:
        problems.append(f'config.data.name={config.data.name!r} is {task} data but '
                        f'config.task={config.task!r}; set config.task={task!r}.')
    if config.task == 'brats' and config.model.name != 'unet':
        problems.append(f'config.model.name={config.model.name!r} cannot segment; use \'unet\' '
                        'for config.task=\'brats\'.')
    if config.task == 'chestxray14' and config.model.name == 'unet':
        problems.append("config.model.name='unet' is a segmentation model; use 'resnet18' or "
                        "'resnet_small' for config.task='chestxray14'.")
    if not 0 <= config.model.negative_slope < 1:
        problems.append(f'config.model.negative_slope={config.model.negative_slope!r} must be in '
                        '[0, 1): 0 is ReLU, 0.01-0.2 the usual leaky ReLUs.')
    problems += _patch_problems(config)
    problems += _aggregator_problems(config)
    dp = config.dp
    if dp.mode == 'sample' and config.local.sampling != 'poisson':
        problems.append("config.dp.mode='sample' needs config.local.sampling='poisson' (the "
                        'privacy accounting assumes Poisson subsampling); set it.')
    if dp.mode != 'none' and dp.noise_multiplier == 0 and dp.target_epsilon == 0:
        problems.append(f'config.dp.mode={dp.mode!r} needs config.dp.noise_multiplier > 0 or '
                        'config.dp.target_epsilon > 0.')
    if dp.mode != 'none' and not dp.clip_norm > 0:
        problems.append(f'config.dp.clip_norm={dp.clip_norm!r} must be > 0.')
    if dp.mode == 'client' and config.mode != 'federated':
        problems.append(f"config.dp.mode='client' protects hospitals in a federation; it has no "
                        f"meaning with config.mode={config.mode!r}. Use dp.mode='sample'.")
    if config.secagg.enabled:
        if config.mode != 'federated':
            problems.append(f'config.secagg.enabled=True needs config.mode=\'federated\' (got '
                            f'{config.mode!r}): there is nothing to aggregate.')
        if not config.secagg.dropout_fraction < 1:
            problems.append(f'config.secagg.dropout_fraction={config.secagg.dropout_fraction} '
                            'must be < 1.')
        if config.compression.kind == 'topk':
            problems.append("config.compression.kind='topk' sends a sparse update, which "
                            'secure aggregation cannot sum without revealing the positions; '
                            "use 'quantize' or 'none' with config.secagg.enabled=True.")
    if problems:
        raise ValueError('Invalid configuration:\n  - ' + '\n  - '.join(problems))
