"""DP-SGD privacy calculator: epsilon from a noise multiplier, or the noise for a target epsilon.

    python -m fedjax_med.privacy.epsilon --dataset_size=60000 --batch_size=150 \\
        --noise_multiplier=1.3 --epochs=15 --delta=1e-5            # epsilon = 0.724 (RDP)
    python -m fedjax_med.privacy.epsilon --dataset_size=60000 --batch_size=150 \\
        --target_epsilon=1.0 --epochs=15 --delta=1e-5 --json       # calibrated noise multiplier

Poisson sampling with q = batch_size / dataset_size and steps = ceil(epochs * dataset_size /
batch_size) (or --steps), accounted with dp-accounting (see `accounting.py`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags

from fedjax_med.privacy import accounting

_DATASET_SIZE = flags.DEFINE_integer('dataset_size', None, 'Number of training examples N.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Expected (Poisson) batch size B.')
_NOISE_MULTIPLIER = flags.DEFINE_float(
    'noise_multiplier', None, 'Noise std / clip norm; give this or --target_epsilon.'
)
_TARGET_EPSILON = flags.DEFINE_float(
    'target_epsilon', None, 'Epsilon to calibrate the noise multiplier for.'
)
_EPOCHS = flags.DEFINE_float('epochs', None, 'Passes over the data; give this or --steps.')
_STEPS = flags.DEFINE_integer('steps', None, 'Number of DP-SGD steps; give this or --epochs.')
_DELTA = flags.DEFINE_float('delta', None, 'Target delta, e.g. 1e-5 (below 1/N).')
_ACCOUNTANT = flags.DEFINE_enum('accountant', 'rdp', accounting.ACCOUNTANTS, 'Privacy accountant.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a sentence.')


def _check_flags() -> None:
    missing = [
        f'--{flag.name}' for flag in (_DATASET_SIZE, _BATCH_SIZE, _DELTA) if flag.value is None
    ]
    if missing:
        raise ValueError(f'missing required flag(s): {", ".join(missing)}.')
    if (_NOISE_MULTIPLIER.value is None) == (_TARGET_EPSILON.value is None):
        raise ValueError(
            'give exactly one of --noise_multiplier (to compute epsilon) or --target_epsilon '
            '(to calibrate the noise multiplier).'
        )
    if (_EPOCHS.value is None) == (_STEPS.value is None):
        raise ValueError('give exactly one of --epochs or --steps.')


def run() -> dict[str, float | int | str]:
    """Computes the answer from the flags; raises ValueError with a readable message."""
    _check_flags()
    dataset_size, batch_size = _DATASET_SIZE.value, _BATCH_SIZE.value
    q = accounting.dp_sgd_sampling_probability(dataset_size=dataset_size, batch_size=batch_size)
    steps = _STEPS.value
    if steps is None:
        steps = accounting.dp_sgd_steps(
            dataset_size=dataset_size, batch_size=batch_size, epochs=_EPOCHS.value
        )
    result = {
        'dataset_size': dataset_size,
        'batch_size': batch_size,
        'epochs': _EPOCHS.value,
        'steps': steps,
        'sampling_probability': q,
        'delta': _DELTA.value,
        'accountant': _ACCOUNTANT.value,
    }
    if _TARGET_EPSILON.value is None:
        result['noise_multiplier'] = _NOISE_MULTIPLIER.value
        result['epsilon'] = accounting.compute_dp_sgd_epsilon(
            dataset_size=dataset_size,
            batch_size=batch_size,
            noise_multiplier=_NOISE_MULTIPLIER.value,
            steps=steps,
            delta=_DELTA.value,
            accountant=_ACCOUNTANT.value,
        )
    else:
        result['target_epsilon'] = _TARGET_EPSILON.value
        result['noise_multiplier'] = accounting.calibrate_noise_multiplier(
            target_epsilon=_TARGET_EPSILON.value,
            sampling_probability=q,
            steps=steps,
            delta=_DELTA.value,
            accountant=_ACCOUNTANT.value,
        )
    return result


def _sentence(result: dict[str, float | int | str]) -> str:
    setting = (
        f'Poisson sampling q={result["sampling_probability"]:.6g} '
        f'(batch {result["batch_size"]} of {result["dataset_size"]}), {result["steps"]} steps, '
        f'delta={result["delta"]:g}, {str(result["accountant"]).upper()} accountant'
    )
    if 'target_epsilon' in result:
        return (
            f'noise_multiplier = {result["noise_multiplier"]:.4f} reaches '
            f'epsilon <= {result["target_epsilon"]:g} with {setting}.'
        )
    return (
        f'epsilon = {result["epsilon"]:.4f} for noise_multiplier={result["noise_multiplier"]:g} '
        f'with {setting}.'
    )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        sys.exit(f'epsilon: unexpected arguments {argv[1:]}; all inputs are --flags.')
    try:
        result = run()
    except ValueError as e:
        sys.exit(f'epsilon: error: {e}')
    print(json.dumps(result) if _JSON.value else _sentence(result))


if __name__ == '__main__':
    app.run(main)
