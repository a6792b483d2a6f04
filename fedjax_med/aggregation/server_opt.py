"""Server optimisers of Reddi et al. 2021 ("Adaptive Federated Optimization"), through optax.

The server treats the negated mean update -Delta as a gradient: x <- x + ServerOpt(-Delta). With
'fedavg' and learning rate 1 this is exactly x <- x + Delta.

The adaptive optimisers are optax's, which differ from Algorithm 2 of the paper in details that
matter when comparing tuned values: FedAdam and FedYogi apply Adam's bias correction (the paper
has none; with beta2 = 0.99 the first rounds take larger steps here), optax's Yogi starts both
moments at 1e-6 (the paper: v >= tau^2), and FedAdagrad adds `server.epsilon` inside the square
root, sqrt(v + tau), with no first-moment momentum (the paper: m / (sqrt(v) + tau) with beta1).
`tests/test_fedavg.py` pins the exact formulas.
"""

import jax
import ml_collections
import optax

SERVER_OPTIMIZERS = ('fedavg', 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad')


def server_optimizer(sc: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Builds the server optimiser named by `config.server.optimizer`."""
    if sc.optimizer == 'fedavg':
        return optax.sgd(sc.learning_rate)
    if sc.optimizer == 'fedavgm':
        return optax.sgd(sc.learning_rate, momentum=sc.momentum)
    if sc.optimizer == 'fedadam':
        return optax.adam(sc.learning_rate, b1=sc.beta1, b2=sc.beta2, eps=sc.epsilon)
    if sc.optimizer == 'fedyogi':
        return optax.yogi(sc.learning_rate, b1=sc.beta1, b2=sc.beta2, eps=sc.epsilon)
    if sc.optimizer == 'fedadagrad':
        return optax.adagrad(sc.learning_rate, initial_accumulator_value=0.0, eps=sc.epsilon)
    raise ValueError(
        f'config.server.optimizer={sc.optimizer!r}: use one of {", ".join(SERVER_OPTIMIZERS)}.'
    )


def server_step(optimizer: optax.GradientTransformation, params, opt_state, mean_delta):
    """One server step from the aggregated update; returns (new_params, new_opt_state)."""
    pseudo_grad = jax.tree.map(lambda d: -d, mean_delta)
    updates, opt_state = optimizer.update(pseudo_grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
