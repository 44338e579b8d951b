"""The reports, as dataclasses: what an edit, an evaluation and a selection record.

``report.json`` is ``asdict`` of these; the ``--check`` schema is derived from their fields
(``gifcli.checks``), so a report path a check names exists exactly when the report has it.
Metric groups are plain mappings whose keys the task defines (``Task.metric_keys``).
See docs/design.md, "Report".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

Metrics = dict[str, Any]
"""A task's metrics in percent: ``metric_keys`` -> float, ``per_class_acc_test`` -> list;
with an oracle, ``FIDELITY_KEYS`` too."""

FIDELITY_KEYS = ("kl_oracle_test", "kl_oracle_removed", "agree_oracle_test", "agree_oracle_removed")
"""Fidelity to the retrained oracle, in every metrics group of an edit given one: mean
KL(oracle ‖ model) of the predicted distributions (nats) and top-1 agreement with the oracle
(%), on the test split and on the removal set."""
SALUN_KEYS = ("ua", "ra", "ta", "mia_efficacy")
"""The unlearning protocol of SalUn and l1-sparse: unlearning accuracy (100 − accuracy on the
removal set), retained training accuracy, test accuracy and MIA-efficacy, in percent."""


@dataclass
class RemovalRecord:
    """The removal set ``U``: what it is, ``m`` (samples), ``n`` (train_samples), the size of
    the Hessian sample the curvature was taken over and the number of removal points the
    removal gradient was averaged over."""

    description: str
    samples: int
    train_samples: int
    hessian_samples: int
    gradient_samples: int
    validation: str = ""
    """Where the validation split the step was searched on comes from (a command's run)."""


@dataclass
class SelectionRecord:
    """The target parameters: how they were chosen (or the mask file), their count, and the
    number of whole units (rows) taken per layer."""

    method: str
    ratio: float
    mask: str | None
    targets: int
    units: dict[str, list[int]] | None = None


@dataclass
class ParamsRecord:
    """Parameters in the model, those the edit changed, and their fraction."""

    total: int
    changed: int
    fraction: float


@dataclass(kw_only=True)
class SolveDiagnostics:
    """What a curvature solve did and how well it did it: the solvers' record
    (``influence.solvers.SolveResult``) and the report's (``SolverRecord``) alike."""

    iterations: int
    hvps: int
    relative_residual: float
    normal_residual: float
    converged: bool
    seconds: float
    damping: float = 0.0
    """The absolute λ the update was solved with (0 for a solve without curvature)."""
    sigma_max: float | None = None
    """σ_max of the solved system, estimated for a relative damping or a path, else None."""
    residual_history: list[float] = field(default_factory=list)
    normal_history: list[float] = field(default_factory=list)
    message: str = ""
    status: str = "converged"
    """converged | iteration-limit | float-floor | breakdown | no-solve (first-order)."""


@dataclass(kw_only=True)
class SolverRecord(SolveDiagnostics):
    """The curvature solve (``name`` is ``none`` for first-order): its settings and diagnostics."""

    name: str
    curvature: str
    ok: bool = True
    """The returned update is the intended (regularised) one: every status but breakdown."""
    damping_relative: float | None = None
    """λ / σ_max, when σ_max was estimated."""
    damping_chosen_by: str = "config"
    """config (a number) or validation (``influence.damping: auto``)."""
    weight_decay: float = 0.0
    """``wd`` of the objective: the curvature is ``H + wd·I``."""
    gradient: str = "removal"
    """The right-hand side: ``retained`` or ``removal`` (``influence.gradient``)."""
    damping_form: str = "tikhonov"
    """How λ entered: ``shift`` (``H + λ·I``) or ``tikhonov`` (``+ λ²‖x‖²``)."""


@dataclass
class UpdateRecord:
    """The step: its scale ``s``, how it was chosen, the norms of ``s·Δ`` and ``Δ``, ``|s·Δ|``
    relative to the target parameters' norm, and the validation sweep (one mapping a point)."""

    scale: float
    chosen_by: str
    norm: float
    raw_norm: float
    relative_norm: float | None
    sweep: list[dict] = field(default_factory=list)


@dataclass
class MetricsRecord:
    """The task's metrics before and after the edit; with an oracle, the fidelity to it in
    each group (``FIDELITY_KEYS``; the oracle's own, against itself, is 0 and 100), its metrics
    and the absolute gap of ``after`` to it on every scalar metric (and ``mean``, over the
    task's metrics: the fidelity ones are left out of it)."""

    before: Metrics
    after: Metrics
    oracle: Metrics | None = None
    gap: dict[str, float] | None = None
    train_samples: int | None = None
    """The ``*_train`` metrics' seeded sample of the training split (``metrics.train_samples``);
    None: measured on all of it."""
    salun: dict[str, dict[str, float]] | None = None
    """The SalUn protocol (``SALUN_KEYS``) of ``before``, ``after`` (and ``oracle``, with
    ``gap``: ``|after − oracle|`` and its ``mean``, the average gap), read from those groups;
    None for a task it does not apply to."""


@dataclass
class BudgetRecord:
    """How the solve was sized: ``influence.budget`` (a fraction of one retraining, in sample
    passes), the Hessian sample and iterations used, whether the budget or the config chose
    them, and the edit's predicted passes (fixed conversion factors) against those allowed."""

    fraction: float
    hessian_samples: int
    max_iter: int
    chosen_by: str
    predicted_passes: float
    allowed_passes: float
    predicted_ratio: float


@dataclass
class RetrainRecord:
    """One retraining of the same model, estimated: ``epochs × samples`` sample passes, and
    the seconds of that many samples at the rate of ``timed_steps`` real training steps."""

    epochs: int
    samples: int
    passes: float
    """``epochs × samples``: what ``influence.budget`` is a fraction of."""
    seconds: float
    seconds_per_sample: float
    timed_steps: int
    step_passes: float = 2.0
    """A training step of one sample in sample passes (measured: train mode, optimiser)."""


@dataclass
class CostRecord:
    """What the edit cost. ``seconds`` and ``passes`` per stage (``edit``: every stage but
    ``metrics``); ``hvp_passes`` and ``forward_passes``: one HVP over a sample and one forward
    pass of a sample in sample passes, measured against a gradient on the same batch, once per
    machine and model (``rates_cached``: taken from the cache); ``retrain_ratio``: the edit's
    passes over one retraining's (``retrain.passes × retrain.step_passes``), the same on every
    rerun (gate on it); ``seconds_ratio``: the edit's seconds over one retraining's estimated
    seconds, which follow the machine's load (information)."""

    seconds: dict[str, float]
    passes: dict[str, float]
    hvp_passes: float
    forward_passes: float
    gradient_seconds_per_sample: float
    retrain: RetrainRecord
    retrain_ratio: float | None
    seconds_ratio: float | None
    budget: BudgetRecord
    rates_cached: bool = False


@dataclass
class CheckpointRecord:
    """The input checkpoint and the written model, by path and sha256 (None in memory)."""

    input: str | None = None
    input_sha256: str | None = None
    output: str | None = None
    output_sha256: str | None = None


@dataclass
class EditReport:
    """The report of one edit (``gif remove-class``, ``gif recover-backdoor``, ``gif
    remove-samples``, ``gifcli.edit``)."""

    task: str
    method: str
    removal: RemovalRecord
    selection: SelectionRecord
    params: ParamsRecord
    solver: SolverRecord
    update: UpdateRecord
    metrics: MetricsRecord
    cost: CostRecord
    checkpoint: CheckpointRecord = field(default_factory=CheckpointRecord)
    checks: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        report = dataclasses.asdict(self)
        for group in ("oracle", "gap", "salun"):  # absent when not measured, as a check expects
            if report["metrics"][group] is None:
                del report["metrics"][group]
        return report


@dataclass
class CheckpointJudged:
    """What a report on one saved checkpoint begins with: the task it is judged for, the
    checkpoint (path and sha256) and the removal set it is judged on."""

    task: str
    checkpoint: str
    sha256: str
    removal: str


@dataclass
class EvaluateReport(CheckpointJudged):
    """``gif evaluate``: one checkpoint's metrics for a task."""

    metrics: Metrics
    notes: list[str] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    salun: dict[str, float] | None = None
    """The SalUn protocol of the checkpoint (``SALUN_KEYS``); None where it does not apply."""

    def to_dict(self) -> dict:
        report = dataclasses.asdict(self)
        if report["salun"] is None:
            del report["salun"]
        return report


def format_value(value: Any) -> str:
    """A check's value as it would be written in a check: true/false, integers as they are."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "n/a" if value is None else str(value)


@dataclass
class AuditSummary:
    """One model's membership audit (docs/design.md, "Audit"): the likelihood-ratio attack's
    AUC (0-1) and true-positive rate at 1% false positives (percent) on the removed samples
    against held-out ones, the forgetting score (0-1) built from the per-sample ε, the share
    of removed samples the attack calls members (percent) and the median ε."""

    auc: float
    tpr_at_1pct_fpr: float
    forgetting_score: float
    identified: float
    epsilon_median: float


@dataclass
class ReferencesRecord:
    """The reference models: ``count`` (half "in", half "out"), how many were trained by this
    audit and how many came from the ``cache`` folder, the seconds spent training, and the
    sizes of the removed and held-out sets."""

    count: int
    trained: int
    cached: int
    cache: str
    train_seconds: float
    removed: int
    held_out: int


@dataclass
class AuditReport(CheckpointJudged):
    """``gif audit``: one checkpoint audited; ``retrained``: the same audit of the "out"
    references, each against the others (what retraining scores)."""

    audit: AuditSummary
    retrained: AuditSummary
    references: ReferencesRecord
    seconds: float
    output: str
    notes: list[str] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
