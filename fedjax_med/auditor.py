"""Attacks on a run's released model: the one-run canary audit and membership inference.

The numbers come from `privacy/auditing.py` (the method, its references and bounds); this module
scores examples with a run's model on the devices and puts the results in the run's terms.

**Scores are black-box**: the negative per-example training loss (`Task.per_example_loss`) of
the released model, the global model of a federated or centralised run, the hospital's own
model in local mode. No gradients, no intermediate models: what anyone holding the released
parameters and the example can compute.

**`CanaryAuditor`** (`config.audit.num_canaries > 0`; the canaries are planted by
`data/canaries.py` when the experiment is built): at every evaluation it scores the m canaries
and adds to the metrics row
  privacy/epsilon_audit_lower   the one-run audit's epsilon lower bound at
                                `audit.confidence`, max over `audit.guess_fractions` with the
                                Bonferroni correction (`auditing.canary_audit`)
  audit/accountant_epsilon      under DP-SGD, the accountant's epsilon of the client holding the
                                canaries (the canary hospital, or the pooled client in
                                centralised mode): what the lower bound is to be compared with
  audit/guesses, audit/correct  r and v of the reported bound
  audit/canary_auc              AUC of the IN canaries' scores over the OUT ones (diagnostic)
The bound is computed at delta = that client's delta_k times (1 + 1e-3), the truncation of
Poisson batches included (data/batching.py); without DP at the delta a DP run would use
(`dp.delta`, or 1 / (10 n_k)). Under a correct accountant the bound exceeds the accountant's
epsilon with probability at most 1 - confidence.

What the audit does not cover: the accountant's analysis holds the hospital's dataset size
fixed between neighbours, while here n_k (and with it q_k = B / n_k and the local steps) counts
the included canaries, so it moves by about sqrt(m) / 2 between draws: the usual convention of
DP-SGD implementations, which the lower bound inherits. One run audits one hospital's
example-level guarantee; client-level DP (whole hospitals) is not audited (`validate.py`).

**`membership_inference`**: the loss-threshold attack on one hospital, members its training
examples (never canaries) and non-members its test split, each subsampled to at most
`max_examples` (stream `streams.ANALYSIS_MIA_SUBSET`).
"""

from __future__ import annotations

import jax
import numpy as np

from fedjax_med import parallel, streams
from fedjax_med.data import storage
from fedjax_med.evaluation import batch_split
from fedjax_med.privacy import auditing

# The Poisson batches' truncation adds at most this fraction of delta_k (data/batching.py).
TRUNCATION_DELTA_FRACTION = 1e-3


def build_loss_fn(apply_fn, task, hospital: int | None = None):
    """Jitted (params, batched split) -> per-example losses [nb, bs]; `hospital` picks that row
    of params with a client axis (local mode's one model per hospital)."""

    @parallel.jit
    def losses(params, split):
        if hospital is not None:
            params = jax.tree.map(lambda x: x[hospital], params)

        def one_batch(b):
            b = storage.decode(b)
            return task.per_example_loss(apply_fn(params, b['image']), b['label'])

        return jax.lax.map(one_batch, split)

    return losses


def example_losses(loss_fn, params, split: dict, batch_size: int, mesh) -> np.ndarray:
    """Per-example losses [n] of `split` ('image', 'label' [n, ...]) under `params`."""
    n = len(split['image'])
    if not n:
        return np.zeros(0, np.float32)
    batched = parallel.put_replicated(
        {k: v for k, v in batch_split(split, batch_size).items() if k != 'mask'}, mesh
    )
    return np.asarray(parallel.to_host(loss_fn(params, batched))).reshape(-1)[:n]


def released_hospital(config) -> int | None:
    """The row of a local-mode run's parameters that holds the canary hospital's model."""
    return int(config.audit.hospital) if config.mode == 'local' else None


class CanaryAuditor:
    """Scores a run's canaries and audits them (see the module docstring).

    Args:
      config: the run's config (`config.audit`).
      canaries: `data.canaries.Canaries`.
      apply_fn, task, mesh: the run's model, task and mesh.
      privacy: the run's `privacy.plan.PrivacyPlan`.
      sizes: each training client's examples, canaries included.
    """

    def __init__(self, *, config, canaries, apply_fn, task, mesh, privacy, sizes):
        self.config, self.canaries, self.privacy, self.mesh = config, canaries, privacy, mesh
        # The client whose accountant covers the canaries: the pooled one when centralised.
        self.client = canaries.hospital if config.mode != 'centralized' else 0
        n = int(sizes[self.client])
        if privacy.mode == 'sample':
            self.delta = privacy.deltas[self.client] * (1 + TRUNCATION_DELTA_FRACTION)
        else:  # no accountant: the delta a DP run of this data would be held to
            self.delta = config.dp.delta or 1.0 / (10 * n)
        self.loss_fn = build_loss_fn(apply_fn, task, released_hospital(config))
        self.split = {'image': canaries.image, 'label': canaries.label}

    def scores(self, params) -> np.ndarray:
        """Each canary's score on the released model: its negative loss."""
        losses = example_losses(
            self.loss_fn, params, self.split, self.config.eval_batch_size, self.mesh
        )
        return -losses.astype(np.float64)

    def audit(self, params) -> dict:
        """`auditing.canary_audit` of the canaries on `params`, with the accountant's epsilon."""
        audit = self.config.audit
        result = auditing.canary_audit(
            self.scores(params),
            self.canaries.included,
            delta=self.delta,
            confidence=float(audit.confidence),
            guess_fractions=tuple(float(f) for f in audit.guess_fractions),
        )
        result['hospital'] = self.canaries.hospital
        result['kind'] = audit.canary
        result['accountant_epsilon'] = (
            float(self.privacy.accountant.epsilons()[self.client])
            if self.privacy.mode == 'sample'
            else None
        )
        return result

    def __call__(self, params) -> dict:
        """The metrics row's audit entries."""
        result = self.audit(params)
        row = {
            'privacy/epsilon_audit_lower': result['epsilon_lower'],
            'audit/guesses': result['guesses'],
            'audit/correct': result['correct'],
            'audit/canary_auc': result['canary_auc'],
        }
        if result['accountant_epsilon'] is not None:
            row['audit/accountant_epsilon'] = result['accountant_epsilon']
        return row


def _subset(n: int, max_examples: int, seed: int, hospital: int, which: int) -> np.ndarray:
    """Indices of at most `max_examples` of n examples (all, in order, when n fits)."""
    if n <= max_examples:
        return np.arange(n)
    rng = np.random.default_rng([seed, streams.ANALYSIS_MIA_SUBSET, hospital, which])
    return np.sort(rng.choice(n, max_examples, replace=False))


def attack_splits(
    members: dict, nonmembers: dict, *, max_examples: int, seed: int, hospital: int
) -> tuple[dict, dict]:
    """The members and non-members attacked ('image', 'label'): at most `max_examples` of each,
    a seeded subset when there are more."""
    out = []
    for which, split in enumerate((members, nonmembers), start=1):  # never 0: a trailing 0
        idx = _subset(len(split['image']), max_examples, seed, hospital, which)  # is dropped
        out.append({k: np.asarray(split[k])[idx] for k in ('image', 'label')})
    return out[0], out[1]


def scores(loss_fn, params, split: dict, *, batch_size: int, mesh) -> np.ndarray:
    """The loss-threshold attack's score of each example: its negative loss (float64)."""
    return -example_losses(loss_fn, params, split, batch_size, mesh).astype(np.float64)


def membership_inference(
    loss_fn,
    params,
    members: dict,
    nonmembers: dict,
    *,
    batch_size: int,
    mesh,
    max_examples: int,
    seed: int,
    hospital: int,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """The loss-threshold attack on one hospital: (`auditing.mia_metrics`, member scores,
    non-member scores)."""
    chosen = attack_splits(
        members, nonmembers, max_examples=max_examples, seed=seed, hospital=hospital
    )
    a, b = (scores(loss_fn, params, s, batch_size=batch_size, mesh=mesh) for s in chosen)
    return auditing.mia_metrics(a, b), a, b
