"""What an attacker can do with a finished run: `python -m fedjax_med.audit --workdir=RUN`.

Loads the run as it was trained (its config.json, rebuilt by `experiment.build`: the same data,
the same canaries, the same privacy plan) and its latest checkpoint, then attacks the released
model (`auditor.py`; the methods and their references are in `privacy/auditing.py`):

- **membership inference** on every hospital: the loss-threshold attack, members the
  hospital's training examples (its canaries excluded) and non-members its test split, at most
  `--max_examples` of each: ROC AUC and TPR at FPR 1% and 0.1%;
- **offline LiRA** (`--shadow_models=N`, default 0: off) on one hospital (`--lira_hospital`):
  N shadow runs of the same config on the federation without that hospital (so none of its
  examples, member or not, is in any shadow; seeds seed + 1 ... seed + N; SecAgg off in the
  shadows, which changes what the server sees, not the model), trained here from scratch, each
  costing about one training run;
- **the one-run canary audit**, if the run planted canaries (`config.audit.num_canaries > 0`):
  the canaries scored again on the checkpointed model, next to the figures the run logged.

Writes RUN/audit.json, RUN/audit_roc.png (matplotlib: the ROC curves on log axes and, with
canaries, the IN / OUT canary scores) and prints a short summary. A workdir that is missing, is
no run, or holds a run that has not finished is one line naming --workdir, its value and the fix,
with exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging

from fedjax_med.privacy import auditing

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run (its config.json, checkpoints/).')
_MAX_EXAMPLES = flags.DEFINE_integer(
    'max_examples', 2000, 'Membership inference: at most this many members and non-members.'
)
_SHADOW_MODELS = flags.DEFINE_integer(
    'shadow_models', 0, 'Offline LiRA: shadow runs to train (0: skip LiRA; each costs a run).'
)
_LIRA_HOSPITAL = flags.DEFINE_integer(
    'lira_hospital', None, 'Offline LiRA: the hospital attacked (default: the canary one, or 0).'
)


class AuditError(ValueError):
    """A workdir that cannot be audited: one line naming the flag, the value and the fix."""


def _finished_run(workdir: str) -> tuple[dict, int]:
    """(the run's config.json, the round of its latest checkpoint); AuditError if it has none
    or has not finished."""
    from fedjax_med import checkpoint as ckpt_lib

    flag = f'--workdir={workdir}'
    if not os.path.isdir(workdir):
        raise AuditError(f'{flag}: no such folder; give the workdir of a finished training run.')
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        raise AuditError(
            f'{flag} holds no config.json, so it is not a fedjax_med run; give the --workdir '
            'that `python -m fedjax_med.main` trained.'
        )
    with open(path) as f:
        saved = json.load(f)
    directory = os.path.join(workdir, 'checkpoints')
    latest = None
    if os.path.isdir(directory):
        checkpointer = ckpt_lib.Checkpointer(directory)
        latest = checkpointer.latest_round()
        checkpointer.close()
    if latest is None:
        raise AuditError(
            f'{flag} holds no checkpoint; train it first (python -m fedjax_med.main '
            f'--config=... --workdir={workdir}).'
        )
    summary_path = os.path.join(workdir, 'summary.json')
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    # Finished: every round checkpointed, or stopped at the privacy budget.
    if latest < saved.get('num_rounds', 0) and not summary.get('summary/stopped'):
        raise AuditError(
            f'{flag} has not finished (checkpoint at round {latest} of '
            f'{saved.get("num_rounds")}); rerun its training command to finish it, then audit.'
        )
    return saved, latest


def load(workdir: str):
    """(experiment, params of the latest checkpoint, that round, the last metrics row) of a
    finished run, the privacy accountant restored to it."""
    import ml_collections

    from fedjax_med import checkpoint as ckpt_lib
    from fedjax_med import experiment, parallel
    from fedjax_med import workdir as workdir_lib
    from fedjax_med.validate import validate

    saved, latest = _finished_run(workdir)
    config = ml_collections.ConfigDict(ckpt_lib.with_added_fields(saved))
    validate(config)
    problem = workdir_lib.missing_data_problem(config)  # a real dataset that is not built here
    if problem:
        raise AuditError(f'--workdir={workdir}: {problem}')
    exp = experiment.build(config, parallel.make_mesh(), warm_start=False)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
    try:
        state, host = checkpointer.restore(latest, exp.state)
    finally:
        checkpointer.close()
    exp.privacy.load_state_dict(host['privacy'])
    last = host['history'][-1] if host['history'] else {}
    return exp, state.params, latest, last


def real_train_split(exp, hospital: int) -> dict:
    """Hospital `hospital`'s own training examples (its planted canaries left out)."""
    split = exp.data.clients_train[hospital]
    if exp.canaries is not None and exp.canaries.hospital == hospital:
        return {k: v[: exp.canaries.num_real] for k, v in split.items()}
    return split


def train_shadow(config, data, *, without: int, index: int):
    """Parameters of a run of `config` on `data` without hospital `without` (seed + index + 1,
    no canaries, no SecAgg): a shadow model that never saw that hospital's examples."""
    from fedjax_med import experiment, parallel

    config = config.copy_and_resolve_references()
    config.seed = int(config.seed) + index + 1
    config.audit.num_canaries = 0
    config.secagg.enabled = False
    keep = [h for h in range(len(data.clients_train)) if h != without]
    data = dataclasses.replace(
        data,
        clients_train=[data.clients_train[h] for h in keep],
        clients_test=[data.clients_test[h] for h in keep],
        client_names=[data.client_names[h] for h in keep],
    )
    exp = experiment.build(config, parallel.make_mesh(), warm_start=False, data=data)
    state = exp.state
    for r in range(config.num_rounds):
        prepared = exp.planner.prepare(r)
        if isinstance(prepared, str):  # the privacy budget: the shadow stops where a run would
            break
        state, _ = exp.round_fn(
            state, exp.client_data, prepared.inputs, exp.round_key(config.seed, r)
        )
        exp.privacy.record(prepared.round_steps[: exp.num_clients])
    return state.params


def _logit_confidence(scores):
    """LiRA's logit scaling of a negative loss s: log(p / (1 - p)) with p = e^s."""
    loss = np.maximum(-np.asarray(scores, np.float64), 1e-12)
    return -loss - np.log(-np.expm1(-loss))


def run(
    workdir: str, *, max_examples: int = 2000, shadow_models: int = 0, lira_hospital=None
) -> dict:
    """Audits the finished run in `workdir`; writes audit.json (+ audit_roc.png) there."""
    from fedjax_med import auditor

    exp, params, latest, last = load(workdir)
    config = exp.config
    if shadow_models:
        lira_hospital = _lira_hospital(exp, shadow_models, lira_hospital)
    local = config.mode == 'local'
    result = {
        'workdir': os.path.abspath(workdir),
        'round': latest,
        'num_rounds': config.num_rounds,
        'score': 'black-box: negative per-example training loss of the released model',
        'dp_mode': config.dp.mode,
        'accountant': exp.privacy.metrics(),
        'mia': {},
    }
    curves, attacked = {}, {}
    for h, name in enumerate(exp.hospital_names):
        attacked[h] = auditor.attack_splits(
            real_train_split(exp, h),
            exp.data.clients_test[h],
            max_examples=max_examples,
            seed=config.seed,
            hospital=h,
        )
        loss_fn = auditor.build_loss_fn(exp.apply_fn, exp.task, h if local else None)
        curves[name] = tuple(
            auditor.scores(loss_fn, params, split, batch_size=config.eval_batch_size, mesh=exp.mesh)
            for split in attacked[h]
        )
        result['mia'][name] = auditing.mia_metrics(*curves[name])
    if shadow_models:
        result['lira'] = _lira(exp, curves, attacked[lira_hospital], shadow_models, lira_hospital)
    if exp.auditor is not None:
        logged = {k: v for k, v in last.items() if k.startswith(('audit/', 'privacy/epsilon'))}
        result['canary_audit'] = {'rescored': exp.auditor.audit(params), 'logged': logged}
    with open(os.path.join(workdir, 'audit.json'), 'w') as f:
        json.dump(_json_safe(result), f, indent=2)
    result['figure'] = _figure(workdir, curves, exp, params)
    return result


def _lira_hospital(exp, shadow_models: int, hospital) -> int:
    """The hospital offline LiRA attacks; AuditError where shadow runs cannot be trained."""
    if exp.config.mode == 'local' or exp.num_clients < 2:
        raise AuditError(
            f'--shadow_models={shadow_models}: offline LiRA trains shadow runs without the '
            'attacked hospital, which needs a federated or centralised run of at least 2 '
            'hospitals; leave --shadow_models=0.'
        )
    if hospital is None:
        return exp.canaries.hospital if exp.canaries is not None else 0
    if not 0 <= hospital < exp.num_clients:
        raise AuditError(
            f'--lira_hospital={hospital}: no such hospital; use 0..{exp.num_clients - 1}.'
        )
    return hospital


def _lira(exp, curves: dict, splits: tuple, shadow_models: int, hospital: int) -> dict:
    """Offline LiRA on one hospital's attacked members and non-members (module docstring)."""
    from fedjax_med import auditor

    name = exp.hospital_names[hospital]
    members, nonmembers = curves[name]
    loss_fn = auditor.build_loss_fn(exp.apply_fn, exp.task)
    shadow_scores = []
    for i in range(shadow_models):
        shadow = train_shadow(exp.config, exp.data, without=hospital, index=i)
        shadow_scores.append(
            [
                auditor.scores(
                    loss_fn, shadow, s, batch_size=exp.config.eval_batch_size, mesh=exp.mesh
                )
                for s in splits
            ]
        )
    n = len(members)
    target = _logit_confidence(np.concatenate([members, nonmembers]))
    shadows = [_logit_confidence(np.concatenate(pair)) for pair in shadow_scores]
    lira = auditing.lira_offline_scores(target, np.stack(shadows))
    # The threshold attack on the shadows themselves, which saw neither group: members and
    # non-members should look alike to them (AUC near 0.5).
    shadow_auc = [auditing.auc(m, o) for m, o in shadow_scores]
    return {
        'hospital': name,
        'shadow_models': shadow_models,
        **auditing.mia_metrics(lira[:n], lira[n:]),
        'shadow_threshold_auc': shadow_auc,
    }


def _json_safe(value):
    from fedjax_med.writers import json_safe

    return json_safe(value)


def _figure(workdir: str, curves: dict, exp, params) -> str:
    """audit_roc.png: each hospital's ROC on log axes; with canaries, their scores IN vs OUT."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if exp.auditor is not None else 1
    fig = Figure(figsize=(5 * panels, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, panels, 1)
    for name, (members, nonmembers) in curves.items():
        fpr, tpr = auditing.roc_curve(members, nonmembers)
        auc = auditing.auc(members, nonmembers)
        ax.plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=f'{name} (AUC {auc:.2f})')
    ax.plot([1e-4, 1], [1e-4, 1], 'k:', lw=1)
    ax.set(xscale='log', yscale='log', xlabel='false positive rate', ylabel='true positive rate')
    ax.set_title('Membership inference (loss threshold)', fontsize=10)
    ax.legend(fontsize=7)
    if exp.auditor is not None:
        scores, included = exp.auditor.scores(params), exp.canaries.included
        ax2 = fig.add_subplot(1, 2, 2)
        bins = np.linspace(scores.min(), scores.max() + 1e-9, 30)
        ax2.hist(scores[included], bins, alpha=0.6, label='IN (trained on)')
        ax2.hist(scores[~included], bins, alpha=0.6, label='OUT (never trained on)')
        ax2.set(xlabel='canary score (negative loss)', ylabel='canaries')
        ax2.set_title('Canaries on the released model', fontsize=10)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, 'audit_roc.png')
    fig.savefig(path, dpi=110)
    return path


def summary_lines(result: dict) -> list[str]:
    """The printed summary of `run`'s result."""
    lines = [
        f'audit of {result["workdir"]} (round {result["round"]} of {result["num_rounds"]}; '
        f'scores: {result["score"]})'
    ]
    for name, m in result['mia'].items():
        lines.append(
            f'  membership inference {name}: AUC {m["auc"]:.3f}, TPR {m["tpr_at_fpr_1pct"]:.3f} '
            f'at FPR 1%, {m["tpr_at_fpr_0.1pct"]:.3f} at FPR 0.1% ({m["num_members"]} members, '
            f'{m["num_nonmembers"]} non-members)'
        )
    if 'lira' in result:
        lira = result['lira']
        lines.append(
            f'  offline LiRA {lira["hospital"]} ({lira["shadow_models"]} shadow runs): AUC '
            f'{lira["auc"]:.3f}, TPR {lira["tpr_at_fpr_1pct"]:.3f} at FPR 1%'
        )
    if 'canary_audit' in result:
        a = result['canary_audit']['rescored']
        eps = a['accountant_epsilon']
        lines.append(
            f'  canary audit: epsilon >= {a["epsilon_lower"]:.3f} at {a["confidence"]:.0%} '
            f'confidence ({a["correct"]} of {a["guesses"]} guesses right; {a["num_canaries"]} '
            f'{a["kind"]} canaries, {a["num_included"]} trained on, delta {a["delta"]:.3g})'
            + (f"; the accountant's epsilon {eps:.3f}" if eps is not None else '; no DP')
        )
    lines.append(f'  wrote {os.path.join(result["workdir"], "audit.json")} and {result["figure"]}')
    return lines


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        sys.exit(f'fedjax_med.audit: unexpected arguments {argv[1:]}; all inputs are --flags.')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)
    if not _WORKDIR.value:
        print(
            'fedjax_med.audit: error: --workdir is required: the workdir of a finished run, '
            'e.g. --workdir=runs/cxr.',
            file=sys.stderr,
        )
        sys.exit(2)
    from fedjax_med.validate import ConfigError

    try:
        result = run(
            _WORKDIR.value,
            max_examples=_MAX_EXAMPLES.value,
            shadow_models=_SHADOW_MODELS.value,
            lira_hospital=_LIRA_HOSPITAL.value,
        )
    except AuditError as e:
        print(f'fedjax_med.audit: error: {e}', file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:
        for problem in e.problems:
            print(
                f'fedjax_med.audit: error: --workdir={_WORKDIR.value}: {problem}', file=sys.stderr
            )
        sys.exit(2)
    print('\n'.join(summary_lines(result)))


if __name__ == '__main__':
    app.run(main)
