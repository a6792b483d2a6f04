"""The privacy plan of a run, built once: noise calibration, each hospital's sigma, the padded
Poisson batch, the accountant and the budget stop (`PrivacyPlan`).

Sample-level DP ('sample'): hospital k runs DP-SGD with Poisson rate q_k = B / n_k and
steps_k = ceil(epochs * n_k / B) local steps per round in which it takes part; its patients'
epsilon composes exactly those steps with its own noise multiplier sigma_k
(`accounting.HospitalAccountant`). The headline epsilon is the max over hospitals (parallel
composition: a patient belongs to one hospital). With `dp.target_epsilon`, sigma_k is the smallest
noise multiplier that keeps hospital k at or below the target after `num_rounds` rounds of full
participation (so partial participation only makes epsilon smaller): every hospital ends at the
target, and a large hospital (small q_k) adds less noise than a small one. With
`dp.noise_per_hospital=False` all hospitals use the largest sigma_k instead (the smallest
hospital's; the others end below the target). Training stops before a round would exceed the
target.

Client-level DP ('client'): DP-FedAvg over hospitals, one Gaussian release per round;
cohorts of m < K hospitals are fixed-size samples and are accounted as sampling without
replacement (RDP). With adaptive clipping the update noise uses z_delta (Andrew et al. 2021) and
the configured z is what is accounted. With secure aggregation each hospital adds its share of
the noise; hospitals that drop take their share with them, so the accounted noise multiplier is
z * sqrt(survivors / m) for the guaranteed number of survivors.

Poisson batches are padded to `max_batch` slots; a step that draws more is truncated. Under
DP-SGD `max_batch` keeps each hospital's chance of that anywhere in the run at most 1e-3 of its
delta, counted with its (planned) epsilon (data/batching.py).

Besides its own package (accounting, client_dp) this module imports `data.batching`, for the
Poisson tail bounds.
"""

import math

import ml_collections
import numpy as np

from fedjax_med.data import batching
from fedjax_med.privacy import accounting, client_dp


class PrivacyPlan:
    """Host-side privacy state of a run (its accountant checkpointed through `state_dict`).

    Args:
      config: the run's config.
      sizes, steps: each training hospital's examples and local steps per round (no padding).
    Raises:
      ValueError: a privacy target these hospitals cannot meet.
    """

    # Long on purpose: calibration of every hospital's sigma, the accountants and the padded
    # Poisson batch depend on one another and are set up once, in this order.
    def __init__(self, config: ml_collections.ConfigDict, sizes: np.ndarray, steps: np.ndarray):
        self.config, dp = config, config.dp
        self.mode = dp.mode
        k = len(sizes)
        m = config.clients_per_round if 0 < config.clients_per_round < k else k
        self.expected_clients = float(m)
        self.noise_multiplier = 0.0  # what the round applies (sample: the largest sigma_k)
        self.noise_multipliers = np.zeros(k)  # sample-level DP: sigma_k of each hospital
        self.accounted_noise = 0.0  # what the accountant is told
        self.rounds_done = 0
        self.accountant = None
        if self.mode == 'sample':
            b = config.local.batch_size
            self.q = [min(1.0, b / n) for n in sizes]
            self.deltas = [dp.delta or 1.0 / (10 * n) for n in sizes]
            if dp.target_epsilon > 0:
                sigmas = np.array(
                    [
                        accounting.calibrate_noise_multiplier(
                            target_epsilon=dp.target_epsilon,
                            sampling_probability=q,
                            steps=int(s) * config.num_rounds,
                            delta=d,
                            accountant=dp.accountant,
                        )
                        for q, s, d in zip(self.q, steps, self.deltas, strict=True)
                    ]
                )
                if not dp.noise_per_hospital:
                    sigmas = np.full(k, sigmas.max())
            else:
                sigmas = np.full(k, float(dp.noise_multiplier))
            self.noise_multipliers = sigmas
            self.noise_multiplier = self.accounted_noise = float(sigmas.max())
            self.accountant = accounting.HospitalAccountant(
                self.q, list(sigmas), self.deltas, dp.accountant
            )
        elif self.mode == 'client':
            self.num_clients, self.m = k, m
            self.delta = dp.delta or 1.0 / (10 * k)
            self.cohort = 'poisson' if m == k else 'fixed_size'
            if self.cohort == 'fixed_size' and dp.accountant != 'rdp':
                raise ValueError(
                    f'config.dp.accountant={dp.accountant!r}: client-level DP with '
                    f'a fixed cohort of {m} of {k} hospitals is accounted with RDP '
                    "only; set config.dp.accountant='rdp'."
                )
            survivors = (
                m - math.floor(config.secagg.dropout_fraction * m) if (config.secagg.enabled) else m
            )
            shrink = math.sqrt(survivors / m)
            if dp.target_epsilon > 0:
                z = self._calibrate_client(dp.target_epsilon) / shrink
            else:
                z = dp.noise_multiplier
            self.accounted_noise = z * shrink
            self.noise_multiplier = (
                client_dp.effective_noise_multiplier(z, dp.count_noise_std)
                if dp.adaptive_clip
                else z
            )
        self.max_batch = self._max_batch(sizes, steps)

    def _max_batch(self, sizes: np.ndarray, steps: np.ndarray) -> int:
        """Slots of a padded local batch: the batch size, or for Poisson sampling the bound of
        data/batching.py (under DP-SGD tight enough to add at most 1e-3 delta_k)."""
        config = self.config
        if config.local.sampling != 'poisson':
            return config.local.batch_size
        tail = batching.POISSON_TAIL
        if self.mode == 'sample':
            planned = config.dp.target_epsilon or float(
                np.max(self.accountant.epsilon_after(steps * config.num_rounds))
            )
            tail = batching.run_overflow_tail(
                steps,
                config.num_rounds,
                self.deltas,
                epsilon=planned if math.isfinite(planned) and planned < 50 else None,
            )
        return batching.poisson_max_batch(config.local.batch_size, sizes, tail)

    # -- client-level helpers ---------------------------------------------------------------
    def _client_epsilon(self, z: float, rounds: int) -> float:
        return accounting.client_level_epsilon(
            num_clients=self.num_clients,
            clients_per_round=self.m,
            noise_multiplier=z,
            rounds=rounds,
            delta=self.delta,
            accountant=self.config.dp.accountant,
            cohort_sampling=self.cohort,
        )

    def _calibrate_client(self, target: float) -> float:
        rounds = self.config.num_rounds
        lo, hi = 1e-2, 1.0
        while self._client_epsilon(hi, rounds) > target:
            hi *= 2
            if hi > 1e4:
                raise ValueError(
                    f'config.dp.target_epsilon={target} cannot be met by client-level DP over '
                    f'{rounds} rounds with {self.m} of {self.num_clients} hospitals per round; '
                    'raise the target or use fewer rounds.'
                )
        for _ in range(40):  # bisection on a monotone function; stop on the safe side (hi)
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self._client_epsilon(mid, rounds) <= target else (mid, hi)
        return hi

    # -- per round ----------------------------------------------------------------------------
    def check_budget(self, round_steps: np.ndarray) -> str | None:
        """A message if running this round would exceed dp.target_epsilon, else None."""
        target = self.config.dp.target_epsilon
        if self.mode == 'none' or target <= 0:
            return None
        if self.mode == 'sample':
            after = float(np.max(self.accountant.epsilon_after(round_steps)))
        else:
            after = self._client_epsilon(self.accounted_noise, self.rounds_done + 1)
        if after <= target * (1 + 1e-6):
            return None
        return (
            f'Privacy budget reached: another round would take epsilon to {after:.3f} > '
            f'config.dp.target_epsilon={target} after {self.rounds_done} rounds. Stopping '
            'here. To train on knowingly, raise config.dp.target_epsilon (the guarantee '
            'becomes the larger value).'
        )

    def record(self, round_steps: np.ndarray) -> None:
        """Adds one round: the local DP-SGD steps each hospital ran (0 if it sat out)."""
        self.rounds_done += 1
        if self.mode == 'sample':
            self.accountant.record(round_steps)

    def metrics(self) -> dict:
        if self.mode == 'none':
            return {'privacy/epsilon': None}
        if self.mode == 'sample':
            eps = self.accountant.epsilons()
            return {
                'privacy/epsilon': float(eps.max()),
                'privacy/epsilon_per_hospital': [float(e) for e in eps],
                'privacy/noise_multiplier': self.noise_multiplier,
                'privacy/noise_multiplier_per_hospital': [float(z) for z in self.noise_multipliers],
            }
        return {
            'privacy/epsilon': self._client_epsilon(self.accounted_noise, self.rounds_done),
            'privacy/noise_multiplier': self.accounted_noise,
        }

    def state_dict(self) -> dict:
        out = {'rounds_done': self.rounds_done}
        if self.accountant is not None:
            out['accountant'] = self.accountant.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.rounds_done = state['rounds_done']
        if 'accountant' in state:
            self.accountant = accounting.HospitalAccountant.from_state_dict(state['accountant'])
