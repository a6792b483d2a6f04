"""Jitted, batched evaluation of one model or of one model per hospital.

A split is padded to whole batches ([num_batches, batch, ...] plus an example mask) once, on the
device, in its storage dtypes (data/storage.py); `lax.map` decodes and runs one batch at a time
and the host adds up the statistics (`unbatch_stats`). Per-example arrays (`PER_EXAMPLE`: CXR
probabilities, BraTS packed binary predictions for per-case metrics) come back unsummed, in the
split's row order followed by the padding.
"""

import math

import jax
import numpy as np

from fedjax_med import parallel
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
    return {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)])
            for k, v in batched.items()}


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
    from fedjax_med import rounds

    one_at_a_time = 0 if params_axis is None else 1
    return parallel.jit(rounds.map_clients(eval_fn, (params_axis, data_axis), one_at_a_time,
                                           mesh))


def split_hospitals(stats) -> list[dict]:
    """Stacked statistics [K, nb, ...] -> one split's statistics per hospital."""
    stats = jax.tree.map(np.asarray, stats)
    k = next(iter(stats.values())).shape[0]
    return [unbatch_stats({key: v[i] for key, v in stats.items()}) for i in range(k)]


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
