"""The block printed when a run ends (and when a finished run is rerun): what it achieved, what
it cost and where its outputs are. Everything comes from the summary `train.run` returns and the
run's metrics.jsonl, so a rerun prints the same block."""

from __future__ import annotations

import json
import math
import os
import sys


def _rows(workdir: str) -> list[dict]:
    try:
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return 'n/a'
    if isinstance(value, int):
        return str(value)
    return f'{value:.4f}' if abs(value) < 1e4 else f'{value:.4g}'


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f'{seconds:.1f} s'
    seconds = int(round(seconds))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


# The metrics the block shows besides the main one, when the run has them (metrics.jsonl has all):
# chest X-ray accuracies at validation-chosen thresholds, BraTS per-case Dice and HD95 and the
# dataset-level Dice of each region.
HEADLINE = (
    'accuracy_at_val_threshold',
    'normal_vs_abnormal_accuracy',
    'mean_case_dice',
    'mean_hd95',
    'dice_wt',
    'dice_tc',
    'dice_et',
    'own_mean_auroc',
    'own_mean_dice',
)


# Long on purpose: the closing block is one sequence of lines in print order; each is a few
# lines of formatting that reads best where it is printed.
def summary_lines(
    summary: dict,
    *,
    workdir: str,
    main_metric: str,
    num_rounds: int,
    command_s: float | None = None,
) -> list[str]:
    """The closing block, one string per line."""
    rows = _rows(workdir) or [summary]
    done = int(summary.get('round') or 0)
    evaluated = next((r for r in reversed(rows) if f'eval/{main_metric}' in r), {})
    lines = ['', '=' * 30 + ' fedjax_med run summary ' + '=' * 30]
    if summary.get('summary/stopped'):
        status = f'stopped early: {summary["summary/stopped"]}'
    elif done >= num_rounds:
        status = 'finished'
    else:
        status = 'not finished: rerun the same command to continue'
    lines.append(f'rounds        {done}/{num_rounds} ({status})')
    if evaluated:
        keys = [
            f'eval/{name}'
            for name in (main_metric, *HEADLINE)
            if f'eval/{name}' in evaluated
            and (_number(evaluated[f'eval/{name}']) or evaluated[f'eval/{name}'] is None)
        ]
        at = evaluated.get('round')
        where = '' if at == done else f' (evaluated at round {at})'
        metrics = ', '.join(f'{k[len("eval/") :]} {_fmt(evaluated[k])}' for k in keys)
        lines.append(f'global test   {metrics}{where}')
    else:
        lines.append('global test   not evaluated yet')
    if summary.get('train/loss') is not None:
        lines.append(f'train loss    {_fmt(summary["train/loss"])}')
    eps = summary.get('privacy/epsilon')
    if eps is not None:
        per = summary.get('privacy/epsilon_per_hospital')
        over = f' (max over {len(per)} hospitals)' if isinstance(per, list) and per else ''
        lines.append(f'privacy       epsilon {_fmt(eps)}{over}')
    up = summary.get('comm/cum_bytes_up_per_client')
    down = summary.get('comm/cum_bytes_down_per_client')
    if up or down:
        lines.append(
            f'communication {(up or 0) / 1e6:.3f} MB up, {(down or 0) / 1e6:.3f} MB down '
            'per hospital'
        )
    rounds_s = sum(r.get('time/round_s') or 0.0 for r in rows if _number(r.get('time/round_s')))
    time_line = f'time          {_duration(rounds_s)} in {len(rows)} round(s)'
    if command_s is not None:
        time_line += f'; this command {_duration(command_s)}'
    lines.append(time_line)
    tensorboard = os.path.isdir(os.path.join(workdir, 'tensorboard'))
    lines.append(
        f'outputs       {workdir}: metrics.jsonl, summary.json, config.json, checkpoints/'
        + (', tensorboard/' if tensorboard else '')
    )
    if tensorboard:
        lines.append(f'tensorboard   tensorboard --logdir {workdir}')
    lines.append(f'report        python -m fedjax_med.report {workdir}')
    lines.append('=' * 84)
    return lines


def print_summary(summary: dict, **kwargs) -> None:
    print('\n'.join(summary_lines(summary, **kwargs)), file=sys.stdout, flush=True)
