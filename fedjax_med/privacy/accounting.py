"""Privacy accounting on the host with dp-accounting (RDP or PLD); never called inside jit.

Sample-level DP (DP-SGD inside each hospital): one local step of hospital k is a Poisson-sampled
Gaussian mechanism with sampling probability q_k = expected_batch / n_k and noise multiplier z
(`dp_sgd.dp_gradient` divides by the expected batch and masks Poisson-sampled examples,
which is exactly what `PoissonSampledDpEvent(q_k, GaussianDpEvent(z))` describes). A hospital
that ran T_k steps in total has spent `SelfComposedDpEvent(..., T_k)`.

The unit protected is one example (one image, slice or patch): neighbouring datasets differ in
one example. A patient with g examples at one hospital is protected by group privacy only
(roughly g * epsilon), so a patient-level claim must not quote this epsilon as it is.

Parallel composition across hospitals: each patient's records belong to exactly one hospital,
and a hospital's steps only touch its own records, so the guarantee for any patient is the
guarantee of their hospital. The headline epsilon of a run is therefore the MAX over hospitals
(not the sum), each at its own delta. This requires that a patient never appears at two
hospitals; if that cannot be ruled out, compose the hospitals' events instead.

Client-level DP (DP-FedAvg, whole hospitals protected) is accounted by `client_level_epsilon`.
All functions take plain Python numbers; nothing is cached at module level.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

ACCOUNTANTS = ('rdp', 'pld')
# Absolute tolerance of the calibrated noise multiplier; the search returns the side of the root
# that meets the target, so this only costs privacy-neutral precision.
_CALIBRATION_TOL = 1e-5


class _DropUnconvergedOrders(logging.Filter):
    """Drops dp-accounting's warning that an RDP order's series did not converge.

    The accountant then leaves that order out; epsilon is the minimum over the remaining orders,
    still a valid upper bound. A calibration evaluates hundreds of candidate noise levels, and
    these warnings (one per order and candidate) flooded a run's output with hundreds of lines.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return 'failed to converge' not in str(record.msg)


@contextlib.contextmanager
def _quiet_unconverged_orders() -> Iterator[None]:
    logger, drop = logging.getLogger('absl'), _DropUnconvergedOrders()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _make_accountant(
    accountant: str,
    neighboring_relation: dp_accounting.NeighboringRelation = (
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    ),
) -> dp_accounting.PrivacyAccountant:
    if accountant == 'rdp':
        return rdp.RdpAccountant(neighboring_relation=neighboring_relation)
    if accountant == 'pld':
        return pld.PLDAccountant(neighboring_relation=neighboring_relation)
    raise ValueError(f'accountant must be one of {ACCOUNTANTS}, got {accountant!r}.')


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f'delta must be in (0, 1), got {delta}.')


def dp_sgd_event(
    sampling_probability: float, noise_multiplier: float, steps: int
) -> dp_accounting.DpEvent:
    """`steps` compositions of a Poisson-sampled Gaussian mechanism (one DP-SGD step each)."""
    if not 0 <= sampling_probability <= 1:
        raise ValueError(f'sampling_probability must be in [0, 1], got {sampling_probability}.')
    if noise_multiplier < 0:
        raise ValueError(f'noise_multiplier must be >= 0, got {noise_multiplier}.')
    if steps < 0 or int(steps) != steps:
        raise ValueError(f'steps must be a non-negative integer, got {steps}.')
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            float(sampling_probability), dp_accounting.GaussianDpEvent(float(noise_multiplier))
        ),
        int(steps),
    )


def epsilon(event: dp_accounting.DpEvent, delta: float, accountant: str = 'rdp') -> float:
    """Epsilon of `event` at `delta` under add/remove-one adjacency.

    'rdp': RdpAccountant with dp-accounting's default orders (an upper bound);
    'pld': PLDAccountant (tighter; discretisation 1e-4, pessimistic rounding).
    """
    _check_delta(delta)
    with _quiet_unconverged_orders():
        return float(_make_accountant(accountant).compose(event).get_epsilon(delta))


def dp_sgd_steps(*, dataset_size: int, batch_size: int, epochs: float) -> int:
    """Steps of `epochs` passes at expected batch `batch_size`, as TF Privacy counts them."""
    return int(math.ceil(epochs * dataset_size / batch_size))


def dp_sgd_sampling_probability(*, dataset_size: int, batch_size: int) -> float:
    """q = batch_size / dataset_size, after checking that it is a probability."""
    if dataset_size < 1 or batch_size < 1:
        raise ValueError(
            f'dataset_size ({dataset_size}) and batch_size ({batch_size}) must be positive.'
        )
    if batch_size > dataset_size:
        raise ValueError(
            f'batch_size ({batch_size}) exceeds dataset_size ({dataset_size}): the sampling '
            'probability batch_size/dataset_size would be above 1.'
        )
    return batch_size / dataset_size


def compute_dp_sgd_epsilon(
    *,
    dataset_size: int,
    batch_size: int,
    noise_multiplier: float,
    epochs: float | None = None,
    steps: int | None = None,
    delta: float,
    accountant: str = 'rdp',
) -> float:
    """Epsilon of DP-SGD with Poisson sampling, q = batch_size / dataset_size.

    Give exactly one of `epochs` (steps = ceil(epochs * dataset_size / batch_size), like TF
    Privacy's compute_dp_sgd_privacy) or `steps`.
    """
    q = dp_sgd_sampling_probability(dataset_size=dataset_size, batch_size=batch_size)
    if (epochs is None) == (steps is None):
        raise ValueError(f'Give exactly one of epochs ({epochs}) or steps ({steps}).')
    if steps is None:
        steps = dp_sgd_steps(dataset_size=dataset_size, batch_size=batch_size, epochs=epochs)
    event = dp_sgd_event(q, noise_multiplier, steps)
    return epsilon(event, delta, accountant)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    sampling_probability: float,
    steps: int,
    delta: float,
    accountant: str = 'rdp',
) -> float:
    """Smallest noise multiplier (to ~1e-5) whose DP-SGD epsilon is <= target_epsilon.

    Raises:
        ValueError: for invalid inputs or a target the accountant cannot reach at any noise
            level (e.g. RDP cannot certify epsilon below ~log(1/delta)/(max order - 1)).
    """
    _check_delta(delta)
    _make_accountant(accountant)  # Validates the name before the search.
    if not target_epsilon > 0:
        raise ValueError(f'target_epsilon must be > 0, got {target_epsilon}.')
    if not 0 < sampling_probability <= 1:
        raise ValueError(f'sampling_probability must be in (0, 1], got {sampling_probability}.')
    if steps < 1:
        raise ValueError(f'steps must be >= 1, got {steps}.')

    def make_event(noise_multiplier: float) -> dp_accounting.DpEvent:
        return dp_sgd_event(sampling_probability, noise_multiplier, steps)

    try:
        with _quiet_unconverged_orders():
            sigma = dp_accounting.calibrate_dp_mechanism(
                lambda: _make_accountant(accountant),
                make_event,
                target_epsilon,
                delta,
                _bracket(target_epsilon, sampling_probability, steps, delta, accountant),
                tol=_CALIBRATION_TOL,
            )
    except (dp_accounting.mechanism_calibration.NoBracketIntervalFoundError, ValueError) as e:
        raise ValueError(
            _unreachable_message(target_epsilon, sampling_probability, steps, delta, accountant)
        ) from e
    # Guard against a search that stopped at a bracket end without meeting the target.
    if epsilon(make_event(sigma), delta, accountant) > target_epsilon * (1 + 1e-6):
        raise ValueError(
            _unreachable_message(target_epsilon, sampling_probability, steps, delta, accountant)
        )
    return float(sigma)


def _bracket(
    target_epsilon: float, q: float, steps: int, delta: float, accountant: str
) -> dp_accounting.mechanism_calibration.BracketInterval:
    """Search interval for the noise multiplier.

    PLD evaluations are slow, so for PLD the (fast) RDP answer, which PLD's tighter analysis
    almost always meets, is tried as the upper end; otherwise fall back to a blind search.
    """
    blind = dp_accounting.LowerEndpointAndGuess(0.0, 1.0)
    if accountant != 'pld':
        return blind
    try:
        upper = calibrate_noise_multiplier(
            target_epsilon=target_epsilon, sampling_probability=q, steps=steps, delta=delta
        )
    except ValueError:
        return blind
    if epsilon(dp_sgd_event(q, upper, steps), delta, 'pld') > target_epsilon:
        return blind
    # PLD's answer is typically 5-15% below RDP's; a narrow bracket saves slow evaluations.
    for lower in (0.8 * upper, 0.5 * upper):
        if epsilon(dp_sgd_event(q, lower, steps), delta, 'pld') > target_epsilon:
            return dp_accounting.ExplicitBracketInterval(lower, upper)
    return blind


def _unreachable_message(
    target_epsilon: float, q: float, steps: int, delta: float, accountant: str
) -> str:
    return (
        f'Cannot calibrate a noise multiplier for target_epsilon={target_epsilon} with sampling '
        f'probability q={q}, steps={steps}, delta={delta}, accountant={accountant!r}: no noise '
        'level reaches the target. Raise target_epsilon, reduce steps (fewer epochs/rounds), '
        "reduce q (smaller expected batch), raise delta, or use accountant='pld' (tighter)."
    )


def _per_hospital(value: Sequence[float] | float, num_hospitals: int, name: str) -> list[float]:
    """One float per hospital from a float (shared) or a sequence of exactly that length."""
    if np.isscalar(value):
        return [float(value)] * num_hospitals
    values = [float(v) for v in value]
    if len(values) != num_hospitals:
        raise ValueError(
            f'{name} has {len(values)} entries for {num_hospitals} hospitals; give one per '
            'hospital or a single float.'
        )
    return values


class HospitalAccountant:
    """Per-hospital sample-level accountant, fed once per round with the steps each one ran.

    Hospitals are accounted separately and the run's guarantee is their max (parallel
    composition, see the module docstring). Each hospital has its own sampling rate, delta and
    noise multiplier (a float is shared by all). Only total step counts are stored: a
    self-composed event of T steps is exactly the composition of all recorded rounds, so
    checkpointing the counts (`state_dict`) restores the accountant exactly.
    """

    def __init__(
        self,
        sampling_probabilities: Sequence[float],
        noise_multiplier: Sequence[float] | float,
        delta: Sequence[float] | float,
        accountant: str = 'rdp',
    ):
        self.sampling_probabilities = [float(q) for q in sampling_probabilities]
        num_hospitals = len(self.sampling_probabilities)
        if num_hospitals == 0:
            raise ValueError('sampling_probabilities must name at least one hospital.')
        deltas = _per_hospital(delta, num_hospitals, 'delta')
        sigmas = _per_hospital(noise_multiplier, num_hospitals, 'noise_multiplier')
        for q in self.sampling_probabilities:
            if not 0 <= q <= 1:
                raise ValueError(f'sampling probabilities must be in [0, 1], got {q}.')
        for d in deltas:
            _check_delta(d)
        _make_accountant(accountant)
        if min(sigmas) < 0:
            raise ValueError(f'noise_multiplier must be >= 0, got {noise_multiplier}.')
        self.noise_multipliers = sigmas
        self.deltas = deltas
        self.accountant = accountant
        self.steps = np.zeros(num_hospitals, np.int64)
        # (hospital, total steps) -> epsilon; per instance, so nothing global is cached.
        self._cache: dict[tuple[int, int], float] = {}

    @property
    def num_hospitals(self) -> int:
        return len(self.sampling_probabilities)

    def _as_steps(self, steps: np.ndarray | int, name: str) -> np.ndarray:
        steps = np.broadcast_to(np.asarray(steps), (self.num_hospitals,))
        if not np.issubdtype(steps.dtype, np.integer) and not np.all(np.mod(steps, 1) == 0):
            raise ValueError(f'{name} must be integers, got {steps}.')
        if np.any(steps < 0):
            raise ValueError(f'{name} must be non-negative, got {steps}.')
        return steps.astype(np.int64)

    def record(self, steps_taken: np.ndarray) -> None:
        """Adds one round: steps_taken[k] local DP-SGD steps of hospital k (0 if absent)."""
        self.steps = self.steps + self._as_steps(steps_taken, 'steps_taken')

    def _epsilon(self, hospital: int, total_steps: int) -> float:
        if total_steps == 0 or self.sampling_probabilities[hospital] == 0:
            return 0.0
        key = (hospital, int(total_steps))
        if key not in self._cache:
            event = dp_sgd_event(
                self.sampling_probabilities[hospital],
                self.noise_multipliers[hospital],
                int(total_steps),
            )
            self._cache[key] = epsilon(event, self.deltas[hospital], self.accountant)
        return self._cache[key]

    def _epsilons_for(self, totals: np.ndarray) -> np.ndarray:
        return np.array([self._epsilon(k, int(t)) for k, t in enumerate(totals)], np.float64)

    def epsilons(self) -> np.ndarray:
        """Epsilon of each hospital after all recorded steps (0 for hospitals that never ran)."""
        return self._epsilons_for(self.steps)

    def max_epsilon(self) -> float:
        """The run's headline epsilon: max over hospitals (parallel composition)."""
        return float(np.max(self.epsilons()))

    def epsilon_after(self, extra_steps: np.ndarray | int) -> np.ndarray:
        """Epsilons if each hospital ran `extra_steps` more (scalar or per hospital); records
        nothing. Call before a round to stop before a budget would be exceeded."""
        return self._epsilons_for(self.steps + self._as_steps(extra_steps, 'extra_steps'))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this accountant (plain Python types, JSON-friendly)."""
        return {
            'sampling_probabilities': list(self.sampling_probabilities),
            'noise_multiplier': list(self.noise_multipliers),
            'delta': list(self.deltas),
            'accountant': self.accountant,
            'steps': [int(s) for s in self.steps],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> HospitalAccountant:
        accountant = cls(
            state['sampling_probabilities'],
            state['noise_multiplier'],
            state['delta'],
            state['accountant'],
        )
        accountant.steps = accountant._as_steps(np.asarray(state['steps']), 'steps').copy()
        return accountant


# Long on purpose: mostly its docstring, which states the adjacency and soundness of each cohort
# sampling (Poisson / fixed size) next to the code that accounts it.
def client_level_epsilon(
    *,
    num_clients: int,
    clients_per_round: int,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    accountant: str = 'rdp',
    cohort_sampling: str = 'poisson',
) -> float:
    """Epsilon of DP-FedAvg where a whole hospital is the protected unit.

    Each round is a Gaussian mechanism with noise multiplier z on the sum of clipped updates
    (`client_dp.noised_mean`; with adaptive clipping pass the configured z, not z_delta).

    cohort_sampling:
      'poisson' (default): PoissonSampledDpEvent(m/K, Gaussian(z)) composed over rounds, under
        add/remove-one-client adjacency. Exact if each hospital takes part independently with
        probability m/K. If the round instead draws a FIXED-SIZE cohort of m hospitals, this is
        an approximation (the usual one in the DP-FedAvg literature), not a proven bound; use
        'fixed_size' for a sound one.
      'fixed_size': SampledWithoutReplacementDpEvent(K, m, Gaussian(z/2)) under replace-one
        adjacency (RDP only; Wang, Balle & Kasiviswanathan 2019). Replacing a client moves the
        sum by up to 2S, hence z/2. Note that replace-one epsilons are roughly twice
        add/remove-one epsilons for the same mechanism, so the two are not directly comparable.
    When m == K every client takes part every round and both reduce to a plain Gaussian
    composed `rounds` times (add/remove-one).
    """
    _check_delta(delta)
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(
            f'clients_per_round ({clients_per_round}) must be in [1, num_clients={num_clients}].'
        )
    if rounds < 0 or noise_multiplier < 0:
        raise ValueError(
            f'rounds ({rounds}) and noise_multiplier ({noise_multiplier}) must be non-negative.'
        )
    z = float(noise_multiplier)
    if clients_per_round == num_clients:
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), int(rounds))
        return epsilon(event, delta, accountant)
    if cohort_sampling == 'poisson':
        event = dp_sgd_event(clients_per_round / num_clients, z, rounds)
        return epsilon(event, delta, accountant)
    if cohort_sampling == 'fixed_size':
        if accountant != 'rdp':
            raise ValueError(
                "cohort_sampling='fixed_size' is only supported by accountant='rdp' "
                "(dp-accounting's PLD has no sampling-without-replacement event); "
                f'got {accountant!r}.'
            )
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                int(num_clients), int(clients_per_round), dp_accounting.GaussianDpEvent(z / 2)
            ),
            int(rounds),
        )
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
        with _quiet_unconverged_orders():
            return float(_make_accountant('rdp', relation).compose(event).get_epsilon(delta))
    raise ValueError(f"cohort_sampling must be 'poisson' or 'fixed_size', got {cohort_sampling!r}.")
