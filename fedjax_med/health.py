"""Checks of each round's results on the host, before anything of the round is logged or saved.

`RoundMonitor.check(r, metrics)` stops the run (FloatingPointError, one line) when a round
produced something not finite, naming the setting most likely at fault:

- a hospital update or the training loss is not finite: config.local.learning_rate; or the DP
  noise, when its scale is huge (`noise_norm`); or config.server.learning_rate when earlier
  server steps had grown the global parameters by orders of magnitude, far beyond the mean
  update they applied;
- every hospital update was finite but the new global parameters are not (their norm, computed
  in the round, overflows: NaN, infinite, or beyond ~1e19): the server step, so
  config.server.learning_rate, or client-level DP noise when that is huge.

One exception: an aggregator that excludes faulty updates (the robust median, trimmed mean,
Krum and multi-Krum; `train/excluded_updates` in the round's metrics) has left every non-finite
hospital update out of the aggregate. The round then goes on if the new global parameters and
the training loss of the other hospitals (`train/finite_update_loss`) are finite; a one-line
warning is printed once, and the row logs `train/excluded_updates`. FedAvg (and every other
aggregator) excludes nothing, so a non-finite update still stops it.

It also prints a one-line warning, once, when the training loss grows to more than 100 times the
first round's (and above 10): the run is diverging although nothing is infinite yet.
"""

from __future__ import annotations

import math
import sys

import numpy as np

DIVERGENCE_FACTOR = 100.0
DIVERGENCE_FLOOR = 10.0
GROWTH_FACTOR = 1e3  # parameters this many times their initial norm: the server step diverged
HUGE_NOISE_NORM = 1e6  # DP noise of this norm (per update or per step) swamps any model
SERVER_AMPLIFICATION = 10.0  # new norm > this x (old norm + mean update norm): the server step


def noise_norm(config, privacy, num_params: int) -> float:
    """The expected L2 norm of the DP noise in one release, in parameter units: client-level DP,
    the noise on the mean update (z C / E[m]); DP-SGD, the noise on a step's mean gradient
    (sigma C / batch). 0 without DP."""
    dp = config.dp
    if dp.mode == 'client':
        per_coordinate = (
            privacy.noise_multiplier * dp.clip_norm / max(privacy.expected_clients, 1e-12)
        )
    elif dp.mode == 'sample':
        per_coordinate = privacy.noise_multiplier * dp.clip_norm / config.local.batch_size
    else:
        return 0.0
    return float(per_coordinate * math.sqrt(num_params))


class RoundMonitor:
    """Per-run state of the checks (first loss, parameter norms); see the module docstring."""

    def __init__(
        self,
        config,
        init_param_norm: float,
        history: list[dict],
        *,
        noise: float = 0.0,
        primary: bool = True,
    ):
        self.config = config
        self.init_norm = float(init_param_norm)
        self.noise = noise
        self.primary = primary
        self.first_loss = history[0].get('train/loss') if history else None
        previous = history[-1].get('train/param_norm') if history else None
        self.entering_norm = float(previous) if previous is not None else self.init_norm
        self.warned = False
        self.warned_excluded = False
        self.server_amplified = False

    def _noise_advice(self) -> str:
        dp = self.config.dp
        knob = (
            f'raise config.dp.target_epsilon (now {dp.target_epsilon})'
            if dp.target_epsilon > 0
            else f'lower config.dp.noise_multiplier (now {dp.noise_multiplier})'
        )
        what = (
            'client-level DP noise on the mean update'
            if dp.mode == 'client'
            else ('DP-SGD noise on each step')
        )
        return (
            f'The {what} has norm about {self.noise:.3g} (config.dp.clip_norm='
            f'{dp.clip_norm}): {knob}.'
        )

    def _server_advice(self) -> str:
        sc = self.config.server
        return (
            f'Lower config.server.learning_rate (now {sc.learning_rate}, '
            f'config.server.optimizer={sc.optimizer!r}).'
        )

    def _hospital_advice(self, diverging: bool = False) -> str:
        """What to change when the hospitals' training went wrong: the DP noise when it is huge,
        the server step when it had blown the parameters up, else the local learning rate."""
        if self.noise >= HUGE_NOISE_NORM:
            return self._noise_advice()
        if self.server_amplified:
            return (
                f'The server steps had grown the global parameters to norm '
                f'{self.entering_norm:.3g} (from {self.init_norm:.3g}), far more than the '
                f"hospitals' updates. {self._server_advice()}"
            )
        lr = self.config.local.learning_rate
        if diverging and self.config.mode == 'federated':
            return (
                f'Lower config.local.learning_rate (now {lr}) or '
                f'config.server.learning_rate (now {self.config.server.learning_rate}).'
            )
        return f'Lower config.local.learning_rate (now {lr}), or check the data.'

    # Long on purpose: one check per way a round can go wrong, in the order they are reported
    # (excluded updates, the hospitals, the server step, divergence), each with its advice.
    def check(self, r: int, metrics: dict) -> None:
        """Raises FloatingPointError if round r (0-based) went non-finite; warns on divergence."""
        loss = float(metrics['train/loss'])
        bad = int(metrics['train/nonfinite_updates'])
        param_norm = float(np.asarray(metrics['train/param_norm']))
        head = f'Round {r + 1}'
        tail = (
            'Nothing of this round was logged or checkpointed; after the fix, start over '
            'with --overwrite or in another --workdir.'
        )
        huge_noise = self.noise >= HUGE_NOISE_NORM
        excluded = int(metrics.get('train/excluded_updates', 0))
        if bad and excluded >= bad and math.isfinite(param_norm):
            # Every non-finite update was left out of the aggregate (a robust aggregator): the
            # round is judged by the other hospitals' loss.
            bad, loss = 0, float(metrics['train/finite_update_loss'])
            self._warn_excluded(r, excluded)
        if not math.isfinite(loss) or bad:
            what = (
                f'{bad} hospital update(s) are not finite (training loss {loss:.4g})'
                if bad
                else f'the training loss is {loss}'
            )
            raise FloatingPointError(f'{head}: {what}. {self._hospital_advice()} {tail}')
        if not math.isfinite(param_norm):
            if self.config.mode == 'local':  # no server step: each hospital's own update
                advice = (
                    f'Lower config.local.learning_rate (now {self.config.local.learning_rate}).'
                )
            elif huge_noise and self.config.dp.mode == 'client':
                advice = self._noise_advice()
            else:
                advice = self._server_advice()
            step = (
                'the local steps blew up'
                if self.config.mode == 'local'
                else 'the server step blew up'
            )
            raise FloatingPointError(
                f'{head}: the new global parameters are not finite (their norm is {param_norm}) '
                f'although every hospital update was finite (training loss {loss:.4g}): {step}. '
                f'{advice} {tail}'
            )
        update = float(np.asarray(metrics.get('train/update_norm', np.nan)))
        if (
            self.config.mode != 'local'
            and math.isfinite(update)
            and param_norm > GROWTH_FACTOR * max(self.init_norm, 1e-12)
            and param_norm > SERVER_AMPLIFICATION * (self.entering_norm + update)
        ):
            self.server_amplified = True  # the step moved far more than the mean update
        self.entering_norm = param_norm
        if self.first_loss is None:
            self.first_loss = loss
            return
        first = self.first_loss
        if (
            not self.warned
            and first is not None
            and loss > max(DIVERGENCE_FACTOR * first, DIVERGENCE_FLOOR)
        ):
            self.warned = True
            if self.primary:
                print(
                    f'fedjax_med: warning: round {r + 1} training loss {loss:.4g} is '
                    f"{loss / max(first, 1e-12):.3g}x the first round's ({first:.4g}): "
                    f'training is diverging. {self._hospital_advice(diverging=True)}',
                    file=sys.stderr,
                    flush=True,
                )

    def _warn_excluded(self, r: int, excluded: int) -> None:
        """The one-time warning that a robust aggregator left non-finite updates out."""
        if self.warned_excluded or not self.primary:
            return
        self.warned_excluded = True
        print(
            f'fedjax_med: warning: round {r + 1}: {excluded} hospital update(s) are not finite; '
            f'config.server.aggregator={self.config.server.aggregator!r} excluded them from the '
            'aggregate and the run goes on (logged as train/excluded_updates; this warning is '
            f'shown once). If it persists: {self._hospital_advice()}',
            file=sys.stderr,
            flush=True,
        )
