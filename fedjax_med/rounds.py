"""The federated round as ONE jitted function over the vectorised client axis.

`build_round_fn` binds everything static (model, task, optimisers, privacy and aggregation
options) and returns `round_fn(state, client_data, inputs, key) -> (state, metrics)`:

  1. every hospital's local update, `client.local_update` vmapped over the client axis;
  2. optional update compression (per-hospital state, e.g. top-k error feedback);
  3. aggregation: the run's `aggregation.base.Strategy`, picked once by
     `aggregation.registry.strategy_for` from the config: `config.server.aggregator` in the
     clear (FedAvg weighted mean, the robust coordinate-wise median / trimmed mean, Krum /
     multi-Krum, or the norm-bounded mean),
     client-level DP (clip + noise), secure aggregation (fixed-point encoding + pairwise masks,
     summed modulo 2^32), or both;
  4. the server optimiser step, then the round's metrics.

With `config.attack` on (attacks.py), the malicious hospitals' batches are poisoned inside their
local steps (label flips, backdoor triggers) or their updates are tampered with before step 2
(sign flip, scaling), by the per-slot flag `RoundInputs.malicious`.

The client axis of `client_data` and `inputs` is sharded over the mesh; parameters are
replicated. Each device runs only its own hospitals' local updates (`parallel.map_clients`: a
`shard_map` over the client axis), and sums over the client axis are plain reductions for which
XLA inserts the all-reduces.
In 'local' mode each hospital keeps its own parameters (leading client axis) and steps 3-4 become
params_k += delta_k.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fedjax_med import attacks, parallel
from fedjax_med import client as client_lib
from fedjax_med.aggregation import registry, server_opt
from fedjax_med.parallel import client_sharding, replicated
from fedjax_med.state import RoundInputs, ServerState

# Each use of randomness in a round has its own branch of the round key (streams.py names them).
from fedjax_med.streams import KEY_COMPRESS, KEY_TRAIN, round_key  # noqa: F401 (re-exported)
from fedjax_med.tasks import Task


@dataclasses.dataclass
class RoundFn:
    """The jitted round plus a trace counter (the round must compile once per run)."""

    fn: Callable
    num_traces: int = 0

    def __call__(self, state, client_data, inputs, key):
        return self.fn(state, client_data, inputs, key)


def use_fast_clipping(
    dp: ml_collections.ConfigDict, model=None, platform: str | None = None
) -> bool:
    """Which DP-SGD clipping path a run takes: `dp.fast_clipping` when set (True or False), else
    the automatic choice (None, the default).

    Both paths compute the same clipped, noised gradient (to float rounding; tested), so this is
    a speed choice only and may change on resume. Automatic: fast clipping on an accelerator when
    the model supports it (ResNet-18 at 224 px on an H100: 0.59x the non-private step against
    0.17x for per-example gradients), per-example gradients on a CPU (fast clipping's extra
    reweighted backward pass made the small ResNet's DP round 2.1x slower there; BENCHMARKS.md).
    """
    from fedjax_med.privacy import fast_clip

    supported = model is not None and fast_clip.supports_fast_clipping(model)
    if dp.fast_clipping is None:
        platform = platform or jax.default_backend()
        return supported and platform != 'cpu'
    if dp.fast_clipping and not supported:
        raise ValueError(
            f'config.dp.fast_clipping=True needs resnet18, resnet_small or unet, got '
            f'{type(model).__name__}; set it to False (or leave it unset: the automatic choice).'
        )
    return bool(dp.fast_clipping)


def make_gradient_fn(
    apply_fn, task: Task, dp: ml_collections.ConfigDict, model=None
) -> client_lib.GradientFn:
    """Plain mean gradient, or DP-SGD (per-example clip to C, Gaussian noise sigma_k*C, sigma_k
    the hospital's noise multiplier, an input of each round): with fast clipping
    (`use_fast_clipping`), per-example norms from layer activations (privacy/fast_clip.py) and no
    per-example gradients; otherwise vmap of grad over examples in chunks (privacy/dp_sgd.py)."""
    if dp.mode != 'sample':
        return client_lib.mean_gradient(apply_fn, task.per_example_loss)
    if use_fast_clipping(dp, model):
        from fedjax_med.privacy import fast_clip

        def fast_grad_fn(params, batch, mask, key, expected_batch, noise_multiplier):
            return fast_clip.dp_gradient_fast(
                model,
                params,
                batch,
                mask,
                key,
                loss_fn=task.per_example_loss,
                clip_norm=dp.clip_norm,
                noise_multiplier=noise_multiplier,
                expected_batch_size=expected_batch,
            )

        return fast_grad_fn
    from fedjax_med.privacy import dp_sgd

    per_example = client_lib.per_example_loss_fn(apply_fn, task.per_example_loss)

    def grad_fn(params, batch, mask, key, expected_batch, noise_multiplier):
        return dp_sgd.dp_gradient(
            per_example,
            params,
            batch,
            mask,
            key,
            clip_norm=dp.clip_norm,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch,
            chunk_size=dp.chunk_size or None,
        )

    return grad_fn


def make_client_update(
    *, apply_fn, task: Task, config: ml_collections.ConfigDict, model=None
) -> Callable:
    """One hospital's update with everything static bound: the function the round maps over
    the client axis (and the sequential baseline in launch/benchmark.py calls directly)."""
    return functools.partial(
        client_lib.local_update,
        grad_fn=make_gradient_fn(apply_fn, task, config.dp, model),
        optimizer=client_lib.client_optimizer(config.local.optimizer, config.local.momentum),
        prox_mu=config.local.prox_mu,
        unroll=config.local.unroll_steps,
        poison=attacks.poison_batch(config),
    )


# Long on purpose: the round itself is a closure over everything bound at build time, and reads
# best as one sequence (gather, local updates, attack, compression, aggregation, server step).
def build_round_fn(
    *,
    apply_fn,
    task: Task,
    config: ml_collections.ConfigDict,
    mesh,
    client_noise_multiplier: float = 0.0,
    expected_clients: float = 1.0,
    compressor=None,
    model=None,
) -> RoundFn:
    """Returns the jitted round for this configuration (see the module docstring).

    `client_noise_multiplier` is z of client-level DP; sample-level DP-SGD takes each hospital's
    sigma from the round's inputs (`RoundInputs.noise_multiplier`).
    """
    local_mode = config.mode == 'local'
    local_updates = _local_updates_fn(apply_fn, task, config, mesh, model)
    server = server_opt.server_optimizer(config.server)
    # Local mode is not aggregation: every hospital keeps its own model (params with a client
    # axis) and adds its own update, so nothing is combined and there is no server step. A
    # Strategy returns one update for one global model, so local mode stays a branch here.
    strategy = (
        None
        if local_mode
        else registry.strategy_for(
            config,
            client_noise_multiplier=client_noise_multiplier,
            expected_clients=expected_clients,
            # SecAgg on one device expands each pairwise mask once for both its hospitals; with the
            # client axis sharded, each device expands its own hospitals' masks (same bits).
            single_device=mesh is None or mesh.devices.size == 1,
        )
    )
    # The attack simulation's sign flip / scaling of the malicious hospitals' updates (attacks.py).
    tamper = attacks.tamper_updates(config)
    result = RoundFn(fn=None)

    def round_fn(state: ServerState, client_data: dict, inputs: RoundInputs, key: jax.Array):
        result.num_traces += 1  # runs at trace time only
        # The round's client axis holds its participants (host_round.py): gather their data
        # and per-hospital state, and scatter the state back after the round.
        slots = _Slots(inputs.client_ids, client_data, mesh)
        out = local_updates(state.params, slots.gather(client_data), inputs, key)
        if tamper is not None:  # what the malicious hospitals send instead of their update
            out = out.replace(delta=tamper(out.delta, inputs.malicious))
        deltas, client_state = _compress(
            compressor, out.delta, slots.gather(state.client_state), inputs, key
        )
        client_state = slots.scatter(state.client_state, client_state)
        metrics = _round_metrics(out, inputs)
        if local_mode:
            params, opt_state, clip_norm = (
                _add_own_updates(state.params, deltas, inputs.weights),
                state.opt_state,
                state.clip_norm,
            )
        else:
            combined = strategy.combine(deltas, inputs, key, state.clip_norm)
            params, opt_state = server_opt.server_step(
                server, state.params, state.opt_state, combined.mean_delta
            )
            clip_norm = combined.clip_norm
            metrics.update(combined.metrics)
            metrics['train/update_norm'] = optax.tree.norm(combined.mean_delta)
        metrics['train/param_norm'] = optax.tree.norm(params)
        new_state = ServerState(
            params=params,
            opt_state=opt_state,
            round=state.round + 1,
            clip_norm=clip_norm,
            client_state=client_state,
        )
        return new_state, metrics

    state_sharding = _state_sharding(mesh, local_mode)
    result.fn = parallel.jit(round_fn, donate_argnums=(0,), out_shardings=(state_sharding, None))
    return result


def build_local_updates_fn(
    *, apply_fn, task: Task, config: ml_collections.ConfigDict, mesh, model=None
) -> Callable:
    """The round's first stage alone, jitted: `(params, client_data, inputs, round key) ->
    client.ClientOutput` of every slot, the function `build_round_fn`'s round runs on the slots'
    data before compression and aggregation. A deployed hospital (fedjax_med/deploy) runs it over
    a client axis of one slot, itself, so its update is the simulation's update of that hospital
    (its keys fold in `inputs.client_ids`, the hospital's id in the federation)."""
    return parallel.jit(_local_updates_fn(apply_fn, task, config, mesh, model))


class _Slots:
    """The round's client axis, M_pad slots of hospitals `ids` (K_pad: a padding slot), against
    the K_pad rows of per-hospital data and state. When the slots are the rows (every hospital
    takes part) gathering and scattering are the identity: nothing is copied."""

    def __init__(self, ids: jax.Array, client_data: dict, mesh):
        self.ids, self.mesh = ids, mesh
        rows = jax.tree.leaves(client_data)[0].shape[0]
        self.identity = ids.shape[0] == rows  # static: then ids is arange(K_pad)

    def gather(self, tree):
        """Rows of the slots' hospitals; a padding slot gets zeros."""
        if self.identity:
            return tree
        take = lambda x: jnp.take(x, self.ids, axis=0, mode='fill', fill_value=0)
        out = jax.tree.map(take, tree)
        if self.mesh is not None and self.mesh.devices.size > 1:
            out = jax.lax.with_sharding_constraint(out, client_sharding(self.mesh))
        return out

    def scatter(self, rows, new):
        """`rows` with the slots' hospitals' rows replaced by `new` (padding slots dropped)."""
        if self.identity:
            return new
        return jax.tree.map(lambda r, n: r.at[self.ids].set(n, mode='drop'), rows, new)


def _local_updates_fn(
    apply_fn, task: Task, config: ml_collections.ConfigDict, mesh, model
) -> Callable:
    """`(params, client_data, inputs, round key) -> client.ClientOutput` of every hospital: the
    broadcast model (rounded to bfloat16 if so configured), then `client.local_update` mapped
    over the client axis, each hospital with its own key."""
    client_update = make_client_update(apply_fn=apply_fn, task=task, config=config, model=model)
    params_axis = 0 if config.mode == 'local' else None
    mapped = parallel.map_clients(
        client_update,
        (params_axis, 0, 0, None),
        parallel.clients_in_parallel(config.clients_in_parallel),
        mesh,
    )
    bfloat16_broadcast = config.compression.broadcast_dtype == 'bfloat16'

    def local_updates(params, client_data: dict, inputs: RoundInputs, key: jax.Array):
        train_key = jax.random.fold_in(key, KEY_TRAIN)
        client_keys = jax.vmap(lambda i: jax.random.fold_in(train_key, i))(inputs.client_ids)
        if bfloat16_broadcast:
            # Hospitals receive the model in bfloat16: they start from the rounded weights.
            params = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(p.dtype), params)
        return mapped(params, client_data, inputs.per_client(client_keys), inputs.learning_rate)

    return local_updates


def _compress(compressor, deltas, client_state, inputs: RoundInputs, key: jax.Array):
    """(what the server receives from each hospital, dequantised; the new per-hospital
    compressor state). Hospitals that sat this round out keep their state (top-k residual)."""
    if compressor is None:
        return deltas, client_state
    ckeys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, KEY_COMPRESS), i))(
        inputs.client_ids
    )
    deltas, new_cs = jax.vmap(compressor.apply)(deltas, client_state, ckeys)
    taking_part = inputs.weights > 0
    client_state = jax.tree.map(
        lambda n, o: jnp.where(taking_part.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
        new_cs,
        client_state,
    )
    return deltas, client_state


def _add_own_updates(params, deltas, weights: jax.Array):
    """Local mode: params_k += delta_k for the hospitals taking part (weight > 0)."""
    take = lambda d: d * (weights > 0).reshape((-1,) + (1,) * (d.ndim - 1))
    return jax.tree.map(lambda p, d: p + take(d), params, deltas)


def _round_metrics(out: client_lib.ClientOutput, inputs: RoundInputs) -> dict[str, Any]:
    """Per-hospital sums (shape [K]), the round's training loss over the hospitals that ran, and
    how many of them produced a non-finite update (each hospital can see that in its own update
    before sending it; SecAgg's fixed-point encoding would otherwise turn NaN into 0).
    `train/finite_update_loss` is the loss over the hospitals whose update is finite: what the
    row reports when a robust aggregator excluded the others (train._train_row)."""
    m = dict(out.metrics)
    taking_part = (inputs.weights > 0).astype(jnp.float32)
    finite = jnp.stack(
        [jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(out.delta)]
    ).all(axis=0)
    loss_sum = jnp.sum(m['loss_sum'] * taking_part)
    count = jnp.sum(m['example_count'] * taking_part)
    kept = (taking_part > 0) & finite
    kept_loss = jnp.sum(jnp.where(kept, m['loss_sum'], 0.0))
    kept_count = jnp.sum(jnp.where(kept, m['example_count'], 0.0))
    return {
        'train/loss': loss_sum / jnp.maximum(count, 1.0),
        'train/finite_update_loss': kept_loss / jnp.maximum(kept_count, 1.0),
        'train/examples': count,
        'train/nonfinite_updates': jnp.sum(taking_part * ~finite),
        'clients/loss_sum': m['loss_sum'],
        'clients/example_count': m['example_count'],
        'clients/num_steps': out.num_steps,
        **{f'clients/{k}': v for k, v in m.items() if k not in ('loss_sum', 'example_count')},
    }


def _state_sharding(mesh, local_mode: bool):
    """Server state replicated; in local mode params are per hospital (sharded like the data)."""
    if not local_mode:
        return replicated(mesh)
    return ServerState(
        params=client_sharding(mesh),
        opt_state=replicated(mesh),
        round=replicated(mesh),
        clip_norm=replicated(mesh),
        client_state=client_sharding(mesh),
    )


def init_server_state(
    params, config: ml_collections.ConfigDict, num_clients_padded: int, mesh, compressor=None
) -> ServerState:
    """Initial server state, placed as the round returns it (so the round traces once).

    In local mode every hospital starts from the same `params`.
    """
    server = server_opt.server_optimizer(config.server)
    if config.mode == 'local':
        params = jax.tree.map(lambda p: jnp.broadcast_to(p, (num_clients_padded, *p.shape)), params)
        opt_state = ()
    else:
        opt_state = server.init(params)
    client_state = ()
    if compressor is not None:
        per_client = compressor.init(
            params if config.mode != 'local' else jax.tree.map(lambda p: p[0], params)
        )
        client_state = jax.tree.map(
            lambda x: jnp.broadcast_to(x, (num_clients_padded, *x.shape)), per_client
        )
    state = ServerState(
        params=params,
        opt_state=opt_state,
        round=jnp.zeros((), jnp.int32),
        clip_norm=jnp.asarray(config.dp.clip_norm, jnp.float32),
        client_state=client_state,
    )
    return parallel.to_mesh(state, _state_sharding(mesh, config.mode == 'local'))
