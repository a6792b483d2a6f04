"""Where a small-model CPU round goes, against what this machine can compute at all.

  python launch/roofline.py --json=/tmp/roofline.json         # about a minute on 2 cores
  python launch/roofline.py --config=configs/chestxray14.py:synthetic --local_epochs=0.5 --dp

The workload is the peer comparison's (`launch/peer_benchmark.py`: `chestxray14.py:synthetic`,
five hospitals, 0.5 local epochs, batch 32). Measured in one process, each the median of
`--reps` timed calls after a compiled warm-up:

  round            the run's jitted round (`experiment.build`, `planner.prepare`, `round_fn`);
  step             one local step alone: the same model's loss, gradient (or DP-SGD gradient with
                   `--dp`) and Adam update at the same batch, jitted by itself;
  forward/backward the forward pass alone and the gradient alone, at that batch;
  matmul peak      a 1024 x 1024 float32 matmul: what XLA:CPU sustains on this machine;
  torch step       (when torch is installed) the PyTorch twin's step (`launch/peer_torch.py`) at
                   the same batch and thread count, oneDNN's kernels on the same convolutions.

FLOPs come from XLA's own cost analysis of the step's compiled program (`cost_analysis()`; the
round's `lax.scan`/`while` bodies are counted once by XLA, so the round's FLOPs are the step's
times the round's real steps). Reported: GFLOP/s of each, the round's time over (steps x step
time) -- the round's own overhead beyond its steps -- and the step's GFLOP/s as a fraction of the
matmul peak. What it shows on this CPU is recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [REPO]:  # first, ahead of any installed package named `configs`
    sys.path.insert(0, REPO)  # `configs` is a folder of the repository, not installed

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined only when the script runs, so that importing it (the
    tests) adds nothing to absl's global flags, which other modules share."""
    config_flags.DEFINE_config_file(
        'config',
        os.path.join(REPO, 'configs', 'chestxray14.py') + ':synthetic',
        'Config (:variant).',
    )
    flags.DEFINE_float('local_epochs', 0.5, 'config.local.epochs of the round.')
    flags.DEFINE_bool('dp', False, 'Sample-level DP-SGD (Poisson, per-example clipping).')
    flags.DEFINE_integer('reps', 5, 'Timed calls per measurement (median).')
    flags.DEFINE_integer('threads', 2, 'torch.set_num_threads for the torch step.')
    flags.DEFINE_string('json', None, 'Also write the JSON report here.')


def _median_s(fn, reps: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compiled and warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flops(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per computation
    return float(cost.get('flops', 0.0))


def step_functions(exp, batch_size: int, dp: bool):
    """(forward, gradient, step) on one batch of hospital 0, each jitted alone; `step` is the
    round's own client step (`rounds.make_gradient_fn` + Adam), so its FLOPs are the round's."""
    import jax
    import jax.numpy as jnp
    import optax

    from fedjax_med import rounds

    config = exp.config
    from fedjax_med.data import storage

    batch = storage.decode(
        {
            'image': exp.client_data['image'][0, :batch_size],
            'label': exp.client_data['label'][0, :batch_size],
        }
    )
    mask = jnp.ones((batch_size,), jnp.float32)
    params = exp.params
    grad_fn = rounds.make_gradient_fn(exp.apply_fn, exp.task, config.dp, exp.model)
    optimizer = optax.adam(config.local.learning_rate)
    opt_state = optimizer.init(params)
    key = jax.random.key(0)
    sigma = float(exp.privacy.noise_multipliers[0]) if dp else 0.0

    def loss(p):
        return jnp.mean(exp.task.per_example_loss(exp.apply_fn(p, batch['image']), batch['label']))

    forward = jax.jit(lambda p: exp.apply_fn(p, batch['image']))
    gradient = jax.jit(jax.grad(loss))

    @jax.jit
    def step(p, s):
        grads, _ = grad_fn(p, batch, mask, key, float(batch_size), sigma)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    return (forward, (params,)), (gradient, (params,)), (step, (params, opt_state))


def matmul_peak(reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    s = _median_s(lambda: f(a), reps)
    return {'n': n, 's': s, 'gflops': 2 * n**3 / s / 1e9}


def torch_step(exp, batch_size: int, threads: int, reps: int) -> dict | None:
    """The PyTorch twin's non-private step at the same batch, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    import peer_benchmark
    import peer_torch

    os.environ.setdefault('ONEDNN_MAX_CPU_ISA', 'AVX2')  # see peer_benchmark: AVX-512 segfault
    torch.set_num_threads(threads)
    data = exp.data.clients_train[0]
    from fedjax_med.models import NUM_OUTPUTS

    arch = peer_benchmark.twin_architecture(
        exp.config.model, NUM_OUTPUTS[exp.config.task], data['image'].shape[-1]
    )
    model = peer_torch.build_twin(arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=exp.config.local.learning_rate)
    images, labels = peer_torch.to_tensors(
        {'image': data['image'][:batch_size], 'label': data['label'][:batch_size]}
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def one() -> None:
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()

    one()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return {'s': statistics.median(times), 'threads': threads}


def measure(config, reps: int, threads: int) -> dict:
    """Every measurement of the module docstring, as one JSON-able dict."""
    import jax
    import numpy as np

    from fedjax_med import experiment, parallel

    exp = experiment.build(config, parallel.make_mesh(num_devices=1))
    k = exp.num_clients
    steps = int(np.sum(exp.steps[:k]))
    prepared = exp.planner.prepare(0)
    state = exp.state

    def one_round():
        nonlocal state
        state, metrics = exp.round_fn(state, exp.client_data, prepared.inputs, key)
        return state, metrics

    key = exp.round_key(config.seed, 0)
    round_s = _median_s(one_round, reps)
    batch = int(config.local.batch_size)
    out = {
        'device': jax.devices()[0].device_kind,
        'hospitals': k,
        'batch': batch,
        'steps_per_round': steps,
        'num_params': int(exp.num_params),
        'dp': config.dp.mode == 'sample',
        'round_s': round_s,
    }
    for name, (fn, args) in zip(
        ('forward', 'gradient', 'step'), step_functions(exp, batch, out['dp']), strict=True
    ):
        s = _median_s(lambda fn=fn, args=args: fn(*args), max(reps, 10))
        flops = _flops(fn, *args)
        out[name] = {'s': s, 'gflop': flops / 1e9, 'gflops': flops / s / 1e9}
    out['matmul_peak'] = matmul_peak(reps)
    out['round_gflops'] = out['step']['gflop'] * steps / round_s
    out['round_over_steps'] = round_s / (steps * out['step']['s'])
    out['step_fraction_of_matmul_peak'] = out['step']['gflops'] / out['matmul_peak']['gflops']
    ts = torch_step(exp, batch, threads, max(reps, 10))
    if ts is not None:
        ts['gflops'] = out['step']['gflop'] / ts['s']  # same network, same FLOPs
        out['torch_step'] = ts
        out['step_speed_vs_torch'] = ts['s'] / out['step']['s']
    return out


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config = FLAGS.config
    config.local.epochs = FLAGS.local_epochs
    config.tensorboard = False
    if FLAGS.dp:
        config.dp.mode = 'sample'
        config.local.sampling = 'poisson'
        if not config.dp.noise_multiplier and not config.dp.target_epsilon:
            config.dp.noise_multiplier = 1.0
    out = measure(config, FLAGS.reps, FLAGS.threads)
    text = json.dumps(out, indent=1)
    print(text)
    if FLAGS.json:
        with open(FLAGS.json, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # peer_benchmark, peer_torch
    define_flags()
    app.run(main)
