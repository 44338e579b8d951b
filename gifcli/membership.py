"""Per-sample membership inference against reference models, and its summaries.

A sample's statistic is its logit-scaled confidence ``φ = log(p_y / (1 − p_y))`` under a
model. Reference models trained with the sample ("in") and without it ("out") give two
Gaussians per sample; a model's score on the sample is the log-likelihood ratio of its ``φ``
under the two (the likelihood-ratio attack). The summaries: the attack's AUC and true-positive
rate at 1% false positives between removed and held-out samples, a per-sample ε of telling the
model from the "out" references apart, and the forgetting score built from the ε. See
docs/design.md, "Audit".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DELTA = 1e-5
"""The δ of the per-sample (ε, δ) estimate."""
EPSILON_CAP = 50.0
"""The ε of a sample the references cannot place: separated beyond what they resolve."""
BUCKET = 0.5
"""Width of the forgetting score's ε buckets."""
MIN_STD = 1e-3
"""Floor of a fitted spread (references that agree exactly on every sample)."""


def logit_confidence(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log p_y − log(1 − p_y)`` of the softmax of ``logits`` [N, K] at labels ``y`` [N],
    float64: the label's logit minus the log-sum-exp of the others, exact where ``p_y``
    rounds to 1."""
    z = logits.double()
    y = y.view(-1, 1).to(z.device)
    others = z.scatter(1, y, float("-inf"))
    return (z.gather(1, y).squeeze(1) - torch.logsumexp(others, dim=1)).cpu()


@dataclass(frozen=True)
class ReferenceFit:
    """Per-sample Gaussians of ``φ`` under the "in" and "out" references: per-sample means
    and one spread, pooled over the samples and both sides (a handful of references estimate
    a mean per sample, not a spread)."""

    mean_in: torch.Tensor
    mean_out: torch.Tensor
    std: float
    out_models: int

    @classmethod
    def fit(
        cls, conf_in: torch.Tensor, conf_out: torch.Tensor, *, out_models: int | None = None
    ) -> ReferenceFit:
        """From ``φ`` [models, samples] of each side (at least two models each);
        ``out_models``: the count the ε resolution is set by (default: those given)."""
        if len(conf_in) < 2 or len(conf_out) < 2:
            raise ValueError("ReferenceFit: at least two reference models on each side")
        return cls(
            mean_in=conf_in.double().mean(0),
            mean_out=conf_out.double().mean(0),
            std=_pooled_std(conf_in, conf_out),
            out_models=out_models or len(conf_out),
        )

    def score(self, conf: torch.Tensor) -> torch.Tensor:
        """The log-likelihood ratio ``log N(φ; in) − log N(φ; out)`` per sample: positive
        where ``φ`` is nearer the "in" mean, where the model looks more like one trained on
        the sample."""
        conf = conf.double()
        return ((conf - self.mean_out) ** 2 - (conf - self.mean_in) ** 2) / (2 * self.std**2)

    def epsilon(self, conf: torch.Tensor) -> torch.Tensor:
        """The per-sample ε of telling the model from the "out" references apart (``epsilon``
        with the model taken to spread like them)."""
        shift = (conf.double() - self.mean_out).abs() / self.std
        return epsilon(shift, min_rate=1 / self.out_models)


def _pooled_std(*sides: torch.Tensor) -> float:
    """The root of the mean per-sample variance over every side's references."""
    variances = torch.cat([side.double().var(0, unbiased=True) for side in sides])
    return max(MIN_STD, float(variances.mean().sqrt()))


def epsilon(shift: torch.Tensor, *, min_rate: float, delta: float = DELTA) -> torch.Tensor:
    """ε of the best threshold test between ``N(shift, 1)`` and ``N(0, 1)``, per entry.

    A test at threshold ``t`` has false-positive rate ``FPR`` and false-negative rate
    ``FNR``; its ε is the larger of ``log(1 − δ − FPR) − log FNR`` and ``log(1 − δ − FNR) −
    log FPR``, at least 0, and the estimate is the largest over the tests whose two rates are
    both at least ``min_rate`` (``1/k`` for ``k`` reference models: a rate below it is one no
    finite sample of them measures). For two unit Gaussians both terms peak where one rate
    equals ``min_rate``: ``ε = log((Φ(d − z) − δ) / min_rate)`` with ``z = Φ⁻¹(1 −
    min_rate)``, as long as ``d ≤ 2z``; beyond, no such test errs on both sides, the two are
    separated and ε is ``EPSILON_CAP``.
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    shift = shift.double()
    z = float(normal.icdf(torch.tensor(1 - min_rate, dtype=torch.float64)))
    value = torch.log((normal.cdf(shift - z) - delta).clamp_min(1e-300) / min_rate)
    value = torch.where(shift <= 2 * z, value.clamp_min(0.0), torch.full_like(value, EPSILON_CAP))
    return value.clamp(0.0, EPSILON_CAP)


def forgetting_score(epsilons: torch.Tensor, *, models: int) -> float:
    """The mean over samples of ``2^-j`` for ε in bucket ``j`` (``[j/2, (j+1)/2)``), 0 past
    the last bucket below ``ceil(log(models − 1))``: 1 when every sample is as good as
    retrained, 0 when every one is told apart. ``models``: reference models on the side the
    ε were measured against."""
    top = math.ceil(math.log(models - 1)) if models > 2 else 0
    buckets = torch.floor(epsilons.double() / BUCKET)
    points = torch.where(buckets < top / BUCKET, 0.5**buckets, torch.zeros_like(buckets))
    return float(points.mean()) if len(points) else float("nan")


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The probability that a positive scores above a negative, ties counting half (the area
    under the ROC curve)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    p, n = positive.double().view(-1, 1), negative.double().view(1, -1)
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def tpr_at_fpr(positive: torch.Tensor, negative: torch.Tensor, fpr: float = 0.01) -> float:
    """The largest share of positives scoring at or above a threshold that at most ``fpr`` of
    the negatives reach, in percent."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    thresholds = torch.cat([positive, negative, torch.tensor([math.inf])]).double().unique()
    reached = (negative.double().view(1, -1) >= thresholds.view(-1, 1)).double().mean(1)
    hits = (positive.double().view(1, -1) >= thresholds.view(-1, 1)).double().mean(1)
    return float(100 * hits[reached <= fpr].max())


@dataclass(frozen=True)
class ModelAudit:
    """One model against the references: the scores of the removed samples (positives) and
    of the held-out ones (negatives), and the removed samples' ε."""

    scores: torch.Tensor
    held_out_scores: torch.Tensor
    epsilons: torch.Tensor
    out_models: int

    @classmethod
    def of(cls, fit: ReferenceFit, removed: torch.Tensor, held_out: torch.Tensor) -> ModelAudit:
        """``removed`` / ``held_out``: the model's ``φ`` on each; ``fit``: the references over
        the removed samples followed by the held-out ones."""
        conf = torch.cat([removed, held_out])
        scores, m = fit.score(conf), len(removed)
        return cls(scores[:m], scores[m:], fit.epsilon(conf)[:m], fit.out_models)

    def summary(self) -> dict[str, float]:
        """AUC (0-1), TPR at 1% FPR and the share identified as members (LR > 0), percent,
        the forgetting score (0-1) and the median ε."""
        return {
            "auc": auc(self.scores, self.held_out_scores),
            "tpr_at_1pct_fpr": tpr_at_fpr(self.scores, self.held_out_scores),
            "forgetting_score": forgetting_score(self.epsilons, models=self.out_models),
            "identified": float(100 * (self.scores > 0).double().mean()),
            "epsilon_median": float(self.epsilons.median()),
        }
