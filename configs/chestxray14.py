"""NIH ChestX-ray14: 14-finding multi-label classification across five hospitals.

Variants (`--config=configs/chestxray14.py:VARIANT`):
  (none)     the paper's set-up on the real data: ResNet-18 (GroupNorm) at 224 px, five hospitals
             non-IID by disease (Dirichlet 0.5 over the primary finding), 100 rounds of 3 local
             epochs, Adam with an exponentially decaying learning rate, sample-level DP-SGD
             calibrated to epsilon = 4.0 per hospital. Needs the built dataset
             (python -m fedjax_med.data.build --dataset=nih_chestxray14 --manual_dir=DIR).
  synthetic  the built-in synthetic twin on CPU: small ResNet at 32 px, five non-IID hospitals,
             20 rounds of 3 local epochs. Expected global mean AUROC (seeds 0-2): federated
             0.87-0.89, centralised (--config.mode=centralized) 0.92-0.96, local-only
             (--config.mode=local) 0.80-0.83 (RESULTS.md); about 2 min on 2 cores (6 s/round
             federated).
  smoke      seconds: tiny everything, checkpoint every round (tests, CI).
  dp         synthetic + sample-level DP-SGD at epsilon = 3, each hospital's noise calibrated to
             the target. Expected global mean AUROC 0.63 after 10 rounds (--config.num_rounds=10;
             0.62 at epsilon 1, 0.64 at 8), against 0.82 without DP: these hospitals are too
             small for sample-level DP (RESULTS.md); about 2.5 minutes on 2 cores for 10 rounds.
  nih_scale  the NIH-sized twin: all 112,120 rows of the real NIH table rendered at 32 px (uint8),
             10% of the patients held out as a public set, the rest split patient-wise over five
             non-IID hospitals (Dirichlet 0.5; about 16,000 training and 4,000 test images each).
             50 rounds of 0.5 local epochs; the signal strength is calibrated on centralised
             non-private training to land near published NIH AUROCs (NIH_SCALE_SIGNAL).
  nih_scale_dp  nih_scale + DP-SGD as done at scale: expected Poisson batches of 1,024, per-example
             gradients 64 at a time, epsilon = 4.5 per hospital (--config.dp.target_epsilon).
  cross_device  the shape simulators of many small clients are benchmarked on: 1,000 hospitals
             of about 50 training images (16 px synthetic twin, IID), 50 of them a round, one
             local epoch at batch 10. The round's client axis holds the 50 participants only,
             so a round costs 50 hospitals' work (launch/participation_benchmark.py).
  nih_public the public set of nih_scale alone, trained centrally (no hospital's data): a
             pretrained model for --config.init_from=WORKDIR. The privacy guarantee of a
             warm-started run covers the hospitals' data only; the public set is public.

Example:
  python -m fedjax_med.main --config=configs/chestxray14.py:synthetic --workdir=/tmp/cxr
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
    c.task = 'chestxray14'
    variant = arg or 'paper'
    if variant == 'paper':
        c.data.name = 'nih_chestxray14'
        c.data.resolution = 224
        c.model.name = 'resnet18'
        c.model.norm_groups = 32
        c.num_rounds = 100
        c.local.epochs = 3.0
        c.local.batch_size = 64
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
        # One hospital at a time inside the jitted round: vmapping these convolutions over
        # hospitals with different weights makes them grouped convolutions, which ran 2.2x
        # slower than dense ones on an H100 for ResNet-18 at 224 px (BENCHMARKS.md), and it
        # holds one hospital's activations instead of all of them.
        c.clients_in_parallel = 1
    elif variant in ('synthetic', 'dp'):
        c.data.name = 'synthetic_cxr'
        c.data.resolution = 32
        c.data.num_train = 3000
        c.data.num_test = 1000
        c.model.name = 'resnet_small'
        c.model.width = 8
        c.model.depth = 3
        c.num_rounds = 20
        # FedAvg over five non-IID hospitals moves the model by about the mean of their updates,
        # i.e. by one hospital's worth of steps per round, while centralised training takes all
        # hospitals' steps. Three local epochs at a high Adam learning rate let federated
        # training converge within 20 rounds (one epoch at 3e-3: AUROC 0.77 vs 0.93
        # centralised); a width-8 ResNet keeps the round cheap on a CPU.
        c.local.epochs = 3.0
        c.local.batch_size = 32
        c.local.learning_rate = 1e-2
        c.local.schedule = 'cosine'
        c.eval_every = 2
        c.checkpoint_every = 5
        if variant == 'dp':
            c.local.sampling = 'poisson'
            c.dp.mode = 'sample'
            c.dp.target_epsilon = 3.0
            # Per-example gradient norms: about 60% below 0.03 (confidently negative images),
            # the rest above 0.1; at C = 1 none is clipped and the noise (sigma * C) dwarfs them.
            # At epsilon 3 after 10 rounds: C = 1 / 0.1 / 0.03 gave AUROC 0.58 / 0.61 / 0.63.
            c.dp.clip_norm = 0.03
            # Per-example gradients 8 at a time: only chunks holding sampled examples run, and a
            # Poisson batch rarely fills its padded size (BENCHMARKS.md, sixth session).
            c.dp.chunk_size = 8
    elif variant in ('nih_scale', 'nih_scale_dp', 'nih_public'):
        _nih_scale(c, variant)
    elif variant == 'cross_device':
        c.data.name = 'synthetic_cxr'
        c.data.resolution = 16
        c.data.num_clients = 1000
        c.data.num_train = 50_000
        c.data.num_test = 10_000
        c.data.partition = 'iid'
        c.model.name = 'resnet_small'
        c.model.width = 8
        c.model.depth = 2
        c.num_rounds = 50
        c.clients_per_round = 50
        c.local.epochs = 1.0
        c.local.batch_size = 10
        c.local.learning_rate = 3e-3
        c.local.schedule = 'constant'
        c.eval_every = 10
        c.checkpoint_every = 10
    elif variant == 'smoke':
        c.data.name = 'synthetic_cxr'
        c.data.resolution = 16
        c.data.num_train = 160
        c.data.num_test = 80
        c.data.num_clients = 4
        c.model.name = 'resnet_small'
        c.model.width = 8
        c.model.depth = 2
        c.model.norm_groups = 4
        c.num_rounds = 3
        c.local.epochs = 1.0
        c.local.batch_size = 16
        c.local.learning_rate = 3e-3
        c.eval_every = 1
        c.checkpoint_every = 1
        c.eval_batch_size = 64
    else:
        raise base.unknown_variant(
            arg,
            'configs/chestxray14.py',
            ('synthetic', 'smoke', 'dp', 'cross_device', 'nih_scale', 'nih_scale_dp', 'nih_public'),
        )
    return c


# Signal strength of the NIH-sized twin, calibrated once on centralised non-private training
# only (RESULTS.md, "hospital scale"): centralised mean AUROC lands where published models land on
# the real NIH data (about 0.80-0.85), not at the small twin's 0.94.
NIH_SCALE_SIGNAL = 0.8


def _nih_scale(c: ml_collections.ConfigDict, variant: str) -> None:
    """The NIH-sized twin: every one of the 112,120 rows of the real NIH table, five patient-wise
    hospitals (Dirichlet 0.5), 10% of the patients held out as a public set for pretraining."""
    c.data.name = 'synthetic_cxr'
    c.data.resolution = 32
    c.data.num_train = 89_696  # + num_test = 112,120 rows; 20% of each hospital's patients test
    c.data.num_test = 22_424
    c.data.max_images_per_patient = 0  # every image of every patient
    c.data.public_fraction = 0.1
    c.data.synthetic_signal = NIH_SCALE_SIGNAL
    c.model.name = 'resnet_small'
    c.model.width = 8
    c.model.depth = 3
    # 50 rounds of half a local epoch (about 125 steps of 64 per hospital, 25 epochs of each
    # hospital's data over the run; ~25 s a round on 2 quiet cores). A tenth of an epoch a round
    # left FedAvg on the loss plateau of the first few hundred steps for 20 rounds (AUROC 0.58;
    # RESULTS.md): FedAvg moves by about one hospital's worth of steps per round. Centralised
    # training converges in 5 epochs of the pooled data: the grid runs it with local.epochs=0.1
    # (launch/experiments.py, --suite=nih_scale), the run the signal was calibrated on.
    c.num_rounds = 50
    c.local.epochs = 0.5
    c.local.batch_size = 64
    c.local.learning_rate = 3e-3
    c.local.schedule = 'cosine'
    c.eval_every = 5
    c.checkpoint_every = 5
    c.eval_batch_size = 512
    if variant == 'nih_public':
        # Pretraining on the public set alone (no hospital's data): the warm start of init_from.
        # 20 epochs of the ~11,000 public images (about as many examples as one hospital-scale
        # run trains on in total).
        c.mode = 'centralized'
        c.data.train_on = 'public'
        c.num_rounds = 20
        c.local.epochs = 1.0
    elif variant == 'nih_scale_dp':
        # DP-SGD as done at scale: large expected Poisson batches, per-example gradients in
        # memory-bounded chunks (only the chunks holding sampled examples run).
        c.local.sampling = 'poisson'
        c.local.batch_size = 1024
        c.local.learning_rate = 3e-3
        c.dp.mode = 'sample'
        c.dp.target_epsilon = 4.5
        c.dp.clip_norm = 0.1
        c.dp.chunk_size = 64
