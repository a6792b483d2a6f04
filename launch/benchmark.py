"""Throughput benchmark of the jitted federated round: the numbers behind the design's claims.

One run measures, for each model with its one per-step batch, steady-state throughput
(examples/s of training, compile excluded and reported separately; median of timed repetitions
after a warm-up call; `jax.block_until_ready`) and reports these ratios:

  vmap_vs_sequential_speedup              K hospitals in one vectorised, jitted round ÷ the same
                                          work as a Python loop over hospitals calling a jitted
                                          single-hospital update, with host-side aggregation
                                          (deltas copied to numpy, weighted mean, server step),
                                          as Flower/FedJAX-style simulators do
  dp_over_nondp_throughput                DP-SGD round ÷ non-private round (same K, steps, batch)
  dp_fast_over_nondp_throughput           ghost-norm DP-SGD round (`config.dp.fast_clipping`)
                                          ÷ non-private round
  federated_over_centralized_throughput   K_fed hospitals ÷ one client holding the pooled data
                                          (same per-step batch, same total examples per round)
  secagg_overhead                         round time with secure aggregation ÷ without
  secagg_overhead_with_host               the same with the host protocol (key agreement, Shamir
                                          shares; measured separately) added to the round time
  bf16_over_fp32_throughput               compute_dtype='bfloat16' ÷ float32

plus examples/s over K = 1, 4, 16, 64 hospitals (`scaling_k`), over the number of devices with K
fixed (`scaling_devices`), compile times, peak device memory, the device and the jax version.
All ratio measurements use a one-device mesh, so they compare like with like; the device sweep
is the only place where several devices are used.

Data are random arrays generated on the device with the shapes and storage dtypes (uint8 X-rays,
float16 MRI, uint8 labels) of the real tasks; throughput does not depend on their values. Each
measurement catches its own errors (e.g. out of memory at K=64), records them under 'errors' and
the run goes on. A time budget (`--budget_s`) skips the
remaining, lower-priority measurements rather than overrunning a fixed GPU slot; the JSON file is
rewritten after every measurement, so a killed run still leaves what it measured.

Usage:
  python launch/benchmark.py --quick --json=/tmp/bench.json   # CPU, small CNN, < 3 minutes
  python launch/benchmark.py --json=bench_gpu.json            # GPU: ResNet-18 @224 + U-Net
  python launch/benchmark.py --only=vmap,dp --model=unet      # a subset
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [REPO]:  # first, ahead of any installed package of these names
    sys.path.insert(0, REPO)  # `configs` (not installed) and `fedjax_med` live here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import base, brats  # noqa: E402
from fedjax_med import parallel, rounds  # noqa: E402
from fedjax_med.aggregation import server_opt  # noqa: E402
from fedjax_med.data import storage  # noqa: E402
from fedjax_med.models import NUM_OUTPUTS, build_model  # noqa: E402
from fedjax_med.state import ClientInputs, RoundInputs  # noqa: E402
from fedjax_med.tasks import TASKS  # noqa: E402

ITEMS = ('federated', 'dp', 'vmap', 'secagg', 'bf16', 'dp_fast', 'scaling_k', 'devices')
RATIO_KEYS = (
    'vmap_vs_sequential_speedup',
    'dp_over_nondp_throughput',
    'dp_fast_over_nondp_throughput',
    'federated_over_centralized_throughput',
    'secagg_overhead',
    'secagg_overhead_with_host',
    'bf16_over_fp32_throughput',
)
NOISE_MULTIPLIER = 1.0  # any sigma > 0 turns DP-SGD on; its value does not change the cost


# =================================================================================================
# What is measured
# =================================================================================================


@dataclasses.dataclass(frozen=True)
class Workload:
    """Model and per-hospital work of every round in one benchmark run."""

    model: str  # resnet18 | resnet_small | unet
    task: str  # chestxray14 | brats
    resolution: int  # image side (pixels)
    channels: int  # 1 (chest X-ray) or 4 (BraTS modalities)
    batch: int  # per-step batch of one hospital
    steps: int  # local steps of one hospital per round
    width: int = 16  # resnet_small / unet: channels of the first stage
    depth: int = 3  # resnet_small stages / unet levels
    norm_groups: int = 8
    dp_chunk_size: int = 0  # config.dp.chunk_size of the DP-SGD measurement (0 = whole batch)
    # config.clients_in_parallel of every round: 0 = the automatic choice (vmap on accelerators,
    # one hospital at a time on CPU), 1 = one at a time inside the jitted round, n = chunks of n.
    clients_in_parallel: int = 0


@dataclasses.dataclass(frozen=True)
class Mode:
    """Sizes of the hospital counts and the timing effort."""

    fed_k: int  # hospitals of the federated / DP / SecAgg / bf16 rounds
    vmap_k: int  # hospitals of the vectorised-vs-sequential comparison
    scaling_k: tuple[int, ...]  # hospital counts of the K sweep
    reps: int  # timed repetitions (fewer when one takes long, at least 2)
    max_seconds_per_measurement: float
    budget_s: float  # skip what is left after this many seconds


MODES = {
    'full': Mode(
        fed_k=5,
        vmap_k=16,
        scaling_k=(1, 4, 16, 64),
        reps=5,
        max_seconds_per_measurement=12.0,
        budget_s=450.0,
    ),
    'quick': Mode(
        fed_k=5,
        vmap_k=16,
        scaling_k=(1, 4, 16, 64),
        reps=3,
        max_seconds_per_measurement=3.0,
        budget_s=165.0,
    ),
    # Tests only: seconds on a CPU; K values chosen so that several measurements coincide.
    'tiny': Mode(
        fed_k=2, vmap_k=2, scaling_k=(1, 2), reps=1, max_seconds_per_measurement=1.0, budget_s=120.0
    ),
}

WORKLOADS = {
    'full': {
        # As configs/chestxray14.py and configs/brats.py train them: one hospital at a time
        # inside the round (vmapping a 224-px ResNet-18 over hospitals makes its convolutions
        # grouped ones, 2.2x slower than dense on an H100; BENCHMARKS.md).
        'resnet18': Workload(
            'resnet18',
            'chestxray14',
            224,
            1,
            batch=64,
            steps=2,
            width=64,
            depth=4,
            norm_groups=32,
            dp_chunk_size=16,
            clients_in_parallel=1,
        ),
        'unet': Workload(
            'unet',
            'brats',
            128,
            4,
            batch=16,
            steps=2,
            width=32,
            depth=4,
            norm_groups=8,
            clients_in_parallel=1,
        ),
        # Many small hospitals: the case the vectorised client axis is for.
        'resnet_small': Workload(
            'resnet_small',
            'chestxray14',
            64,
            1,
            batch=32,
            steps=2,
            width=16,
            depth=3,
            norm_groups=8,
        ),
    },
    'quick': {
        'resnet_small': Workload(
            'resnet_small', 'chestxray14', 32, 1, batch=8, steps=1, width=8, depth=2, norm_groups=4
        ),
        'resnet18': Workload(
            'resnet18', 'chestxray14', 32, 1, batch=4, steps=1, width=64, depth=4, norm_groups=32
        ),
        'unet': Workload('unet', 'brats', 32, 4, batch=4, steps=2, width=8, depth=2, norm_groups=4),
    },
    'tiny': {
        'resnet_small': Workload(
            'resnet_small', 'chestxray14', 8, 1, batch=2, steps=1, width=4, depth=1, norm_groups=2
        ),
        'unet': Workload('unet', 'brats', 8, 4, batch=2, steps=1, width=4, depth=2, norm_groups=2),
    },
}

# (model, item) in priority order: when the time budget runs out, the tail is skipped.
PLANS = {
    'full': [('resnet18', i) for i in ('federated', 'dp', 'vmap', 'secagg', 'bf16')]
    + [('unet', i) for i in ('dp', 'vmap', 'bf16')]
    + [('resnet18', i) for i in ('dp_fast', 'scaling_k')]
    + [('resnet_small', i) for i in ('vmap', 'federated')]
    + [('unet', i) for i in ('dp_fast', 'federated', 'secagg')]
    + [('resnet18', 'devices')],
    'quick': [('resnet_small', i) for i in ITEMS],
    'tiny': [('resnet_small', i) for i in ITEMS],
}


@dataclasses.dataclass(frozen=True)
class RoundSpec:
    """One round configuration; measurements are cached by (workload, spec)."""

    num_clients: int
    steps: int
    dp: str = 'none'  # none | sgd (per-example clipping) | fast (ghost norms)
    secagg: bool = False
    dtype: str = 'float32'  # compute dtype of the model
    num_devices: int = 1

    def label(self) -> str:
        parts = [f'k{self.num_clients}', f's{self.steps}']
        parts += [] if self.dp == 'none' else [f'dp_{self.dp}']
        parts += ['secagg'] if self.secagg else []
        parts += [] if self.dtype == 'float32' else [self.dtype]
        parts += [] if self.num_devices == 1 else [f'dev{self.num_devices}']
        return '_'.join(parts)


# =================================================================================================
# Building one round: config, model, data and inputs on the devices
# =================================================================================================


def make_config(w: Workload, spec: RoundSpec):
    """The base config with this workload and spec (fields the round reads)."""
    c = base.get_base_config()
    c.task = w.task
    c.data.resolution = w.resolution
    c.data.num_clients = spec.num_clients
    c.model.name, c.model.width, c.model.depth = w.model, w.width, w.depth
    c.model.norm_groups = w.norm_groups
    if w.task == 'brats':  # the U-Net's activations as the BraTS configs set them
        c.model.negative_slope = brats.get_config('synthetic').model.negative_slope
    c.model.compute_dtype = spec.dtype
    c.clients_in_parallel = w.clients_in_parallel
    c.local.batch_size = w.batch
    if spec.dp != 'none':
        c.dp.mode = 'sample'
        c.dp.clip_norm = 1.0
        c.dp.chunk_size = w.dp_chunk_size
        c.local.sampling = 'poisson'
    if spec.dp != 'none':  # each DP item measures one path, whatever the automatic choice
        c.dp.fast_clipping = spec.dp == 'fast'  # ghost norms: fedjax_med/privacy/fast_clip.py
    c.secagg.enabled = spec.secagg
    return c


def fast_clipping_unavailable(w: Workload) -> str | None:
    """Why fast clipping cannot run on this workload's model, or None when it can."""
    from fedjax_med.privacy import fast_clip

    if not fast_clip.supports_fast_clipping(
        build_model(make_config(w, RoundSpec(1, 1)).model, w.task)
    ):
        return f'fast clipping does not support model {w.model}'
    return None


def secagg_unavailable() -> str | None:
    """Why the SecAgg measurement cannot run (its host protocol needs `cryptography`), or None."""
    try:
        from fedjax_med.aggregation import secagg_protocol  # noqa: F401
    except ImportError as e:
        return f'the host SecAgg protocol does not import ({e}); install `cryptography`'
    return None


def num_outputs_shape(w: Workload) -> tuple[int, ...]:
    """Label shape of one example."""
    if w.task == 'brats':  # one sigmoid per pixel and nested region
        return (w.resolution, w.resolution, NUM_OUTPUTS[w.task])
    return (NUM_OUTPUTS[w.task],)


def make_client_data(w: Workload, num_padded: int, num_examples: int, mesh, seed: int) -> dict:
    """Random {'image': [K, N, H, W, C], 'label': [K, N, ...]}, generated on the devices in the
    storage dtypes training keeps there (data/storage.py), so a round decodes its batches too."""
    image_shape = (num_padded, num_examples, w.resolution, w.resolution, w.channels)
    label_shape = (num_padded, num_examples, *num_outputs_shape(w))
    image_dtype = storage.IMAGE_DTYPES[w.task]

    def generate(key):
        ki, kl = jax.random.split(key)
        if image_dtype == np.uint8:
            image = jax.random.bits(ki, image_shape, jnp.uint8)
        else:
            image = jax.random.normal(ki, image_shape, jnp.float32).astype(image_dtype)
        return {
            'image': image,
            'label': jax.random.bernoulli(kl, 0.3, label_shape).astype(storage.LABEL_DTYPE),
        }

    sharding = parallel.client_sharding(mesh)
    return jax.jit(generate, out_shardings=sharding)(jax.random.key(seed))


def make_round_inputs(
    w: Workload,
    spec: RoundSpec,
    num_padded: int,
    num_examples: int,
    seed: int,
    secagg: Any = (),
    noise_multiplier: float = 0.0,
) -> RoundInputs:
    """Host-side inputs: every real hospital runs `spec.steps` full batches of distinct examples;
    padding hospitals (more devices than hospitals) take no part."""
    rng = np.random.default_rng(seed)
    k, s, b = spec.num_clients, spec.steps, w.batch
    indices = np.stack(
        [rng.permutation(num_examples)[: s * b].reshape(s, b) for _ in range(num_padded)]
    ).astype(np.int32)
    real = np.arange(num_padded) < k
    mask = np.broadcast_to(real[:, None, None], (num_padded, s, b)).astype(np.float32)
    return RoundInputs(
        indices=indices,
        mask=mask,
        step_active=np.broadcast_to(real[:, None], (num_padded, s)).copy(),
        weights=(real * num_examples).astype(np.float32),
        expected_batch=np.full(num_padded, b, np.float32),
        noise_multiplier=(real * noise_multiplier).astype(np.float32),
        client_ids=np.arange(num_padded, dtype=np.int32),
        learning_rate=np.float32(1e-3),
        secagg=secagg,
    )


@dataclasses.dataclass
class RoundSetup:
    """Everything one call of the jitted round needs, placed on the mesh."""

    workload: Workload
    spec: RoundSpec
    config: Any
    mesh: Any
    apply_fn: Callable
    round_fn: rounds.RoundFn
    state: Any
    client_data: dict
    inputs: RoundInputs
    host_inputs: RoundInputs  # the same, as numpy (the sequential baseline slices it)
    examples_per_round: int
    host_protocol_s: float | None = None


def build_round_setup(w: Workload, spec: RoundSpec, *, seed: int = 0) -> RoundSetup:
    """Config, model, server state, client data and round inputs for `spec` on its mesh."""
    config = make_config(w, spec)
    mesh = parallel.make_mesh(spec.num_devices)
    num_padded = parallel.padded_num_clients(spec.num_clients, mesh)
    num_examples = spec.steps * w.batch
    model = build_model(config.model, w.task)
    apply_fn = lambda params, x: model.apply(params, x)
    sample = jnp.zeros((1, w.resolution, w.resolution, w.channels), jnp.float32)
    params = model.init(jax.random.key(seed), sample)
    noise = NOISE_MULTIPLIER if spec.dp != 'none' else 0.0
    round_fn = rounds.build_round_fn(
        apply_fn=apply_fn,
        task=TASKS[w.task],
        config=config,
        mesh=mesh,
        expected_clients=float(spec.num_clients),
        model=model,
    )
    state = rounds.init_server_state(params, config, num_padded, mesh)
    secagg_inputs, protocol_s = (), None
    if spec.secagg:
        secagg_inputs, protocol_s = secagg_device_inputs(spec.num_clients, num_padded, seed)
    host_inputs = make_round_inputs(w, spec, num_padded, num_examples, seed, secagg_inputs, noise)
    inputs = jax.device_put(host_inputs, parallel.round_inputs_sharding(mesh, host_inputs))
    return RoundSetup(
        workload=w,
        spec=spec,
        config=config,
        mesh=mesh,
        apply_fn=apply_fn,
        round_fn=round_fn,
        state=state,
        client_data=make_client_data(w, num_padded, num_examples, mesh, seed + 1),
        inputs=inputs,
        host_inputs=host_inputs,
        examples_per_round=spec.num_clients * spec.steps * w.batch,
        host_protocol_s=protocol_s,
    )


def secagg_device_inputs(
    num_clients: int, num_padded: int, seed: int, reps: int = 3
) -> tuple[Any, float]:
    """SecAgg device inputs for all `num_clients` taking part, and the median wall time of the
    host protocol (key agreement, Shamir shares, unmasking) over `reps` runs."""
    from fedjax_med.aggregation import secagg_protocol

    participating = np.arange(num_padded) < num_clients
    times, setup = [], None
    for r in range(reps):
        t0 = time.perf_counter()
        setup = secagg_protocol.run_protocol(
            round_index=r,
            seed=seed,
            participating=participating,
            dropout=np.zeros(num_padded, bool),
        )
        times.append(time.perf_counter() - t0)
    return setup.device_inputs(), statistics.median(times)


# =================================================================================================
# The sequential baseline: a Python loop over hospitals, aggregation on the host
# =================================================================================================


class SequentialBaseline:
    """The round of `setup` done one hospital at a time, as Flower/FedJAX-style simulators do.

    Each hospital calls the same jitted single-hospital update (`client.local_update`, the
    function the vectorised round vmaps) on its own slice of the data; its delta is copied to the
    host (numpy), the host takes the weighted mean and the jitted server step applies it. Random
    keys are those of the vectorised round, so both give the same parameters.
    """

    def __init__(self, setup: RoundSetup):
        c = setup.config
        self._update = parallel.jit(
            rounds.make_client_update(
                apply_fn=setup.apply_fn,
                task=TASKS[c.task],
                config=c,
                model=build_model(c.model, c.task),
            )
        )
        self._server = server_opt.server_optimizer(c.server)
        self._server_step = parallel.jit(functools.partial(server_opt.server_step, self._server))
        hi = setup.host_inputs
        self.weights = np.asarray(hi.weights, np.float32)
        self.clients = [k for k in range(len(self.weights)) if self.weights[k] > 0]
        device = jax.devices()[0]
        # Each hospital holds its own data and batch plan (placed once, outside the timing).
        self.client_args = [
            jax.device_put(
                (
                    jax.tree.map(lambda a, k=k: a[k], setup.client_data),
                    (
                        hi.indices[k],
                        hi.mask[k],
                        hi.step_active[k],
                        hi.expected_batch[k],
                        hi.noise_multiplier[k],
                    ),
                ),
                device,
            )
            for k in self.clients
        ]
        self.client_ids = [int(hi.client_ids[k]) for k in self.clients]
        self.learning_rate = jax.device_put(hi.learning_rate, device)
        self.host_aggregation_s: list[float] = []

    @staticmethod
    def _client_inputs(args, key):
        """(data, ClientInputs) of one hospital from its placed arrays and its round key."""
        data, (indices, mask, step_active, expected_batch, noise_multiplier) = args
        return data, ClientInputs(
            indices=indices,
            mask=mask,
            step_active=step_active,
            expected_batch=expected_batch,
            noise_multiplier=noise_multiplier,
            key=key,
        )

    def compile(self, params, key) -> float:
        """Compiles the single-hospital update and the server step; returns the seconds taken."""
        t0 = time.perf_counter()
        client_key = jax.random.fold_in(jax.random.fold_in(key, rounds.KEY_TRAIN), 0)
        self._update = self._update.lower(
            params, *self._client_inputs(self.client_args[0], client_key), self.learning_rate
        ).compile()
        opt_state = self._server.init(params)
        self._server_step = self._server_step.lower(params, opt_state, params).compile()
        return time.perf_counter() - t0

    def run(self, params, opt_state, key):
        """One round from `params`: returns (new params, new server optimiser state)."""
        train_key = jax.random.fold_in(key, rounds.KEY_TRAIN)
        deltas = []
        for cid, args in zip(self.client_ids, self.client_args, strict=True):
            key_k = jax.random.fold_in(train_key, cid)
            out = self._update(params, *self._client_inputs(args, key_k), self.learning_rate)
            deltas.append(jax.device_get(out.delta))  # the hospital sends its update
        t0 = time.perf_counter()
        scale = self.weights[self.clients] / max(float(self.weights.sum()), 1e-12)
        mean_delta = jax.tree.map(
            lambda *ds: sum(np.float32(s) * d for s, d in zip(scale, ds, strict=True)), *deltas
        )
        self.host_aggregation_s.append(time.perf_counter() - t0)
        return self._server_step(params, opt_state, mean_delta)


# =================================================================================================
# Timing
# =================================================================================================


@dataclasses.dataclass
class Measurement:
    """Steady-state throughput of one round configuration."""

    name: str
    examples_per_round: int
    round_s: float  # median over the timed repetitions
    compile_s: float
    reps: int
    round_s_all: list[float]
    memory_bytes: int | None = None  # compiler's estimate: arguments + outputs + temporaries
    peak_bytes_in_use: int | None = None  # device allocator peak so far in this process
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def examples_per_s(self) -> float:
        return self.examples_per_round / self.round_s

    def to_json(self) -> dict:
        return {'examples_per_s': self.examples_per_s, **dataclasses.asdict(self)}


def peak_bytes_in_use() -> int | None:
    """The allocator's peak on device 0 (GPU/TPU); None where the backend keeps no statistics."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without statistics raise or return None
        return None
    return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def compiled_memory_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None


def timed_reps(call: Callable[[int], Any], reps: int, max_seconds: float) -> list[float]:
    """Wall times of `call(r)` (which must block until its results are ready) for r = 1, 2, ...;
    stops after `reps`, or after 2 once `max_seconds` have been spent."""
    times: list[float] = []
    for r in range(1, reps + 1):
        t0 = time.perf_counter()
        call(r)
        times.append(time.perf_counter() - t0)
        if len(times) >= 2 and sum(times) > max_seconds:
            break
    return times


def measure_round(setup: RoundSetup, name: str, mode: Mode) -> Measurement:
    """Compile (timed), one warm-up round, then the timed rounds of the vectorised round."""
    replicated = parallel.replicated(setup.mesh)
    keys = [jax.device_put(rounds.round_key(0, r), replicated) for r in range(mode.reps + 1)]
    t0 = time.perf_counter()
    compiled = setup.round_fn.fn.lower(
        setup.state, setup.client_data, setup.inputs, keys[0]
    ).compile()
    compile_s = time.perf_counter() - t0
    box = {'state': setup.state}
    setup.state = None  # donated to the round from here on

    def call(r: int) -> None:
        box['state'], metrics = compiled(box['state'], setup.client_data, setup.inputs, keys[r])
        jax.block_until_ready((box['state'], metrics))

    call(0)  # warm-up
    times = timed_reps(call, mode.reps, mode.max_seconds_per_measurement)
    extra = {}
    if setup.host_protocol_s is not None:
        extra['host_protocol_s'] = setup.host_protocol_s
    return Measurement(
        name,
        setup.examples_per_round,
        statistics.median(times),
        compile_s,
        len(times),
        times,
        compiled_memory_bytes(compiled),
        peak_bytes_in_use(),
        extra,
    )


def measure_sequential(setup: RoundSetup, name: str, mode: Mode) -> Measurement:
    """The same round as a Python loop over hospitals (see `SequentialBaseline`)."""
    seq = SequentialBaseline(setup)
    device = jax.devices()[0]
    params = jax.device_put(jax.device_get(setup.state.params), device)
    opt_state = jax.device_put(jax.device_get(setup.state.opt_state), device)
    keys = [rounds.round_key(0, r) for r in range(mode.reps + 1)]
    compile_s = seq.compile(params, keys[0])
    box = {'params': params, 'opt_state': opt_state}

    def call(r: int) -> None:
        box['params'], box['opt_state'] = seq.run(box['params'], box['opt_state'], keys[r])
        jax.block_until_ready(box['params'])

    call(0)  # warm-up
    seq.host_aggregation_s.clear()
    times = timed_reps(call, mode.reps, mode.max_seconds_per_measurement)
    extra = {'host_aggregation_s': statistics.median(seq.host_aggregation_s)}
    return Measurement(
        name,
        setup.examples_per_round,
        statistics.median(times),
        compile_s,
        len(times),
        times,
        None,
        peak_bytes_in_use(),
        extra,
    )


# =================================================================================================
# The benchmark items
# =================================================================================================


class Benchmark:
    """Runs (model, item) pairs, caching measurements that several items share."""

    def __init__(
        self,
        mode_name: str,
        mode: Mode,
        workloads: dict[str, Workload],
        *,
        seed: int = 0,
        emulate_devices: int = 0,
        argv_for_children: list[str] = (),
    ):
        self.mode_name, self.mode, self.workloads, self.seed = mode_name, mode, workloads, seed
        self.emulate_devices = emulate_devices
        self.argv_for_children = list(argv_for_children)
        self.cache: dict[tuple, Measurement] = {}
        self.models: dict[str, dict] = {}
        self.start = time.perf_counter()
        self.deadline = math.inf
        self.write: Callable[[dict], None] | None = None
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self.child_measurements: dict[str, dict] = {}  # from the emulated-device child process

    # ---- measurements (cached) -----------------------------------------------------------------
    def round(self, model: str, spec: RoundSpec) -> Measurement:
        key = (model, spec, 'vectorised')
        if key not in self.cache:
            name = f'{model}/{spec.label()}'
            print(f'  measuring {name} ...', flush=True)
            setup = build_round_setup(self.workloads[model], spec, seed=self.seed)
            self._store(key, measure_round(setup, name, self.mode))
        return self.cache[key]

    def sequential(self, model: str, spec: RoundSpec) -> Measurement:
        key = (model, spec, 'sequential')
        if key not in self.cache:
            name = f'{model}/{spec.label()}_sequential'
            print(f'  measuring {name} ...', flush=True)
            setup = build_round_setup(self.workloads[model], spec, seed=self.seed)
            self._store(key, measure_sequential(setup, name, self.mode))
        return self.cache[key]

    def _store(self, key: tuple, m: Measurement) -> None:
        """Caches, prints and saves (the JSON file always holds every finished measurement)."""
        self.cache[key] = m
        print(
            f'    {m.examples_per_s:12.1f} examples/s  round {m.round_s * 1e3:9.1f} ms  '
            f'compile {m.compile_s:6.1f} s  ({m.reps} reps)',
            flush=True,
        )
        if self.write is not None:
            self.write(self.results())

    def _out_of_time(self, name: str) -> bool:
        if time.perf_counter() <= self.deadline:
            return False
        self.skipped[name] = 'time budget spent'
        print(f'  {name}: skipped (time budget)', flush=True)
        return True

    # ---- items ---------------------------------------------------------------------------------
    def run_item(self, model: str, item: str) -> None:
        w, md = self.workloads[model], self.mode
        out = self.models.setdefault(model, {'workload': dataclasses.asdict(w)})
        base_spec = RoundSpec(md.fed_k, w.steps)
        if item == 'federated':
            fed = self.round(model, base_spec)
            central = self.round(model, RoundSpec(1, w.steps * md.fed_k))
            out['federated_over_centralized_throughput'] = (
                fed.examples_per_s / central.examples_per_s
            )
        elif item == 'dp':
            dp = self.round(model, dataclasses.replace(base_spec, dp='sgd'))
            out['dp_over_nondp_throughput'] = (
                dp.examples_per_s / self.round(model, base_spec).examples_per_s
            )
        elif item == 'dp_fast':
            reason = fast_clipping_unavailable(w)
            if reason:
                out['dp_fast_over_nondp_throughput'] = None
                self.notes[f'{model}/dp_fast'] = f'skipped: {reason}'
                print(f'  {model}/dp_fast skipped: {reason}', flush=True)
                return
            fast = self.round(model, dataclasses.replace(base_spec, dp='fast'))
            out['dp_fast_over_nondp_throughput'] = (
                fast.examples_per_s / self.round(model, base_spec).examples_per_s
            )
        elif item == 'vmap':
            spec = RoundSpec(md.vmap_k, w.steps)
            vec, seq = self.round(model, spec), self.sequential(model, spec)
            out['vmap_vs_sequential_speedup'] = vec.examples_per_s / seq.examples_per_s
        elif item == 'secagg':
            reason = secagg_unavailable()
            if reason:
                out['secagg_overhead'] = out['secagg_overhead_with_host'] = None
                self.notes[f'{model}/secagg'] = f'skipped: {reason}'
                print(f'  {model}/secagg skipped: {reason}', flush=True)
                return
            plain = self.round(model, base_spec)
            sa = self.round(model, dataclasses.replace(base_spec, secagg=True))
            host = sa.extra['host_protocol_s']
            out['secagg_overhead'] = sa.round_s / plain.round_s
            out['secagg_overhead_with_host'] = (sa.round_s + host) / plain.round_s
            out['secagg_host_protocol_s'] = host
        elif item == 'bf16':
            bf16 = self.round(model, dataclasses.replace(base_spec, dtype='bfloat16'))
            out['bf16_over_fp32_throughput'] = (
                bf16.examples_per_s / self.round(model, base_spec).examples_per_s
            )
        elif item == 'scaling_k':
            scaling = out.setdefault('scaling_k', {})
            for k in md.scaling_k:
                if self._out_of_time(f'{model}/scaling_k/{k}'):
                    continue
                try:
                    scaling[str(k)] = self.round(model, RoundSpec(k, w.steps)).examples_per_s
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at large K
                    scaling[str(k)] = None
                    self.errors[f'{model}/scaling_k/{k}'] = _error_text(e)
                    print(f'  {model} K={k} failed: {_error_text(e)}', flush=True)
        elif item == 'devices':
            out['scaling_devices'] = self.device_sweep(model)
        else:
            raise ValueError(f'unknown benchmark item {item!r}; choose from {", ".join(ITEMS)}')

    def device_sweep(self, model: str) -> dict[str, float | None]:
        """Examples/s with K = vmap_k fixed over 1, 2, 4, ... and all devices."""
        n = len(jax.devices())
        if n == 1 and self.emulate_devices > 1 and jax.default_backend() == 'cpu':
            return self.emulated_device_sweep(model)
        counts = sorted({2**i for i in range(int(math.log2(n)) + 1)} | {n})
        out: dict[str, float | None] = {}
        for d in counts:
            if self._out_of_time(f'{model}/devices/{d}'):
                continue
            spec = RoundSpec(self.mode.vmap_k, self.workloads[model].steps, num_devices=d)
            try:
                out[str(d)] = self.round(model, spec).examples_per_s
            except Exception as e:  # noqa: BLE001
                out[str(d)] = None
                self.errors[f'{model}/devices/{d}'] = _error_text(e)
        return out

    def emulated_device_sweep(self, model: str) -> dict[str, float | None]:
        """The device sweep in a child process with N fake CPU devices (exercises the sharded
        round; on a CPU the fake devices share the same cores, so timings are not speed-ups)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'devices.json')
            env = dict(
                os.environ,
                JAX_PLATFORMS='cpu',
                XLA_FLAGS=(
                    os.environ.get('XLA_FLAGS', '')
                    + f' --xla_force_host_platform_device_count={self.emulate_devices}'
                ).strip(),
            )
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                *self.argv_for_children,
                f'--model={model}',
                '--only=devices',
                '--emulate_devices=0',
                f'--json={path}',
                '--budget_s=100000',
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f'emulated device sweep failed:\n{done.stderr[-2000:]}')
            with open(path) as f:
                child = json.load(f)
        self.notes[f'{model}/devices'] = (
            f'{self.emulate_devices} emulated CPU devices sharing '
            'the same cores: checks the sharded path, not speed'
        )
        self.child_measurements.update(
            {
                f'emulated{self.emulate_devices}/{name}': m
                for name, m in child['measurements'].items()
            }
        )
        return child['models'][model].get('scaling_devices', {})

    # ---- the run -------------------------------------------------------------------------------
    def run(
        self,
        plan: list[tuple[str, str]],
        budget_s: float,
        write: Callable[[dict], None] | None = None,
    ) -> dict:
        """Runs the plan in order; items that start after `budget_s` seconds are skipped."""
        self.start, self.write = time.perf_counter(), write
        self.deadline = self.start + budget_s
        for model, item in plan:
            name = f'{model}/{item}'
            print(f'[{time.perf_counter() - self.start:6.1f} s] {name}', flush=True)
            if self._out_of_time(name):
                continue
            try:
                self.run_item(model, item)
            except KeyboardInterrupt:  # e.g. `timeout --signal=INT`: report what was measured
                self.skipped[name] = 'interrupted'
                print(f'  {name}: interrupted; reporting what was measured', flush=True)
                break
            except Exception as e:  # noqa: BLE001 - one failure must not lose the other numbers
                self.errors[name] = _error_text(e)
                print(f'  {name} failed: {_error_text(e)}', flush=True)
            if write is not None:
                write(self.results())
        return self.results()

    def results(self) -> dict:
        """The JSON report: the first model's ratios at the top level, every model under
        'models', every measurement under 'measurements'."""
        primary = next(iter(self.models.values()), {})
        out: dict[str, Any] = {
            'mode': self.mode_name,
            'device': jax.devices()[0].device_kind,
            'platform': jax.default_backend(),
            'num_devices': len(jax.devices()),
            'jax_version': jax.__version__,
            'python': platform.python_version(),
            'matmul_precision': str(jax.config.values.get('jax_default_matmul_precision')),
            'primary_model': next(iter(self.models), None),
        }
        for key in RATIO_KEYS:
            out[key] = primary.get(key)
        out['scaling_k'] = primary.get('scaling_k', {})
        out['scaling_devices'] = primary.get('scaling_devices', {})
        out['peak_memory_bytes'] = peak_bytes_in_use()
        measurements = {
            **{m.name: m.to_json() for m in self.cache.values()},
            **self.child_measurements,
        }
        out['compile_time_s'] = {name: m['compile_s'] for name, m in measurements.items()}
        out['models'] = self.models
        out['measurements'] = measurements
        out['notes'], out['skipped'], out['errors'] = self.notes, self.skipped, self.errors
        out['total_time_s'] = time.perf_counter() - self.start
        return out


def _error_text(e: BaseException) -> str:
    text = f'{type(e).__name__}: {e}'
    return text if len(text) < 600 else text[:600] + ' ...'


# =================================================================================================
# Report
# =================================================================================================


def format_table(results: dict) -> str:
    """A readable summary of the measurements and ratios."""
    lines = [
        f'device: {results["device"]} x{results["num_devices"]} ({results["platform"]}), '
        f'jax {results["jax_version"]}, mode {results["mode"]}',
        '',
    ]
    lines.append(
        f'{"measurement":44s} {"ex/round":>9s} {"round ms":>10s} {"examples/s":>12s} '
        f'{"compile s":>9s} {"memory MiB":>10s}'
    )
    for name, m in results['measurements'].items():
        mem = m['memory_bytes'] or m['peak_bytes_in_use']
        mem_text = f'{mem / 2**20:10.1f}' if mem else f'{"-":>10s}'
        lines.append(
            f'{name:44s} {m["examples_per_round"]:9d} {m["round_s"] * 1e3:10.1f} '
            f'{m["examples_per_s"]:12.1f} {m["compile_s"]:9.1f} {mem_text}'
        )
    for model, out in results['models'].items():
        lines += ['', f'ratios ({model}):']
        for key in (*RATIO_KEYS, 'secagg_host_protocol_s'):
            if key in out:
                value = out[key]
                lines.append(f'  {key:40s} ' + ('n/a' if value is None else f'{value:8.3f}'))
        for key in ('scaling_k', 'scaling_devices'):
            if out.get(key):
                text = ', '.join(
                    f'{k}: ' + ('n/a' if v is None else f'{v:.1f}') for k, v in out[key].items()
                )
                lines.append(f'  {key:40s} examples/s  {text}')
    peak = results['peak_memory_bytes']
    lines += [
        '',
        'peak device memory: '
        + ('n/a (backend keeps no statistics)' if peak is None else f'{peak / 2**30:.2f} GiB'),
    ]
    for title, label in (('notes', 'note'), ('skipped', 'skipped'), ('errors', 'ERROR')):
        for name, text in results[title].items():
            lines.append(f'{label}: {name}: {text}')
    lines.append(f'total {results["total_time_s"]:.1f} s')
    return '\n'.join(lines)


def write_json(path: str, results: dict) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(clean(results), f, indent=2)
    os.replace(tmp, path)


# =================================================================================================
# Command line
# =================================================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        '--quick',
        action='store_true',
        help='CPU-sized run (small CNN at 32 px, < 3 minutes on 2 cores)',
    )
    p.add_argument('--tiny', action='store_true', help=argparse.SUPPRESS)  # tests: seconds
    p.add_argument('--json', default='', help='write the results to this JSON file')
    p.add_argument(
        '--model',
        default='',
        help='comma-separated models (resnet18, resnet_small, unet); default: the '
        "mode's plan (full: resnet18 then unet; quick: resnet_small)",
    )
    p.add_argument('--only', default='', help=f'comma-separated subset of: {", ".join(ITEMS)}')
    p.add_argument('--resolution', type=int, help='image side in pixels')
    p.add_argument('--batch', type=int, help='per-step batch of one hospital')
    p.add_argument('--steps', type=int, help='local steps of one hospital per round')
    p.add_argument('--width', type=int, help='resnet_small / unet width')
    p.add_argument('--depth', type=int, help='resnet_small stages / unet levels')
    p.add_argument('--dp_chunk_size', type=int, help='config.dp.chunk_size of the DP round')
    p.add_argument(
        '--clients_in_parallel',
        type=int,
        help='config.clients_in_parallel of every round (0 = vmap on accelerators, '
        '1 on CPU; 1 = one hospital at a time inside the round; n = chunks of n)',
    )
    p.add_argument('--fed_k', type=int, help='hospitals of the federated/DP/SecAgg/bf16 rounds')
    p.add_argument('--vmap_k', type=int, help='hospitals of the vmap-vs-sequential comparison')
    p.add_argument('--scaling_k', default='', help='comma-separated K values of the K sweep')
    p.add_argument('--reps', type=int, help='timed repetitions per measurement')
    p.add_argument('--budget_s', type=float, help='skip what is left after this many seconds')
    p.add_argument(
        '--emulate_devices',
        type=int,
        default=0,
        help='CPU with one device: run the device sweep in a child process with this '
        'many fake devices (checks the sharded path; timings are not speed-ups)',
    )
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


def configure(
    args: argparse.Namespace,
) -> tuple[str, Mode, dict[str, Workload], list[tuple[str, str]], list[str]]:
    """Mode, workloads, plan, and the flags a child process must repeat, from the flags."""
    mode_name = 'tiny' if args.tiny else 'quick' if args.quick else 'full'
    mode = MODES[mode_name]
    if args.fed_k or args.vmap_k or args.scaling_k or args.reps or args.budget_s:
        mode = dataclasses.replace(
            mode,
            fed_k=args.fed_k or mode.fed_k,
            vmap_k=args.vmap_k or mode.vmap_k,
            scaling_k=(
                tuple(int(k) for k in args.scaling_k.split(','))
                if args.scaling_k
                else mode.scaling_k
            ),
            reps=args.reps or mode.reps,
            budget_s=args.budget_s if args.budget_s is not None else mode.budget_s,
        )
    overrides = {
        name: getattr(args, name)
        for name in (
            'resolution',
            'batch',
            'steps',
            'width',
            'depth',
            'dp_chunk_size',
            'clients_in_parallel',
        )
        if getattr(args, name) is not None
    }
    presets = WORKLOADS[mode_name]
    models = [m for m in args.model.split(',') if m]
    for m in models:
        if m not in presets:
            raise SystemExit(f'--model={m}: choose from {", ".join(presets)} in {mode_name} mode')
    items = [i for i in args.only.split(',') if i] or list(ITEMS)
    for i in items:
        if i not in ITEMS:
            raise SystemExit(f'--only={i}: choose from {", ".join(ITEMS)}')
    if models:
        plan = [(m, i) for m in models for i in ITEMS if i in items]
    else:
        plan = [(m, i) for m, i in PLANS[mode_name] if i in items]
    workloads = {m: dataclasses.replace(presets[m], **overrides) for m, _ in plan}
    child_flags = [f'--{n}={v}' for n, v in overrides.items()]
    child_flags += ['--tiny'] if args.tiny else ['--quick'] if args.quick else []
    child_flags += [f'--vmap_k={mode.vmap_k}', f'--reps={mode.reps}', f'--seed={args.seed}']
    return mode_name, mode, workloads, plan, child_flags


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    mode_name, mode, workloads, plan, child_flags = configure(args)
    print(
        f'fedjax_med benchmark ({mode_name}): {jax.devices()[0].device_kind} '
        f'x{len(jax.devices())}, jax {jax.__version__}',
        flush=True,
    )
    for m, w in workloads.items():
        print(f'  {m}: {w}', flush=True)
    bench = Benchmark(
        mode_name,
        mode,
        workloads,
        seed=args.seed,
        emulate_devices=args.emulate_devices,
        argv_for_children=child_flags,
    )
    write = functools.partial(write_json, args.json) if args.json else None
    # Tiny mode checks the machinery in tests: compile fast, time nothing that matters.
    previous = bool(getattr(jax.config, 'values', {}).get('jax_disable_most_optimizations'))
    jax.config.update('jax_disable_most_optimizations', mode_name == 'tiny' or previous)
    try:
        results = bench.run(plan, mode.budget_s, write)
    finally:
        jax.config.update('jax_disable_most_optimizations', previous)
    print('\n' + format_table(results), flush=True)
    if args.json:
        write_json(args.json, results)
        print(f'wrote {args.json}', flush=True)
    return results


if __name__ == '__main__':
    main()
