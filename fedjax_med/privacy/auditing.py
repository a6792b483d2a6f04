"""Empirical privacy: what an attacker can show, in numbers a DP claim can be checked against.

Two measurements, both host-side numpy on scores a model gives to examples (`auditor.py` computes
the scores, `audit.py` is the command line):

**One-run privacy audit** (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023, arXiv:2305.08846). m canaries are planted in a hospital's training data,
each included independently with probability 1/2 (the excluded ones are never trained on).
After training, the auditor scores every canary on the released model, guesses the k_+ highest
scored IN and the k_- lowest OUT and abstains on the rest: r = k_+ + k_- guesses, v of them
correct. If training is (epsilon, delta)-DP with respect to adding or removing each canary, the
paper's Theorem 5.2 (approximate DP; Theorem 3.1 is the pure case delta = 0) bounds

    P[v correct or more] <= beta + 2 m delta alpha,    q = e^eps / (1 + e^eps),
    beta  = P[Binomial(r, q) >= v],
    alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, q) <= v - 1] / i,

the p-value of "the run is (eps, delta)-DP" given v (`p_value`; the same quantity as the paper's
Appendix D algorithm). `epsilon_lower_bound` is the largest eps this rejects at confidence
1 - p: a run that satisfies (eps, delta)-DP has a lower bound above eps with probability at most
p. The bound is exact arithmetic on the binomial distribution (scipy), found by bisection on eps
(p_value increases with eps) and returned on the safe (smaller) side.

Choosing k: `canary_audit` tries each guess count r = round(f m) of `guess_fractions` (half IN,
half OUT) and reports the largest bound, each computed at p / len(guess_fractions) (Bonferroni),
so the maximum holds at the stated confidence. A single fraction is a fixed k.

**Membership inference** on one hospital's examples (members: its training examples;
non-members: its held-out test examples, the same distribution): the loss-threshold attack (Yeom
et al., CSF 2018) scores an example by its negative loss under the released model;
`mia_metrics` reports the ROC AUC and the TPR at FPR 1% and 0.1% (Carlini et al., "Membership
Inference Attacks From First Principles", S&P 2022, argue for the low-FPR numbers). An FPR below
1 / (non-members) cannot be resolved: the TPR there is that at zero false positives.
`lira_offline_scores` is that paper's offline LiRA: each example's score under the target
model, standardised by a Gaussian fitted to its scores under shadow models that never trained
on it (per-example mean, one pooled variance, their fixed-variance variant for few shadows).

Only numpy and scipy; nothing here sees a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special, stats

# The bisection's resolution on epsilon; the returned bound is the lower end of the last bracket.
_EPS_TOL = 1e-6


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] allowed by (epsilon, delta)-DP for m canaries, each
    included with probability 1/2 (Steinke et al. 2023, Theorem 5.2; see the module docstring).
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f'need 0 <= v <= r <= m, got m={m}, r={r}, v={v}.')
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f'need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}.')
    if v == 0:
        return 1.0
    q = float(special.expit(epsilon))  # e^eps / (1 + e^eps), the accuracy of randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0:
        return min(1.0, beta)
    # P[v - i <= Binomial(r, q) <= v - 1] for i = 1..v, then the largest of them divided by i.
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float) -> float:
    """The largest epsilon that v correct guesses out of r (m canaries) reject at confidence
    1 - p: a run that is (eps, delta)-DP gives a bound above eps with probability at most p.
    0 when not even eps = 0 is rejected."""
    if not 0 < p < 1:
        raise ValueError(f'p (1 - confidence) must be in (0, 1), got {p}.')
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0  # p_value(lo) < p <= p_value(hi)
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # v = r guesses all correct with delta = 0 still stays finite; a guard
            return lo
    while hi - lo > _EPS_TOL:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < p else (lo, mid)
    return lo


def guess_counts(num_canaries: int, fraction: float) -> tuple[int, int]:
    """(k_in, k_out) guesses for a fraction of the canaries: r = round(f m), at least 2, at most
    m; k_in = r // 2 highest scored guessed IN, the rest of the r lowest scored guessed OUT."""
    r = min(num_canaries, max(2, round(fraction * num_canaries)))
    return r // 2, r - r // 2


def correct_guesses(scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int) -> int:
    """How many of the guesses are right: the k_in highest `scores` guessed IN, the k_out lowest
    guessed OUT (ties broken by index, which is independent of inclusion)."""
    scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
    if k_in + k_out > len(scores):
        raise ValueError(f'{k_in} + {k_out} guesses for {len(scores)} canaries.')
    order = np.argsort(-scores, kind='stable')  # highest first
    guessed_in = order[:k_in]
    guessed_out = order[len(order) - k_out :] if k_out else order[:0]
    return int(included[guessed_in].sum() + (~included[guessed_out]).sum())


def canary_audit(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float,
    guess_fractions: Sequence[float],
) -> dict:
    """The one-run audit of m canaries from their scores (higher = more likely trained on).

    Returns 'epsilon_lower' (the largest bound over `guess_fractions`, each at confidence
    1 - (1 - confidence) / len(guess_fractions)), with the 'guesses' r and 'correct' v that gave
    it, 'num_canaries', 'num_included', 'delta', 'confidence', and 'canary_auc' (ROC AUC of the
    scores for IN vs OUT, a diagnostic outside the bound)."""
    scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
    m = len(scores)
    p = (1 - confidence) / len(guess_fractions)
    best = {'epsilon_lower': 0.0, 'guesses': 0, 'correct': 0}
    for fraction in guess_fractions:
        k_in, k_out = guess_counts(m, fraction)
        v = correct_guesses(scores, included, k_in, k_out)
        eps = epsilon_lower_bound(m, k_in + k_out, v, delta, p)
        if eps > best['epsilon_lower'] or not best['guesses']:
            best = {'epsilon_lower': eps, 'guesses': k_in + k_out, 'correct': v}
    return {
        **best,
        'num_canaries': m,
        'num_included': int(included.sum()),
        'delta': float(delta),
        'confidence': float(confidence),
        'canary_auc': auc(scores[included], scores[~included]),
    }


# ---- membership inference ---------------------------------------------------------------------


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC AUC of `member_scores` above `nonmember_scores` (ties count one half); NaN if either
    is empty."""
    a, b = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    if not len(a) or not len(b):
        return float('nan')
    ranks = stats.rankdata(np.concatenate([a, b]))  # mid-ranks for ties
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2
    return float(u / (len(a) * len(b)))


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray):
    """(fpr, tpr) at every threshold, from 'nothing is a member' to 'everything is'."""
    a, b = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    thresholds = np.unique(np.concatenate([a, b]))[::-1]
    # Examples scored at least t are called members.
    tpr = np.searchsorted(np.sort(-a), -thresholds, side='right') / max(len(a), 1)
    fpr = np.searchsorted(np.sort(-b), -thresholds, side='right') / max(len(b), 1)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> float:
    """The largest TPR of a threshold whose FPR is at most `fpr`."""
    fprs, tprs = roc_curve(member_scores, nonmember_scores)
    return float(tprs[fprs <= fpr + 1e-12].max())


def mia_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict:
    """AUC and TPR at FPR 1% and 0.1% of a score (higher = member), with the counts."""
    return {
        'auc': auc(member_scores, nonmember_scores),
        'tpr_at_fpr_1pct': tpr_at_fpr(member_scores, nonmember_scores, 0.01),
        'tpr_at_fpr_0.1pct': tpr_at_fpr(member_scores, nonmember_scores, 0.001),
        'num_members': int(len(member_scores)),
        'num_nonmembers': int(len(nonmember_scores)),
    }


def lira_offline_scores(target_scores: np.ndarray, shadow_scores: np.ndarray) -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022): `target_scores` [n] under the attacked model,
    `shadow_scores` [num_shadows, n] under models that never trained on these n examples.
    Returns (s - mu_out) / sigma_out per example, higher = member (ranking by it is ranking by
    the one-sided Gaussian likelihood test); sigma_out is pooled over examples."""
    shadow = np.asarray(shadow_scores, np.float64)
    if shadow.ndim != 2 or shadow.shape[1] != len(target_scores):
        raise ValueError(
            f'shadow_scores must be [num_shadows, {len(target_scores)}], got {shadow.shape}.'
        )
    mu = shadow.mean(0)
    sigma = math.sqrt(float(np.mean((shadow - mu) ** 2))) if len(shadow) > 1 else 1.0
    return (np.asarray(target_scores, np.float64) - mu) / max(sigma, 1e-12)
