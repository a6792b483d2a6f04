"""Jitted, batched evaluation of one model or of one model per hospital.

A split is padded to whole batches ([num_batches, batch, ...] plus an example mask) once, on the
device, in its storage dtypes (data/storage.py); `lax.map` decodes and runs one batch at a time
and the host adds up the statistics (`unbatch_stats`). Per-example arrays (`PER_EXAMPLE`: CXR
probabilities, BraTS packed binary predictions for per-case metrics) come back unsummed, in the
split's row order followed by the padding.

`Evaluator` is what a run uses: the global test split and every hospital's own test split on
the devices, the jitted evaluation functions, and `evaluator(params) -> metrics row`.
"""

import math

import jax
import numpy as np

from fedjax_med import attacks, parallel
from fedjax_med.data import storage
from fedjax_med.tasks import Task

# Statistics kept per example ([nb, bs, ...] -> [nb * bs, ...]) instead of summed over batches.
PER_EXAMPLE = ('probs', 'labels', 'mask', 'pred_bits')


def batch_split(split: dict, batch_size: int, *, shrink: bool = True) -> dict:
    """{'image', 'label'} arrays [N, ...] -> [nb, bs, ...] (same dtypes) plus float32 'mask'
    [nb, bs] (numpy).

    With `shrink`, a split smaller than one batch gets a smaller batch (less padding).
    """
    n = len(split['image'])
    bs = max(1, min(batch_size, n)) if shrink else batch_size
    nb = max(1, math.ceil(n / bs))
    out = {}
    for key in ('image', 'label'):
        x = np.asarray(split[key])
        padded = np.zeros((nb * bs, *x.shape[1:]), x.dtype)
        padded[:n] = x
        out[key] = padded.reshape(nb, bs, *x.shape[1:])
    mask = np.zeros(nb * bs, np.float32)
    mask[:n] = 1.0
    out['mask'] = mask.reshape(nb, bs)
    return out


def pad_batches(batched: dict, multiple: int) -> dict:
    """A batched split with all-masked batches appended, up to a multiple of `multiple` batches
    (so the batches split evenly over devices)."""
    nb = next(iter(batched.values())).shape[0]
    extra = -nb % multiple
    return {
        k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in batched.items()
    }


def over_devices(eval_fn, mesh):
    """Jitted (params, batched split) -> statistics, with the split's batches sharded over the
    mesh (pad them with `pad_batches`): each device evaluates its share."""
    return parallel.jit(parallel.shard_clients(eval_fn, (None, 0), mesh))


def stack_splits(splits: list[dict], batch_size: int) -> dict:
    """One batched split per hospital, padded to the same number of batches: leading axis K."""
    longest = max(len(s['image']) for s in splits)
    bs = max(1, min(batch_size, longest))
    nb = max(1, math.ceil(longest / bs))
    batched = [batch_split(s, bs, shrink=False) for s in splits]
    out = {}
    for key in ('image', 'label', 'mask'):
        arrays = []
        for b in batched:
            x = b[key]
            pad = np.zeros((nb - x.shape[0], *x.shape[1:]), x.dtype)
            arrays.append(np.concatenate([x, pad]))
        out[key] = np.stack(arrays)
    return out


def build_eval_fn(apply_fn, task: Task, *, example_outputs: bool = False):
    """Returns (params, batched split) -> stacked per-batch statistics (pure; jit the caller).

    With `example_outputs`, the statistics also hold the task's per-example outputs
    (`Task.example_outputs`, for `Task.split_metrics`)."""
    extra = task.example_outputs if example_outputs else None

    def evaluate(params, split):
        def one_batch(b):
            b = storage.decode(b)
            logits = apply_fn(params, b['image'])
            stats = task.eval_stats(logits, b['label'], b['mask'])
            return {**stats, **extra(logits)} if extra is not None else stats

        return jax.lax.map(one_batch, split)

    return evaluate


def unbatch_stats(stats: dict) -> dict:
    """[nb, ...] per-batch statistics -> one split's statistics (numpy)."""
    out = {}
    for key, value in stats.items():
        v = np.asarray(value)
        out[key] = v.reshape(-1, *v.shape[2:]) if key in PER_EXAMPLE else v.sum(0)
    return out


def per_hospital(eval_fn, *, params_axis, data_axis, mesh=None):
    """Jitted `eval_fn` for every hospital (params and/or data carry the client axis); each
    device evaluates its own hospitals. One shared model sees all hospitals' batches at once
    (vmap folds them into the batch); per-hospital models go one at a time, since vmapping them
    makes grouped convolutions (slow, and mis-split by XLA's partitioner across devices)."""
    one_at_a_time = 0 if params_axis is None else 1
    return parallel.jit(
        parallel.map_clients(eval_fn, (params_axis, data_axis), one_at_a_time, mesh)
    )


def split_hospitals(stats) -> list[dict]:
    """Stacked statistics [K, nb, ...] -> one split's statistics per hospital."""
    stats = jax.tree.map(np.asarray, stats)
    k = next(iter(stats.values())).shape[0]
    return [unbatch_stats({key: v[i] for key, v in stats.items()}) for i in range(k)]


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


class Evaluator:
    """A run's evaluation: `evaluator(params)` -> the metrics row's eval/ and hospital/ entries.

    eval/<metric> is on the global test split (with the task's per-case metrics,
    `Task.split_metrics`, unless `case_metrics` is off); hospital/<name>/<main metric> on each
    hospital's own test split, and eval/own_<main metric> their mean. In local mode each
    hospital's own model is evaluated (eval/ is the mean over the hospitals' models). With
    `backdoor` (the attack simulation's backdoor, attacks.py) the global test split is also
    evaluated with the trigger stamped on every image, for eval/backdoor_success.

    Args:
      test: the global test split (arrays of the split; 'image', 'label' and metadata).
      hospital_tests: each hospital's own test split.
      names: the hospitals' names (for the hospital/ keys).
      local_mode: params carry a leading client axis (one model per hospital).
      backdoor: (target finding index, trigger size in pixels) of a backdoor attack, or None
        (one shared model only).
    """

    def __init__(
        self,
        *,
        apply_fn,
        task: Task,
        mesh,
        test: dict,
        hospital_tests: list[dict],
        names: list[str],
        local_mode: bool,
        batch_size: int,
        case_metrics: bool,
        backdoor: tuple[int, int] | None = None,
    ):
        self.task, self.names, self.local_mode = task, list(names), local_mode
        test_batched = batch_split(test, batch_size)
        # Labels and metadata (case, slice, patch, patient ids) of the global test split, on the
        # host, for the task's per-case metrics.
        self.test_host = {k: v for k, v in test.items() if k != 'image'} if case_metrics else None
        if local_mode:  # every hospital's model sees the whole split
            self.test = parallel.put_replicated(test_batched, mesh)
        else:  # one model: each device evaluates its share of the batches
            self.test = parallel.put_clients(pad_batches(test_batched, mesh.devices.size), mesh)
        # Each hospital's own test split lives on the device that holds its training data. A
        # deployment's server (fedjax_med/deploy) holds none: it gives no hospital splits.
        self.hospital_test = None
        if hospital_tests:
            self.hospital_test = parallel.put_clients(
                parallel.pad_client_axis(
                    stack_splits(hospital_tests, batch_size),
                    parallel.padded_num_clients(len(hospital_tests), mesh),
                ),
                mesh,
            )
        eval_fn = build_eval_fn(apply_fn, task)
        # The global test split also brings back what per-case (per-patient) metrics need.
        eval_fn_cases = (
            build_eval_fn(apply_fn, task, example_outputs=True) if case_metrics else eval_fn
        )
        if local_mode:
            self.eval_global = per_hospital(eval_fn_cases, params_axis=0, data_axis=None, mesh=mesh)
            self.eval_own = per_hospital(eval_fn, params_axis=0, data_axis=0, mesh=mesh)
        else:
            self.eval_global = over_devices(eval_fn_cases, mesh)
            self.eval_own = per_hospital(eval_fn, params_axis=None, data_axis=0, mesh=mesh)
        self.backdoor_target, self.eval_backdoor = None, None
        if backdoor is not None:
            if local_mode:
                raise ValueError('A backdoor is evaluated on one shared model, not in local mode.')
            self.backdoor_target, size = backdoor
            triggered = lambda params, x: apply_fn(params, attacks.stamp_trigger(x, size))
            self.eval_backdoor = over_devices(build_eval_fn(triggered, task), mesh)

    def _global_metrics(self, stats: dict) -> dict:
        out = self.task.finalize(stats)
        if self.task.split_metrics is not None and self.test_host is not None:
            out.update(self.task.split_metrics(stats, self.test_host))
        return out

    def __call__(self, params) -> dict:
        task, names, row = self.task, self.names, {}
        stats = parallel.to_host(self.eval_global(params, self.test))
        if self.local_mode:
            # Each hospital's own model: on the global test split (averaged) and on its own split.
            results = [self._global_metrics(s) for s in split_hospitals(stats)[: len(names)]]
            for key in results[0]:
                row[f'eval/{key}'] = float(np.nanmean([res[key] for res in results]))
        else:
            row.update(
                {f'eval/{k}': v for k, v in self._global_metrics(unbatch_stats(stats)).items()}
            )
        if self.hospital_test is None:
            return row
        own = split_hospitals(parallel.to_host(self.eval_own(params, self.hospital_test)))[
            : len(names)
        ]
        own_main = []
        for name, stats in zip(names, own, strict=True):
            value = task.finalize(stats)[task.main_metric]
            row[f'hospital/{name}/{task.main_metric}'] = value
            own_main.append(value)
        row[f'eval/own_{task.main_metric}'] = float(np.nanmean(own_main))
        if self.eval_backdoor is not None:
            triggered = unbatch_stats(parallel.to_host(self.eval_backdoor(params, self.test)))
            row['eval/backdoor_success'] = attacks.backdoor_success(triggered, self.backdoor_target)
        return row
