"""One hospital's local update: S optimiser steps on its own data, returning the model delta.

Pure and written for a single hospital; `rounds.py` vmaps it over the client axis. The gradient
of a step comes from a `GradientFn`, so the same loop runs plain training (`mean_gradient`) and
DP-SGD (per-example clipping and noise from `fedjax_med.privacy.dp_sgd`) without branching here.
"""

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_med.data import storage
from fedjax_med.state import ClientInputs

# (params, batch, mask [B], key, expected_batch, noise_multiplier)
#   -> (gradient pytree, aux metrics with 'loss')
GradientFn = Callable[..., tuple[Any, dict]]
# (params, images [B, ...]) -> logits
ApplyFn = Callable[[Any, jax.Array], jax.Array]


@flax.struct.dataclass
class ClientOutput:
    delta: Any  # params_after - params_before
    num_steps: jax.Array  # steps actually run
    metrics: dict  # sums over this hospital's steps: loss_sum, example_count, ...


def per_example_loss_fn(apply_fn: ApplyFn, loss: Callable) -> Callable:
    """Loss of ONE example {'image': [H, W, C], 'label': [...]}, the form DP-SGD differentiates."""

    def fn(params, example):
        logits = apply_fn(params, example['image'][None])
        return loss(logits, example['label'][None])[0]

    return fn


def mean_gradient(apply_fn: ApplyFn, loss: Callable) -> GradientFn:
    """Non-private gradient: mean loss over the examples the mask keeps (one batched forward)."""

    def batch_loss(params, batch, mask):
        per_example = loss(apply_fn(params, batch['image']), batch['label'])
        return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def grad_fn(params, batch, mask, key, expected_batch, noise_multiplier):
        del key, expected_batch, noise_multiplier
        value, grads = jax.value_and_grad(batch_loss)(params, batch, mask)
        return grads, {'loss': value}

    return grad_fn


CLIENT_OPTIMIZERS = {
    'sgd': lambda learning_rate, momentum: optax.sgd(learning_rate),
    'momentum': lambda learning_rate, momentum: optax.sgd(learning_rate, momentum=momentum),
    'adam': lambda learning_rate, momentum: optax.adam(learning_rate),
}


def client_optimizer(name: str, momentum: float = 0.9) -> optax.GradientTransformation:
    """Client optimiser whose learning rate is set per round (it follows a schedule over rounds)."""
    make = CLIENT_OPTIMIZERS[name]
    return optax.inject_hyperparams(lambda learning_rate: make(learning_rate, momentum))(
        learning_rate=0.0
    )


# Long on purpose: most of it is the docstring of its inputs; the body is one lax.scan whose step
# function needs the bound gradient, optimiser and poison from the enclosing scope.
def local_update(
    global_params,
    data: dict,
    inputs: ClientInputs,
    learning_rate: jax.Array,
    *,
    grad_fn: GradientFn,
    optimizer: optax.GradientTransformation,
    prox_mu: float,
    unroll: int | bool = 1,
    poison: Callable | None = None,
) -> ClientOutput:
    """Runs this hospital's local steps and returns its update.

    Args:
      global_params: the model the server broadcast this round.
      data: this hospital's training arrays in their storage dtypes (data/storage.py), leading
        axis over its (padded) examples; a step decodes only the batch it gathers.
      inputs: this hospital's share of the round (`state.ClientInputs`): `indices`, `mask`
        int32/float32 [S, B], which examples each step uses and which are real; `step_active`
        bool [S], steps beyond this hospital's share are skipped (no state change);
        `expected_batch`, `noise_multiplier`: DP-SGD's denominator and this hospital's sigma
        (ignored by the non-private gradient); `key`: its key for this round, step keys are
        fold_in(key, step).
      learning_rate: client learning rate of this round.
      grad_fn: gradient of one step (plain or privatised).
      optimizer: client optimiser from `client_optimizer` (fresh state every round).
      prox_mu: FedProx weight; adds mu * (w - w_global) to each step's gradient. It is applied
        after privatisation, so it costs no privacy (it does not touch the data).
      unroll: `lax.scan` unroll factor of the local steps.
      poison: the attack simulation's `(decoded batch, inputs.malicious) -> batch` (label flips,
        backdoor triggers; attacks.py), applied to every step's batch, or None.
    """
    indices, mask, step_active, key = inputs.indices, inputs.mask, inputs.step_active, inputs.key
    expected_batch, noise_multiplier = inputs.expected_batch, inputs.noise_multiplier
    opt_state = optimizer.init(global_params)
    opt_state.hyperparams['learning_rate'] = jnp.asarray(learning_rate, jnp.float32)

    def step(carry, xs):
        step_index, idx, m, active = xs

        def run(carry):
            params, opt_state, sums = carry
            batch = gather_batch(data, idx)
            if poison is not None:
                batch = poison(batch, inputs.malicious)
            grads, aux = grad_fn(
                params,
                batch,
                m,
                jax.random.fold_in(key, step_index),
                expected_batch,
                noise_multiplier,
            )
            if prox_mu:
                grads = jax.tree.map(
                    lambda g, w, w0: g + prox_mu * (w - w0), grads, params, global_params
                )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            count = jnp.sum(m)
            sums = {
                'loss_sum': sums['loss_sum'] + aux['loss'] * count,
                'example_count': sums['example_count'] + count,
                **{k: sums[k] + aux[k] for k in extra},
            }
            return optax.apply_updates(params, updates), opt_state, sums

        # An inactive step (beyond this hospital's share) changes nothing. Run one hospital at a
        # time (lax.map) and it is skipped; under vmap `cond` computes both branches and selects.
        return jax.lax.cond(active, run, lambda carry: carry, carry), None

    extra = _aux_keys(
        grad_fn, global_params, data, indices, mask, expected_batch, noise_multiplier, key
    )
    sums = {
        'loss_sum': jnp.zeros(()),
        'example_count': jnp.zeros(()),
        **{k: jnp.zeros(()) for k in extra},
    }
    steps = jnp.arange(indices.shape[0])
    (params, _, sums), _ = jax.lax.scan(
        step, (global_params, opt_state, sums), (steps, indices, mask, step_active), unroll=unroll
    )
    delta = jax.tree.map(lambda a, b: a - b, params, global_params)
    return ClientOutput(delta=delta, num_steps=jnp.sum(step_active), metrics=sums)


def gather_batch(data: dict, idx: jax.Array) -> dict:
    """Examples `idx` of a hospital's stored arrays, decoded to float32 model inputs. Decoding
    after the gather keeps the whole training set compact on the device."""
    return storage.decode(jax.tree.map(lambda a: a[idx], data))


def _aux_keys(
    grad_fn, params, data, indices, mask, expected_batch, noise_multiplier, key
) -> list[str]:
    """Names of the extra scalar metrics a gradient function reports (found by abstract eval)."""
    batch = gather_batch(data, indices[0])
    aux = jax.eval_shape(
        lambda: grad_fn(params, batch, mask[0], key, expected_batch, noise_multiplier)[1]
    )
    return sorted(k for k in aux if k != 'loss')
