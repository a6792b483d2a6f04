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
  the canaries scored again on the checkpointed model, next to the figures the run logged;
- **gradient inversion** (`--inversion`, off by default; `inversion.py`, Geiping et al. 2020):
  a curious server inverts one hospital's (`--inversion_hospital`) first-round gradient, one
  local step of the round-1 global model (the run's initial parameters) on `--inversion_images`
  of its own training images, in the clear, as DP-SGD would send it (the run's C and sigma_k, or
  C = 1 and sigma = 1 for a run without sample-level DP) and SecAgg-masked, for
  `--inversion_steps` Adam steps. A model of more than `_INVERSION_MAX_PARAMS` parameters or
  images above 64 px are swapped for the smoke-sized ResNet at 32 px (audit.json says so).
  PSNR and SSIM go to audit.json's 'inversion', the images to RUN/inversion.png.

Writes RUN/audit.json, RUN/audit_roc.png (matplotlib: the ROC curves on log axes and, with
canaries, the IN / OUT canary scores; with --inversion also RUN/inversion.png) and prints a
short summary. A workdir that is missing, is no run, or holds a run that has not finished is one
line naming --workdir, its value and the fix, with exit status 2 (so is an --inversion_* value
the run cannot take).
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

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags; defined only when it runs as a command, so that importing the
    module (the tests) adds nothing to absl's global flags, which other commands share."""
    flags.DEFINE_string('workdir', None, 'A finished run (its config.json, checkpoints/).')
    flags.DEFINE_integer(
        'max_examples', 2000, 'Membership inference: at most this many members and non-members.'
    )
    flags.DEFINE_integer(
        'shadow_models', 0, 'Offline LiRA: shadow runs to train (0: skip LiRA; each costs a run).'
    )
    flags.DEFINE_integer(
        'lira_hospital',
        None,
        'Offline LiRA: the hospital attacked (default: the canary one, or 0).',
    )
    flags.DEFINE_bool(
        'inversion', False, "Gradient inversion of one hospital's first-round gradient (cheap)."
    )
    flags.DEFINE_integer(
        'inversion_hospital', 0, 'Gradient inversion: the hospital whose gradient is attacked.'
    )
    flags.DEFINE_integer(
        'inversion_images', 2, 'Gradient inversion: images in the attacked batch (1 to 8).'
    )
    flags.DEFINE_integer(
        'inversion_steps', 300, "Gradient inversion: the attacker's Adam steps per case."
    )


# Above this many parameters (or 64 px), the inversion attacks the smoke-sized model instead:
# each attacker step differentiates through the gradient of the model, twice a training step.
_INVERSION_MAX_PARAMS = 500_000


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
    workdir: str,
    *,
    max_examples: int = 2000,
    shadow_models: int = 0,
    lira_hospital=None,
    inversion: dict | None = None,
) -> dict:
    """Audits the finished run in `workdir`; writes audit.json (+ audit_roc.png) there.
    `inversion`: None (off) or {'hospital', 'images', 'steps'} (`_inversion`)."""
    from fedjax_med import auditor

    exp, params, latest, last = load(workdir)
    config = exp.config
    if shadow_models:
        lira_hospital = _lira_hospital(exp, shadow_models, lira_hospital)
    if inversion is not None:
        _check_inversion(exp, **inversion)
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
    if inversion is not None:
        result['inversion'] = _inversion(exp, workdir, **inversion)
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


def _check_inversion(exp, *, hospital: int, images: int, steps: int) -> None:
    """AuditError for --inversion_* values the run cannot take (before anything is computed)."""
    if not 0 <= hospital < exp.num_clients:
        raise AuditError(
            f'--inversion_hospital={hospital}: no such hospital; use 0..{exp.num_clients - 1}.'
        )
    available = len(real_train_split(exp, hospital)['image'])
    if not 1 <= images <= min(8, available):
        raise AuditError(
            f'--inversion_images={images}: the attacked batch takes 1 to {min(8, available)} '
            'images; use a small batch such as 2.'
        )
    if steps < 1:
        raise AuditError(f'--inversion_steps={steps}: must be at least 1; e.g. 300.')
    if exp.config.task != 'chestxray14':
        raise AuditError(
            f'--inversion: the attack inverts 2-D chest X-ray classifiers, and this run is '
            f'{exp.config.task!r}; leave --inversion off.'
        )


# Long on purpose: choosing the attacked model (the run's or the smoke-sized one), the batch and
# the run's own DP-SGD and SecAgg settings is the whole recipe, and audit.json records each.
def _inversion(exp, workdir: str, *, hospital: int, images: int, steps: int) -> dict:
    """Gradient inversion of hospital `hospital`'s first-round gradient (module docstring):
    audit.json's 'inversion' entry; writes RUN/inversion.png."""
    import jax

    from fedjax_med import inversion
    from fedjax_med.data import storage
    from fedjax_med.evaluation import param_count

    config = exp.config
    split = real_train_split(exp, hospital)
    batch = storage.decode({k: np.asarray(split[k][:images]) for k in ('image', 'label')})
    params, apply_fn = exp.state.params, exp.apply_fn  # the model broadcast in round 1
    if config.mode == 'local':  # one model per hospital: its own row
        params = jax.tree.map(lambda x: x[hospital], params)
    side = batch['image'].shape[1]
    model_note = f"the run's own {config.model.name} (initial parameters, {side} px)"
    size = param_count(params)
    if size > _INVERSION_MAX_PARAMS or side > 64:
        import ml_collections

        from fedjax_med import models

        small = ml_collections.ConfigDict(config.model.to_dict())
        small.update(name='resnet_small', width=8, depth=2, norm_groups=4)
        model = models.build_model(small, config.task)
        shape = (images, 32, 32, batch['image'].shape[-1])
        batch['image'] = np.asarray(jax.image.resize(batch['image'], shape, 'linear'))
        params = model.init(jax.random.key(config.seed), batch['image'][:1])
        apply_fn = model.apply
        model_note = (
            f"the smoke-sized resnet_small (width 8, depth 2) at 32 px, not the run's "
            f'{config.model.name} ({size} parameters, {side} px), '
            'which is too large for a cheap attack'
        )
    sample_dp = config.dp.mode == 'sample'
    clip = float(config.dp.clip_norm) if sample_dp else 1.0
    sigma = float(exp.privacy.noise_multipliers[hospital]) if sample_dp else 1.0
    result = inversion.attack_cases(
        apply_fn,
        exp.task.per_example_loss,
        params,
        batch['image'],
        batch['label'],
        seed=config.seed,
        steps=steps,
        clip_norm=clip,
        noise_multiplier=sigma,
        secagg_clip=float(config.secagg.clip),
        num_clients=exp.num_clients,
    )
    name = exp.hospital_names[hospital]
    inversion.figure(
        os.path.join(workdir, 'inversion.png'),
        batch['image'],
        result,
        f"Gradient inversion of {name}'s first-round gradient\n({images} images, {steps} steps)",
    )
    return {
        'hospital': name,
        'images': images,
        'steps': steps,
        'model': model_note,
        'observed': "one local step's gradient at the round-1 global model (labels known)",
        'dp_sgd_settings': {
            'clip_norm': clip,
            'noise_multiplier': sigma,
            'from': 'the run' if sample_dp else 'C = 1, sigma = 1 (the run has no sample-level DP)',
        },
        'secagg_clip': float(config.secagg.clip),
        'flat_image_psnr': inversion.flat_image_psnr(batch['image']).tolist(),
        'figure': os.path.join(workdir, 'inversion.png'),
        **{
            case: {k: np.asarray(v).tolist() for k, v in r.items() if k != 'reconstruction'}
            for case, r in result.items()
        },
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
    if 'inversion' in result:
        inv = result['inversion']
        cases = ', '.join(
            f'{label} {inv[c]["psnr_mean"]:.1f} dB / SSIM {inv[c]["ssim_mean"]:.2f}'
            for c, label in (('plain', 'no DP'), ('dp_sgd', 'DP-SGD'), ('secagg', 'SecAgg'))
        )
        lines.append(
            f'  gradient inversion {inv["hospital"]} ({inv["images"]} images, {inv["steps"]} '
            f'steps; {inv["model"]}): {cases}; figure {inv["figure"]}'
        )
    lines.append(f'  wrote {os.path.join(result["workdir"], "audit.json")} and {result["figure"]}')
    return lines


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        sys.exit(f'fedjax_med.audit: unexpected arguments {argv[1:]}; all inputs are --flags.')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)
    if not FLAGS.workdir:
        print(
            'fedjax_med.audit: error: --workdir is required: the workdir of a finished run, '
            'e.g. --workdir=runs/cxr.',
            file=sys.stderr,
        )
        sys.exit(2)
    from fedjax_med.validate import ConfigError

    try:
        result = run(
            FLAGS.workdir,
            max_examples=FLAGS.max_examples,
            shadow_models=FLAGS.shadow_models,
            lira_hospital=FLAGS.lira_hospital,
            inversion=(
                {
                    'hospital': FLAGS.inversion_hospital,
                    'images': FLAGS.inversion_images,
                    'steps': FLAGS.inversion_steps,
                }
                if FLAGS.inversion
                else None
            ),
        )
    except AuditError as e:
        print(f'fedjax_med.audit: error: {e}', file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:
        for problem in e.problems:
            print(f'fedjax_med.audit: error: --workdir={FLAGS.workdir}: {problem}', file=sys.stderr)
        sys.exit(2)
    print('\n'.join(summary_lines(result)))


if __name__ == '__main__':
    define_flags()
    app.run(main)
