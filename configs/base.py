"""Every configuration field of fedjax_med, each with a one-line comment.

The task configs (chestxray14.py, brats.py) start from `get_base_config()` and change what they
need. Fields are grouped by the part of the code that reads them.
"""

import difflib

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
    """Returns the full default configuration (federated, no DP, no SecAgg)."""
    c = ml_collections.ConfigDict()
    c.task = 'chestxray14'          # 'chestxray14' (14-label classification) or 'brats' (segmentation)
    c.mode = 'federated'            # 'federated' | 'centralized' (pool all data) | 'local' (each alone)
    c.seed = 0                      # root of every random draw (data, init, sampling, noise, masks)
    c.num_rounds = 20               # communication rounds
    c.clients_per_round = 0         # m hospitals sampled per round; 0 means all K take part
    c.clients_in_parallel = 0       # hospitals vectorised at once (0 = auto: all on GPU, 1 on CPU)
    c.init_from = ''                # warm start: a workdir (or its checkpoints/) whose latest parameters start this run ('' = random init)

    # ---- data ----------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.name = 'synthetic_cxr'   # synthetic_cxr | nih_chestxray14 | synthetic_brats | brats2020 | brats2021 | msd_brain
    c.data.data_dir = ''            # TFDS data dir for built datasets ('' = ~/tensorflow_datasets)
    c.data.manual_dir = ''          # where the user put the downloaded raw files (real datasets)
    c.data.resolution = 64          # image side in pixels after resizing
    c.data.num_train = 2000         # synthetic only: training examples over all hospitals
    c.data.num_test = 500           # synthetic only: test examples over all hospitals
    c.data.num_clients = 5          # K hospitals
    c.data.partition = 'dirichlet'  # iid | dirichlet | pathological | quantity | natural
    c.data.dirichlet_alpha = 0.5    # label-skew concentration (smaller = more non-IID)
    c.data.findings_per_client = 3  # pathological partition: findings per hospital
    c.data.quantity_sigma = 0.0     # log-normal sigma of hospital sizes (0 = equal sizes)
    c.data.natural_column = 'view'  # natural partition: metadata column that defines the hospital
    c.data.synthetic_signal = 2.5   # synthetic_cxr: strength of the findings' signatures (1 = subtle)
    c.data.max_images_per_patient = 4  # synthetic_cxr: NIH images drawn per patient (0 = all, so 112,120 rows = the whole table)
    c.data.public_fraction = 0.0    # fraction of patients held out of every hospital as a public set (for pretraining; never in a hospital)
    c.data.train_on = 'hospitals'   # 'hospitals' | 'public' (centralised training on the public set alone, e.g. to pretrain for init_from)
    c.data.feature_skew = True      # per-hospital acquisition shift (contrast, noise, blur / bias field)
    c.data.test_fraction = 0.2      # fraction of each hospital's patients held out as its test split
    c.data.slices_per_case = 16     # BraTS: axial slices taken from each case
    c.data.patch_size = 0           # BraTS: 0 = 2-D axial slices; P > 0 = 3-D patches of P^3 voxels
    c.data.patches_per_case = 8     # BraTS 3-D: patches cut from each case (fixed for the run)
    c.data.tumour_patch_fraction = 0.5  # BraTS 3-D: patches centred on tumour; the rest on brain
    c.data.max_cases = 0            # BraTS read via TFDS: a seeded subset of this many cases (0 = all)
    c.data.brain_slices_only = True  # real BraTS builder: drop axial slices without brain (3-D: crop to them)
    c.data.empty_slice_stride = 1   # real BraTS builder, 2-D: keep every k-th brain slice without tumour
    c.data.synthetic_via_tfds = False  # synthetic twins: build as TFDS and read back (as real data), not in memory

    # ---- model ---------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.name = 'resnet_small'   # resnet18 | resnet_small | unet
    c.model.width = 16              # channels of the first stage (ResNet) / level (U-Net)
    c.model.depth = 3               # ResNet stages (resnet_small) or U-Net levels
    c.model.norm_groups = 8         # GroupNorm groups (capped to divide the channel count)
    c.model.compute_dtype = 'float32'  # 'float32' or 'bfloat16' compute; parameters stay float32
    c.model.negative_slope = 0.0    # slope of the activations below 0: 0 is ReLU, > 0 leaky ReLU

    # ---- local training (inside each hospital) -------------------------------------------------
    c.local = ml_collections.ConfigDict()
    c.local.epochs = 1.0            # local epochs per round (steps = ceil(epochs * n_k / batch_size))
    c.local.batch_size = 32         # per-step batch (expected batch under Poisson sampling)
    c.local.optimizer = 'adam'      # sgd | momentum | adam
    c.local.learning_rate = 1e-3    # peak client learning rate
    c.local.momentum = 0.9          # momentum optimiser only
    c.local.schedule = 'cosine'     # constant | cosine | exponential (over rounds)
    c.local.decay_rate = 0.98       # exponential schedule: lr multiplier per round
    c.local.prox_mu = 0.0           # FedProx proximal weight mu (0 = FedAvg)
    c.local.sampling = 'shuffle'    # shuffle (epochs without replacement) | poisson (required for DP)
    c.local.unroll_steps = 1        # lax.scan unroll factor of the local-step loop

    # ---- server --------------------------------------------------------------------------------
    c.server = ml_collections.ConfigDict()
    c.server.optimizer = 'fedavg'   # fedavg | fedavgm | fedadam | fedyogi | fedadagrad
    c.server.learning_rate = 1.0    # server step size (1.0 with fedavg is plain FedAvg)
    c.server.momentum = 0.9         # fedavgm
    c.server.beta1 = 0.9            # fedadam / fedyogi
    c.server.beta2 = 0.99           # fedadam / fedyogi
    c.server.epsilon = 1e-3         # adaptivity tau (Reddi et al. 2021)
    c.server.aggregator = 'weighted'  # weighted (by examples) | uniform | median | trimmed_mean | krum | multi_krum (robust, unweighted; no SecAgg or client DP) | norm_bound (each update clipped to norm_bound, then weighted; SecAgg ok) | a name in fedjax_med/aggregation/registry.py
    c.server.trim_fraction = 0.1    # trimmed_mean: fraction of values dropped from each end per coordinate, in [0, 0.5)
    c.server.krum_byzantine = 1     # krum / multi_krum: f, the Byzantine hospitals it withstands (needs a cohort of at least 2f + 3)
    c.server.multi_krum_m = 0       # multi_krum: m', how many lowest-score updates are averaged (0 = the cohort minus f)
    c.server.norm_bound = 1.0       # norm_bound: the L2 norm each hospital's update is clipped to before the weighted mean

    # ---- differential privacy ------------------------------------------------------------------
    c.dp = ml_collections.ConfigDict()
    c.dp.mode = 'none'              # none | sample (DP-SGD in each hospital) | client (DP-FedAvg)
    c.dp.clip_norm = 1.0            # per-example (sample) or per-hospital-update (client) L2 clip
    c.dp.noise_multiplier = 0.0     # sigma; ignored when target_epsilon > 0 (then calibrated)
    c.dp.target_epsilon = 0.0       # > 0: calibrate sigma so the planned run ends at this epsilon
    c.dp.delta = 0.0                # 0 means 1 / (10 * n_k) per hospital (sample) or 1/(10 K) (client)
    c.dp.noise_per_hospital = True  # sample + target_epsilon: sigma_k per hospital, each ends at the target (False: one sigma, the largest)
    c.dp.accountant = 'rdp'         # rdp | pld
    c.dp.chunk_size = 0             # per-example gradients in chunks of this size, only up to the last sampled example (0 = all slots at once)
    # DP-SGD clipping path, a speed choice only (same gradients to float rounding): True = per-example norms from
    # layer activations (ghost/direct) and one reweighted backward pass, no per-example gradients; False = vmap of
    # per-example gradients; unset (None) = automatic: fast on GPU/TPU when the model supports it, per-example on CPU.
    c.dp.fast_clipping = config_dict.placeholder(bool)
    c.dp.adaptive_clip = False      # client mode: adaptive clipping (Andrew et al. 2021)
    c.dp.target_quantile = 0.5      # adaptive clipping: target fraction of unclipped updates
    c.dp.clip_learning_rate = 0.2   # adaptive clipping: geometric step size
    c.dp.count_noise_std = 1.0      # adaptive clipping: noise on the unclipped count (in clients)

    # ---- secure aggregation and compression ----------------------------------------------------
    c.secagg = ml_collections.ConfigDict()
    c.secagg.enabled = False        # mask updates so the server only learns their sum
    c.secagg.clip = 1.0             # per-coordinate clip before fixed-point encoding
    c.secagg.dropout_fraction = 0.0  # fraction of participants that drop after key agreement
    c.secagg.threshold = 0        # Shamir threshold t (0 = majority of participants)
    c.secagg.neighbours = 0        # SecAgg+ graph degree k (0 = complete graph, classic SecAgg)
    c.compression = ml_collections.ConfigDict()
    c.compression.kind = 'none'     # none | quantize | topk (hospital -> server)
    c.compression.bits = 8          # quantize: bits per coordinate
    c.compression.topk_fraction = 0.01  # topk: fraction of coordinates sent (error feedback kept)
    c.compression.rotate = False    # randomised Hadamard rotation before quantisation
    c.compression.broadcast_dtype = 'float32'  # server -> hospitals: float32 | bfloat16

    # ---- attack simulation (fedjax_med/attacks.py; off by default) ------------------------------
    c.attack = ml_collections.ConfigDict()
    c.attack.mode = 'none'          # none | label_flip | sign_flip | scale | backdoor (chest X-ray only): what the malicious hospitals do
    c.attack.num_malicious = 0      # f: hospitals 0 .. f-1 are malicious (0 with a mode: that mode's clean baseline)
    c.attack.scale = 10.0           # scale: they send scale x their update; sign_flip: -scale x their update
    c.attack.backdoor_fraction = 0.5  # backdoor: fraction of each malicious batch stamped with the trigger (the first slots)
    c.attack.backdoor_target = 'Mass'  # backdoor: the finding set on for triggered images (one of the 14 CXR findings)
    c.attack.trigger_size = 3       # backdoor: side in pixels of the bright square stamped in the bottom-right corner

    # ---- evaluation, logging, checkpoints ------------------------------------------------------
    c.eval_every = 1                # evaluate the global test split every N rounds (and the last)
    c.eval_batch_size = 128         # evaluation batch size
    c.eval_case_metrics = True      # global test split, on the host: BraTS per-case Dice and HD95 on case volumes, CXR accuracy/F1 at thresholds chosen on a validation half (fedjax_med/tasks.py); mean_dice / mean_auroc do not need them
    c.tensorboard = True            # also write the metrics as TensorBoard event files to WORKDIR/tensorboard/ (tensorboardX, no TensorFlow); metrics.jsonl is always written
    c.checkpoint_every = 5          # save an Orbax checkpoint every N rounds (and the last)
    c.checkpoints_to_keep = 2       # how many checkpoints to keep

    # ---- empirical privacy audit (fedjax_med/privacy/auditing.py; off while num_canaries = 0) ---
    c.audit = ml_collections.ConfigDict()
    c.audit.num_canaries = 0        # m canaries planted in one hospital, each trained on independently with probability 1/2; > 0 logs privacy/epsilon_audit_lower at every evaluation (one-run audit, Steinke et al. 2023)
    c.audit.hospital = 0            # index of the hospital whose training data holds the canaries (they count in its n_k, so in q_k = B / n_k)
    c.audit.canary = 'noise'        # noise (random pixel pattern; CXR: one random finding, BraTS: random masks) | flipped (a copy of one of the hospital's images with every label flipped)
    c.audit.confidence = 0.95       # the lower bound holds at this confidence (a correct accountant is exceeded with probability <= 1 - confidence)
    c.audit.guess_fractions = (0.1, 0.2, 0.5)  # guesses r = f * m (half IN: highest scores, half OUT: lowest); the best f is reported, Bonferroni-corrected over the list (one value = a fixed k)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    return get_base_config()


def unknown_variant(arg: str, path: str, variants: tuple[str, ...]) -> ValueError:
    """The error for a misspelt variant of a task config (`--config=PATH:VARIANT`), with the
    closest variant as a suggestion."""
    close = difflib.get_close_matches(arg.lower(), variants, n=1, cutoff=0.6)
    hint = f' Did you mean {path}:{close[0]}?' if close else ''
    return ValueError(f'Unknown variant {arg!r} of {path}; use one of '
                      f"'' (paper), {', '.join(map(repr, variants))}.{hint}")
