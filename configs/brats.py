"""BraTS brain-tumour segmentation (WT/TC/ET Dice) across five hospitals with a 2-D or 3-D U-Net.

Variants (`--config=configs/brats.py:VARIANT`):
  (none)     the paper's set-up on real BraTS 2021 (2-D axial slices at 128 px), five hospitals
             non-IID by tumour size, 100 rounds of 3 local epochs, Adam with decaying learning
             rate, sample-level DP-SGD calibrated to epsilon = 4.0. Needs the built dataset
             (python -m fedjax_med.data.build --dataset=brats2021 --manual_dir=DIR).
  synthetic  the built-in synthetic twin on CPU: small U-Net at 32 px, five non-IID hospitals,
             15 rounds. Expected global mean Dice (seeds 0-2): federated 0.79-0.82, centralised
             (--config.mode=centralized) 0.85-0.87, local-only (--config.mode=local) 0.65-0.71;
             about a minute on 2 cores.
  smoke      seconds: tiny everything, checkpoint every round (tests, CI).
  dp         synthetic + sample-level DP-SGD at epsilon = 3, each hospital's noise calibrated to
             the target. Expected global mean Dice 0.33 (0.11 at epsilon 1, 0.49 at 8;
             RESULTS.md); about 1.5 minutes on 2 cores.
  patch3d    3-D on one GPU: real BraTS 2021 stored as volumes of 128 x 128 px axial planes (about
             75 of them), two 64^3 patches per case (half centred on tumour), 3-D U-Net of width 16
             and depth 4 (3x3x3 convolutions, 1.5M parameters), five hospitals non-IID by tumour
             size, FedAvg without DP, 100 rounds. The patches live on the GPU in their storage
             dtypes (4 float16 modalities, 3 uint8 region masks): about 2 x 1,251 x 64^3 x 11
             bytes = 7.2 GB, more with the padding of unequal hospitals and the test copies;
             lower data.patches_per_case on smaller GPUs. Build
             the volumes once (python -m fedjax_med.data.build --dataset=brats2021 --volumes
             --manual_dir=DIR). DP-SGD works in 3-D too
             (--config.dp.mode=sample --config.local.sampling=poisson
             --config.dp.target_epsilon=4, with or without dp.fast_clipping). Not yet run on real
             data or a GPU: no wall time or Dice to report.

3-D on the CPU, e.g. the synthetic twin as 8^3 patches of 16^3 volumes (seconds per round):
  python -m fedjax_med.main --config=configs/brats.py:smoke --workdir=/tmp/brats3d \
      --config.data.patch_size=8

Example:
  python -m fedjax_med.main --config=configs/brats.py:synthetic --workdir=/tmp/brats
"""

import ml_collections

try:
    from . import base  # imported as the package `configs` (tests, launch/, notebooks)
except ImportError:  # loaded from its path (--config=configs/...): configs/ is not installed
    import importlib.util
    import os

    _spec = importlib.util.spec_from_file_location(
        'fedjax_med_configs_base',
        os.path.join(os.path.dirname(os.path.abspath(__file__)), 'base.py'),
    )
    base = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(base)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_base_config()
    c.task = 'brats'
    c.model.name = 'unet'
    # Leaky ReLUs: with plain ReLUs, one initial U-Net in three (synthetic seed 1) learned to
    # code tumour as switched-off features, capping its tumour logits at the head's bias; FedAvg
    # then never predicted tumour (Dice 0). Slope 0.1 trained all three seeds (RESULTS.md).
    c.model.negative_slope = 0.1
    variant = arg or 'paper'
    if variant == 'paper':
        c.data.name = 'brats2021'
        c.data.resolution = 128
        c.data.slices_per_case = 32
        c.model.width = 32
        c.model.depth = 4
        c.num_rounds = 100
        c.local.epochs = 3.0
        c.local.batch_size = 32
        c.local.learning_rate = 1e-3
        c.local.schedule = 'exponential'
        c.local.decay_rate = 0.97
        c.local.sampling = 'poisson'
        c.dp.mode = 'sample'
        c.dp.target_epsilon = 4.0
        c.dp.clip_norm = 1.0
        # dp.fast_clipping stays automatic (unset): fast clipping on a GPU (0.59x the non-private
        # step vs 0.17x for per-example gradients), per-example gradients on a CPU.
        c.eval_every = 5
        c.checkpoint_every = 5
        # One hospital at a time inside the jitted round: vmapping convolutions over hospitals
        # with different weights makes them grouped convolutions (2.2x slower than dense ones on
        # an H100 for ResNet-18 at 224 px, BENCHMARKS.md), and it holds one hospital's
        # activations instead of all of them.
        c.clients_in_parallel = 1
    elif variant in ('synthetic', 'dp'):
        c.data.name = 'synthetic_brats'
        c.data.resolution = 32
        c.data.num_train = 1600
        c.data.num_test = 400
        c.data.slices_per_case = 8
        c.model.width = 8
        c.model.depth = 3
        c.num_rounds = 15
        c.local.epochs = 1.0
        c.local.batch_size = 16
        c.local.learning_rate = 3e-3
        c.local.schedule = 'cosine'
        c.eval_every = 3
        c.checkpoint_every = 5
        if variant == 'dp':
            c.local.sampling = 'poisson'
            c.dp.mode = 'sample'
            c.dp.target_epsilon = 3.0
            # Per-example gradient norms average 0.4 and 5-8% exceed 1. At epsilon 3, clipping
            # harder cost Dice (C = 0.5 / 0.25 / 0.1: 0.31 / 0.18 / 0.04 against 0.33), and so did
            # C = 2 (0.13: twice the noise for the same few clipped examples). RESULTS.md.
            c.dp.clip_norm = 1.0
            # Per-example gradients 8 at a time: only chunks holding sampled examples run, and a
            # Poisson batch rarely fills its padded size (BENCHMARKS.md, sixth session).
            c.dp.chunk_size = 8
    elif variant == 'smoke':
        c.data.name = 'synthetic_brats'
        c.data.resolution = 16
        c.data.num_train = 96
        c.data.num_test = 48
        c.data.num_clients = 3
        c.data.slices_per_case = 4
        c.model.width = 4
        c.model.depth = 2
        c.model.norm_groups = 4
        c.num_rounds = 3
        c.local.batch_size = 8
        c.local.learning_rate = 3e-3
        c.eval_every = 1
        c.checkpoint_every = 1
        c.eval_batch_size = 32
    elif variant == 'patch3d':
        c.data.name = 'brats2021'
        c.data.resolution = 128
        c.data.patch_size = 64
        c.data.patches_per_case = 2
        c.data.tumour_patch_fraction = 0.5
        c.model.width = 16
        c.model.depth = 4
        c.num_rounds = 100
        c.local.epochs = 2.0
        c.local.batch_size = 4
        c.local.learning_rate = 1e-3
        c.local.schedule = 'cosine'
        c.eval_every = 5
        c.eval_batch_size = 8  # 64^3 patches: activations, not data, bound the batch
        c.checkpoint_every = 5
        c.clients_in_parallel = 1  # as in 'paper'
    else:
        raise base.unknown_variant(arg, 'configs/brats.py', ('synthetic', 'smoke', 'dp', 'patch3d'))
    return c
