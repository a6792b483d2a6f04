"""Poisoning attacks against the aggregators, on the small synthetic chest X-ray twin: f = 0, 1, 2
malicious hospitals of 5 x attacks (sign_flip, scale, backdoor, label_flip) x aggregators
(weighted FedAvg, median, trimmed_mean, krum, multi_krum, norm_bound), each run's final global
mean AUROC and, for the backdoor, `eval/backdoor_success` (and, for Krum, in how many rounds
each hospital's update was selected).

  python launch/poisoning.py --out=runs/poisoning            # the grid (about 15 min on 2 cores)
  python launch/poisoning.py --out=runs/poisoning16 --hospitals=16 --trim_fraction=0.125 \
      --krum_byzantine=2 --attacks=sign_flip,backdoor         # the same 1,500 images over 16
  python launch/poisoning.py --out=/tmp/p --rounds=2 --aggregators=weighted,krum --f=1 \\
      --attacks=scale                                        # a quick look
  python launch/poisoning.py --out=/tmp/p --probe_norms      # honest update norms (norm_bound)

The set-up (`base_config`): `configs/chestxray14.py:synthetic` reduced to 5 hospitals (Dirichlet
0.5), 1,500 training and 500 test images at 16 px, a width-8 ResNet of 2 stages, `--rounds` = 10
rounds of `--epochs` = 2 local epochs (Adam, 1e-2, cosine), no DP, no SecAgg; about 14 s a run.
The malicious hospitals are hospitals 0 .. f-1 (attacks.py);
sign_flip and scale use `attack.scale` = 10, the backdoor stamps half of each malicious batch with
a 3-pixel trigger and sets 'Mass' on. The defences: trimmed_mean drops 1 value of 5 from each
end (`server.trim_fraction=0.2`); krum / multi_krum assume f = 1 (`server.krum_byzantine=1`, the
largest f that 5 hospitals allow, n >= 2f + 3), also against f = 2; multi_krum averages n - f = 4
updates; norm_bound clips at `--norm_bound` = 3 (about the median honest update norm over the
rounds of a clean run: 5.6 in round 1, 0.8 in round 10; `--probe_norms` prints them).
With f = 0 no hospital attacks, so one run per aggregator (mode 'backdoor',
which also measures how often the clean model calls a triggered image 'Mass') is every attack's
f = 0 baseline.

Everything runs in one process: the federation is generated once per seed and every run is
`experiment.build` on it (the run's own set-up: same round, same evaluation), its rounds, and one
evaluation after the last round. A round whose update or parameters are not finite ends the run
as diverged (`health.RoundMonitor`), reported as such. Results go to OUT/poisoning.json (written
after every run; a rerun skips the runs it holds) and OUT/poisoning.md (the table).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` is a folder of the repository, not an installed package

AGGREGATORS = ('weighted', 'median', 'trimmed_mean', 'krum', 'multi_krum', 'norm_bound')
ATTACKS = ('sign_flip', 'scale', 'backdoor', 'label_flip')

_OUT = flags.DEFINE_string('out', None, 'Folder for poisoning.json and poisoning.md.')
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Rounds per run.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (data, initialisation, batches).')
_F = flags.DEFINE_list('f', ['0', '1', '2'], 'Numbers of malicious hospitals (of --hospitals).')
_HOSPITALS = flags.DEFINE_integer('hospitals', 5, 'Hospitals of the federation (data.num_clients).')
_TRIM = flags.DEFINE_float('trim_fraction', 0.2, 'server.trim_fraction of trimmed_mean.')
_KRUM_F = flags.DEFINE_integer('krum_byzantine', 1, 'server.krum_byzantine of krum / multi_krum.')
_ATTACKS = flags.DEFINE_list('attacks', list(ATTACKS), 'Attacks (attack.mode).')
_AGGREGATORS = flags.DEFINE_list('aggregators', list(AGGREGATORS), 'server.aggregator values.')
_NORM_BOUND = flags.DEFINE_float('norm_bound', 3.0, 'server.norm_bound of norm_bound.')
_SCALE = flags.DEFINE_float('scale', 10.0, 'attack.scale of sign_flip and scale.')
_EPOCHS = flags.DEFINE_float('epochs', 2.0, 'Local epochs per round.')
_PROBE = flags.DEFINE_bool(
    'probe_norms', False, "Print each hospital's honest update norm per round and stop."
)


def base_config(seed: int, rounds: int):
    """The reduced synthetic chest X-ray twin of the grid (see the module docstring)."""
    from configs import chestxray14

    c = chestxray14.get_config('synthetic')
    c.seed = seed
    c.data.num_clients = _HOSPITALS.value
    c.data.resolution = 16
    c.data.num_train = 1500
    c.data.num_test = 500
    c.model.depth = 2
    c.num_rounds = rounds
    c.local.epochs = _EPOCHS.value
    c.eval_every = rounds
    c.eval_case_metrics = False
    c.tensorboard = False
    c.server.trim_fraction = _TRIM.value
    c.server.krum_byzantine = _KRUM_F.value
    c.server.norm_bound = _NORM_BOUND.value
    c.attack.scale = _SCALE.value
    return c


def grid(fs, attacks, aggregators):
    """(f, attack mode, aggregator) of every run: f = 0 once per aggregator (see above)."""
    for f in fs:
        for mode in ('backdoor',) if f == 0 else attacks:
            for aggregator in aggregators:
                yield f, mode, aggregator


def run_one(config, data) -> dict:
    """One run on the loaded federation: its rounds, then the evaluation of the last model."""
    import optax

    from fedjax_med import experiment, health, parallel

    t0 = time.perf_counter()
    exp = experiment.build(config, parallel.make_mesh(1), data=data)
    monitor = health.RoundMonitor(config, float(optax.tree.norm(exp.params)), [], primary=False)
    state, diverged, excluded = exp.state, None, 0
    picked = [0] * exp.num_clients  # (multi-)Krum: the rounds each hospital's update was used
    for r in range(config.num_rounds):
        prepared = exp.planner.prepare(r)
        state, m = exp.round_fn(
            state, exp.client_data, prepared.inputs, exp.round_key(config.seed, r)
        )
        m = parallel.to_host(m)
        excluded += int(m.get('train/excluded_updates', 0))
        if 'krum/selected' in m:  # every hospital takes part: slot k is hospital k
            picked = [p + int(s > 0) for p, s in zip(picked, m['krum/selected'], strict=False)]
        try:
            monitor.check(r, m)
        except FloatingPointError as e:
            diverged = f'round {r + 1}: {str(e).split(". ")[0]}'
            break
    out = {'rounds': config.num_rounds, 'excluded_updates': excluded, 'diverged': diverged}
    if config.server.aggregator in ('krum', 'multi_krum'):
        out['krum_rounds_selected'] = picked
    if diverged is None:
        row = exp.evaluator(state.params)
        out['mean_auroc'] = float(row['eval/mean_auroc'])
        if 'eval/backdoor_success' in row:
            out['backdoor_success'] = float(row['eval/backdoor_success'])
    out['seconds'] = time.perf_counter() - t0
    return out


def probe_norms(seed: int) -> None:
    """Each hospital's honest update norm in every round of a clean FedAvg run."""
    import numpy as np

    from fedjax_med import experiment, parallel
    from fedjax_med.aggregation import fedavg, norm_bound, plain, registry
    from fedjax_med.aggregation.base import Combined
    from fedjax_med.data import sources

    class Probe(plain.Plain):
        def combine(self, deltas, inputs, key, clip_norm):
            out = super().combine(deltas, inputs, key, clip_norm)
            return Combined(
                out.mean_delta, clip_norm, {'probe/norms': norm_bound.update_norms(deltas)}
            )

    registry.register(
        'probe', lambda args: Probe(fedavg.weighted_mean), weights=fedavg.example_weights
    )
    config = base_config(seed, _ROUNDS.value)
    config.server.aggregator = 'probe'
    exp = experiment.build(
        config, parallel.make_mesh(1), data=sources.load_federated(config.data, seed)
    )
    state = exp.state
    for r in range(config.num_rounds):
        prepared = exp.planner.prepare(r)
        state, m = exp.round_fn(state, exp.client_data, prepared.inputs, exp.round_key(seed, r))
        norms = np.asarray(parallel.to_host(m)['probe/norms'])[: exp.num_clients]
        print(f'round {r + 1}: update norms {np.round(norms, 3).tolist()}', flush=True)


def table(results: dict, fs, attacks, aggregators, seeds) -> str:
    """The markdown table: one row per (attack, f), one column per aggregator; a cell is the mean
    over seeds of the final mean AUROC (and backdoor success), 'div.' when a run diverged."""

    def cell(f, mode, aggregator, key):
        values = []
        for seed in seeds:
            res = results.get(run_key(seed, f, mode, aggregator))
            if res is None:
                return '–'
            if res['diverged']:
                return 'div.'
            values.append(res.get(key, math.nan))
        return f'{sum(values) / len(values):.3f}'

    lines = [
        '| attack | f | ' + ' | '.join(aggregators) + ' |',
        '| --- | --- | ' + ' | '.join('---' for _ in aggregators) + ' |',
    ]
    for f in fs:
        for mode in ('none',) if f == 0 else attacks:
            run_mode = 'backdoor' if f == 0 else mode
            cells = []
            for a in aggregators:
                text = cell(f, run_mode, a, 'mean_auroc')
                if run_mode == 'backdoor' and text not in ('div.', '–'):
                    text += f' / {cell(f, run_mode, a, "backdoor_success")}'
                cells.append(text)
            label = 'none (f = 0)' if f == 0 else mode
            lines.append(f'| {label} | {f} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def run_key(seed, f, mode, aggregator) -> str:
    return f'seed={seed} f={f} attack={mode} aggregator={aggregator}'


def main(argv) -> None:
    del argv
    from fedjax_med import parallel
    from fedjax_med.data import sources
    from fedjax_med.validate import validate

    parallel.enable_compilation_cache()
    seeds = [int(s) for s in _SEEDS.value]
    if _PROBE.value:
        probe_norms(seeds[0])
        return
    if not _OUT.value:
        raise app.UsageError('--out is required.')
    fs = [int(f) for f in _F.value]
    os.makedirs(_OUT.value, exist_ok=True)
    path = os.path.join(_OUT.value, 'poisoning.json')
    results = json.load(open(path)) if os.path.exists(path) else {}
    started = time.perf_counter()
    for seed in seeds:
        data = None
        for f, mode, aggregator in grid(fs, _ATTACKS.value, _AGGREGATORS.value):
            key = run_key(seed, f, mode, aggregator)
            if key in results:
                continue
            config = base_config(seed, _ROUNDS.value)
            config.server.aggregator = aggregator
            config.attack.mode, config.attack.num_malicious = mode, f
            validate(config)
            if data is None:
                data = sources.load_federated(config.data, seed)
            results[key] = run_one(config, data)
            print(key, json.dumps(results[key]), flush=True)
            with open(path, 'w') as fh:
                json.dump(results, fh, indent=1, sort_keys=True)
    text = table(results, fs, _ATTACKS.value, _AGGREGATORS.value, seeds)
    with open(os.path.join(_OUT.value, 'poisoning.md'), 'w') as fh:
        fh.write(text + '\n')
    print(text)
    print(f'{time.perf_counter() - started:.0f} s', flush=True)


if __name__ == '__main__':
    app.run(main)
