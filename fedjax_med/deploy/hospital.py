"""One hospital of a deployment, without Flower: its own data, its local update, its own privacy
accountant.

`Hospital(config, index)` builds the run through `experiment.build` over a federation of one
hospital, itself, so its update is the function the simulation maps over the client axis
(`rounds.build_local_updates_fn` over a client axis of one slot), with its batches and device
keys drawn by its id in the federation (`host_round.RoundPlanner.hospital_round`). Given the
same global parameters, hospital k computes what the simulation computes for hospital k, up to
floating-point rounding.

Its data:
  - `data_dir` given: the hospital's own built TFDS dataset (config.data.name in that folder),
    all of it its own (read as a federation of one hospital, split into train and test there);
  - otherwise the federation the config describes, of which it keeps hospital k's arrays: the
    synthetic twin (or a shared built dataset) is generated or read whole to partition it the way
    the simulation does, and every other hospital's arrays are dropped before anything trains.

Its privacy: with sample-level DP (DP-SGD) the hospital calibrates its own sigma_k to the
run's target from its own size (as the simulation does per hospital) and keeps its own
dp-accounting accountant (`privacy.plan.PrivacyPlan` over itself) of exactly the steps it ran.
Before a round it checks that the round keeps it within its own budget (`max_epsilon`, or the
run's `dp.target_epsilon`) and refuses otherwise, whatever the server asks. Its accountant's
state (`privacy_state`, step counts only) is kept by the hospital between rounds, in a file of
its own state folder (fedjax_med/deploy/client_app.py), so a restarted hospital does not forget
what it spent.
"""

import jax
import ml_collections
import numpy as np

from fedjax_med import experiment, parallel, rounds
from fedjax_med.deploy.common import DeployError, deploy_problems


class Refused(RuntimeError):
    """The hospital will not run the round it was asked for (the reason is for the server's log)."""


def own_data(config: ml_collections.ConfigDict, index: int, data_dir: str | None = None):
    """Hospital `index`'s arrays as a federation of one hospital (see the module docstring)."""
    from fedjax_med.data import sources

    data_config = config.data.copy_and_resolve_references()
    if data_dir:
        data_config.data_dir = data_dir
        data_config.num_clients = 1
        data_config.partition = 'iid'
        fed = sources.load_federated(data_config, config.seed)
        keep = 0
    else:
        if not 0 <= index < config.data.num_clients:
            raise DeployError(
                f'--hospital={index}: the federation has config.data.num_clients='
                f'{config.data.num_clients} hospitals; give 0 to {config.data.num_clients - 1}.'
            )
        fed = sources.load_federated(data_config, config.seed)
        keep = index
    train, test = fed.clients_train[keep], fed.clients_test[keep]
    return sources.FederatedDataset(
        task=fed.task,
        clients_train=[train],
        clients_test=[test],
        test=test,
        client_names=[f'hospital_{index}'],
        info={},
    )


class Hospital:
    """Hospital `index` of the federation `config` describes.

    Args:
      config: the run's config (the server's, loaded from the same description).
      index: the hospital's id in the federation (its random streams are drawn by it).
      data_dir: its own built dataset, if it has one (see the module docstring).
      max_epsilon: its own privacy budget; 0 means the run's dp.target_epsilon.
      privacy_state: its accountant's state from an earlier round (`privacy_state()`), if any.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        index: int,
        *,
        data_dir: str | None = None,
        max_epsilon: float = 0.0,
        privacy_state: dict | None = None,
    ):
        problems = deploy_problems(config)
        if problems:
            raise DeployError(problems[0])
        self.config, self.index = config, int(index)
        self.max_epsilon = float(max_epsilon)
        data = own_data(config, self.index, data_dir)
        self.exp = experiment.build(config, parallel.make_mesh(1), warm_start=False, data=data)
        exp = self.exp
        self.num_examples = int(exp.sizes[0])
        self.local_updates = rounds.build_local_updates_fn(
            apply_fn=exp.apply_fn, task=exp.task, config=config, mesh=exp.mesh, model=exp.model
        )
        if privacy_state:
            exp.privacy.load_state_dict(privacy_state)

    # -- privacy -------------------------------------------------------------------------------
    def epsilon(self) -> float | None:
        """The hospital's epsilon so far (None without DP)."""
        return self.exp.privacy.metrics()['privacy/epsilon']

    def budget_problem(self) -> str | None:
        """Why the next round would take this hospital past its own budget (None if it would
        not, or without a budget)."""
        plan = self.exp.privacy
        if plan.mode != 'sample':
            return None
        budget = self.max_epsilon or float(self.config.dp.target_epsilon)
        if budget <= 0:
            return None
        after = float(np.max(plan.accountant.epsilon_after(self.exp.steps[:1])))
        if after <= budget * (1 + 1e-6):
            return None
        return (
            f'hospital {self.index} refuses: this round would take its epsilon from '
            f'{self.epsilon():.3f} to {after:.3f}, past its budget of {budget:g} '
            f'(after {plan.rounds_done} rounds it ran).'
        )

    def privacy_state(self) -> dict:
        """The accountant's state (the rounds and steps it ran), to keep until the next round."""
        return self.exp.privacy.state_dict()

    # -- the round -----------------------------------------------------------------------------
    def update(self, params, round_index: int) -> dict:
        """Runs round `round_index` from the global `params`; returns {'delta' (the update, a
        pytree of numpy arrays), 'num_examples', 'loss_sum', 'example_count', 'epsilon'}.

        Raises:
          Refused: the round would take the hospital past its own privacy budget.
        """
        reason = self.budget_problem()
        if reason:
            raise Refused(reason)
        exp = self.exp
        prepared = exp.planner.hospital_round(round_index, self.index)
        if isinstance(prepared, str):  # the run's own target, checked by the plan itself
            raise Refused(f'hospital {self.index} refuses: {prepared}')
        params = jax.device_put(params, parallel.replicated(exp.mesh))
        out = self.local_updates(
            params,
            exp.client_data,
            prepared.inputs,
            exp.round_key(self.config.seed, round_index),
        )
        out = jax.tree.map(np.asarray, out)
        # The accountant counts the round before anything leaves the hospital (the caller keeps
        # `privacy_state()` before it replies).
        exp.privacy.record(prepared.round_steps[:1])
        return {
            'delta': jax.tree.map(lambda x: x[0], out.delta),
            'num_examples': self.num_examples,
            'loss_sum': float(out.metrics['loss_sum'][0]),
            'example_count': float(out.metrics['example_count'][0]),
            'epsilon': self.epsilon(),
        }
