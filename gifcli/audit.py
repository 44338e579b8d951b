"""``gif audit``: does a model still remember the samples it was asked to forget?

Reference models are trained with ``gif train``'s recipe and varied seeds, half on the
training data plus a held-out sample ("in": the removal set and the held-out samples are
members) and half on the retrain oracle's data ("out": neither is). Each removed and held-out
sample's logit-scaled confidence under the audited model is scored against the two Gaussians
the references give it (``gifcli.membership``). A model that forgot scores on the removed
samples as on the held-out ones, like the "out" references do, each scored against the
others. Reference models are cached by content: the recipe, the exact training data and the
seed. See docs/design.md, "Audit".
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from gifcli.checkpoint import load_into, save_checkpoint, sha256_file
from gifcli.checks import Check, evaluate_checks
from gifcli.config import Config
from gifcli.context import RunContext, prepare
from gifcli.data import DataSplits, Split
from gifcli.data.splits import TensorSplit
from gifcli.errors import GifError
from gifcli.membership import ModelAudit, ReferenceFit, logit_confidence
from gifcli.models import build_model
from gifcli.outputs import claim_output_dir, write_json, write_text, write_with
from gifcli.progress import ProgressFactory, silent
from gifcli.records import AuditReport, AuditSummary, ReferencesRecord
from gifcli.report import checks_markdown
from gifcli.runs import evaluation_config
from gifcli.tasks import Task
from gifcli.train import black_fill, check_finite, train_model

AUDIT_FILES = {
    "report": "report.json",
    "markdown": "report.md",
    "samples": "samples.csv",
    "plot": "scores.png",
}
CACHE_VERSION = 1
"""Part of every cache key: bumped when the recipe's code changes what a seed trains."""
SCORE_BATCH = 512
CONFIDENCE_BOUND = 1e4
"""Log-odds are clipped to ±this (a float32 logit gap beyond it is overflow, not confidence)."""


@dataclass(frozen=True)
class Design:
    """Who is a member of which reference model: the removed samples (with the labels they
    were trained with), the held-out test samples drawn to match their labels, and the
    training data of the "in" and "out" references."""

    removed: TensorSplit
    held_out: TensorSplit
    train_in: TensorSplit
    train_out: TensorSplit

    @property
    def scored(self) -> TensorSplit:
        """The removed samples followed by the held-out ones."""
        return TensorSplit(
            torch.cat([self.removed.x, self.held_out.x]),
            torch.cat([self.removed.y, self.held_out.y]),
        )


def design(task: Task, data: DataSplits, model: nn.Module, *, device, seed: int) -> Design:
    """The audit's membership design for ``task`` on ``data`` (``model``: the audited one, which
    the task's removal set may consult); the held-out draw is seeded with ``seed``."""
    removal = task.removal_set(data, device=device, model=model)
    x = (
        removal.x
        if isinstance(removal.x, torch.Tensor)
        else removal.x[:]  # a streamed split's inputs, read
    )
    removed = TensorSplit(x.cpu(), removal.y.cpu())
    held_out = matched_held_out(data.test, removed.y, seed=seed)
    train = in_memory(data.train)
    return Design(
        removed=removed,
        held_out=held_out,
        train_in=TensorSplit(torch.cat([train.x, held_out.x]), torch.cat([train.y, held_out.y])),
        train_out=in_memory(task.retrain_split(data)),
    )


def matched_held_out(test: Split, labels: torch.Tensor, *, seed: int) -> TensorSplit:
    """Test samples with the label counts of ``labels`` (as many as the test split has of
    each label), drawn with ``seed``."""
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    test_y = test.y.cpu()[order]
    classes, counts = labels.unique(return_counts=True)
    picked = [order[test_y == c][: int(n)] for c, n in zip(classes, counts, strict=True)]
    positions = torch.cat(picked).sort().values
    if len(positions) == 0:
        raise GifError(
            "audit: the test split has no sample of the removed samples' labels "
            f"{classes.tolist()}; the audit needs held-out samples of the same classes"
        )
    return in_memory(test.subset(positions))


def in_memory(split: Split) -> TensorSplit:
    return TensorSplit(split.take(torch.arange(len(split))).cpu(), split.y.cpu())


def split_digest(split: TensorSplit) -> str:
    """sha256 of a split's inputs and labels (values, shapes and order)."""
    digest = hashlib.sha256()
    for tensor in (split.x.float().contiguous(), split.y.long().contiguous()):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def reference_key(config: Config, data_digest: str, seed: int) -> str:
    """The cache key of one reference model: what decides what training produces (the
    architecture, the recipe, the exact training data by content and the seed)."""
    recipe = {
        "version": CACHE_VERSION,
        "model": asdict(config.model),
        "train": asdict(config.train),
        "data": data_digest,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:32]


def reference_seeds(config: Config) -> list[int]:
    """The seeds of the references on each side: after the config's own (the audited model's
    and the oracle's)."""
    return [config.seed + 1 + j for j in range(config.audit.references // 2)]


@dataclass
class ReferenceCache:
    """Reference models by key, one safetensors file each in ``folder``."""

    folder: Path
    note: Callable[[str], None] = lambda message: None

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(
        self, ctx: RunContext, split: TensorSplit, key: str, seed: int
    ) -> tuple[nn.Module, bool]:
        """The reference model of ``key``: loaded from the cache, else trained on ``split``
        with ``seed`` and cached. Returns it (eval mode) and whether it was cached."""
        model = _new_model(ctx, seed)
        path = self.path(key)
        if path.is_file():
            try:
                load_into(model, path)
                return model.to(ctx.device).eval(), True
            except GifError as exc:
                self.note(f"retraining the cached reference {path}: {exc}")
        config = ctx.config
        model = train_model(
            model, split, config=config.train, seed=seed, device=ctx.device,
            fill=black_fill(ctx.data),
        )  # fmt: skip
        check_finite(model, config.train)
        self.folder.mkdir(parents=True, exist_ok=True)
        metadata = {"tool": "gif", "role": "audit reference", "key": key, "seed": str(seed)}
        save_checkpoint(path, {k: v.cpu() for k, v in model.state_dict().items()}, metadata)
        return model.eval(), False


def _new_model(ctx: RunContext, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(
        ctx.config.model, in_channels=ctx.data.in_channels, image_size=ctx.data.image_size
    )


@torch.no_grad()
def confidences(model: nn.Module, split: TensorSplit, device) -> torch.Tensor:
    """The logit-scaled confidence of each sample's label under ``model`` (float64, CPU)."""
    model.eval()
    parts = [torch.empty(0, dtype=torch.float64)]
    for x, y in split.batches(SCORE_BATCH, device=device):
        parts.append(logit_confidence(model(x), y))
    # outputs that overflowed show no confidence in any label: the lowest log-odds there is
    return torch.nan_to_num(torch.cat(parts), nan=-CONFIDENCE_BOUND).clamp(
        -CONFIDENCE_BOUND, CONFIDENCE_BOUND
    )


@dataclass
class Audit:
    """An audit in memory: the audited model's result, each "out" reference's against the
    others, and the references' record."""

    audited: ModelAudit
    retrained: list[ModelAudit]
    removed_conf: torch.Tensor
    references: ReferencesRecord


def audit_model(
    ctx: RunContext,
    task: Task,
    model: nn.Module,
    cache: ReferenceCache,
    progress: ProgressFactory = silent,
) -> Audit:
    """Audit ``model`` for ``task``'s removal set against references from ``cache`` (trained
    there when missing)."""
    plan = design(task, ctx.data, model, device=ctx.device, seed=ctx.config.seed)
    scored, m = plan.scored, len(plan.removed)
    seeds = reference_seeds(ctx.config)
    conf: dict[str, list[torch.Tensor]] = {"in": [], "out": []}
    trained, train_seconds = 0, 0.0
    with progress("references", 2 * len(seeds)) as advance:
        for side, split in (("in", plan.train_in), ("out", plan.train_out)):
            digest = split_digest(split)
            for seed in seeds:
                started = time.perf_counter()
                reference, cached = cache.get(
                    ctx, split, reference_key(ctx.config, digest, seed), seed
                )
                if not cached:
                    trained += 1
                    train_seconds += time.perf_counter() - started
                conf[side].append(confidences(reference, scored, ctx.device))
                advance(
                    None,
                    f"{trained} trained, {len(conf['in']) + len(conf['out']) - trained} cached",
                )
    conf_in, conf_out = torch.stack(conf["in"]), torch.stack(conf["out"])
    k = len(conf_out)
    fit = ReferenceFit.fit(conf_in, conf_out)
    audited_conf = confidences(model, scored, ctx.device)
    retrained = []
    for j in range(k):  # each "out" reference, against fits without it, at the same resolution
        others = ReferenceFit.fit(conf_in, conf_out[torch.arange(k) != j], out_models=k)
        retrained.append(ModelAudit.of(others, conf_out[j, :m], conf_out[j, m:]))
    return Audit(
        audited=ModelAudit.of(fit, audited_conf[:m], audited_conf[m:]),
        retrained=retrained,
        removed_conf=audited_conf[:m],
        references=ReferencesRecord(
            count=2 * len(seeds),
            trained=trained,
            cached=2 * len(seeds) - trained,
            cache=str(cache.folder),
            train_seconds=train_seconds,
            removed=m,
            held_out=len(plan.held_out),
        ),
    )


def mean_summary(audits: Sequence[ModelAudit]) -> AuditSummary:
    """The mean of each summary over ``audits``."""
    summaries = [a.summary() for a in audits]
    return AuditSummary(
        **{key: statistics.fmean(s[key] for s in summaries) for key in summaries[0]}
    )


def default_output(checkpoint: Path) -> Path:
    """``DIR-audit`` beside an edit's output folder ``DIR`` (its ``model.safetensors``), else
    ``NAME-audit`` beside the checkpoint ``NAME.safetensors``."""
    if checkpoint.name == "model.safetensors":
        return checkpoint.parent.with_name(f"{checkpoint.parent.name}-audit")
    return checkpoint.with_name(f"{checkpoint.stem}-audit")


def run_audit(
    *,
    config: Config,
    checkpoint: Path,
    output_dir: Path | None = None,
    force: bool = False,
    progress: ProgressFactory = silent,
    checks: Sequence[Check] = (),
    removal_given: bool = False,
    note: Callable[[str], None] = lambda message: None,
) -> dict:
    """Audit ``checkpoint`` for the config's removal set (or the one recorded in the
    checkpoint, unless ``removal_given``) and write report.json, report.md, samples.csv and
    scores.png into ``output_dir`` (default ``default_output``); returns the report."""
    started = time.perf_counter()
    config, notes = evaluation_config(config, checkpoint, removal_given=removal_given)
    directory = Path(output_dir) if output_dir is not None else default_output(checkpoint)
    folder = Path(config.audit.cache) if config.audit.cache else directory.parent / "references"
    names = AUDIT_FILES.values()
    with claim_output_dir(directory, force=force, names=names, note=note) as outputs:
        ctx = prepare(config)
        task = ctx.task()
        model = ctx.load_model(checkpoint, role="evaluated")
        result = audit_model(ctx, task, model, ReferenceCache(folder, note), progress)
        report = AuditReport(
            task=task.name,
            checkpoint=str(checkpoint),
            sha256=sha256_file(checkpoint),
            removal=task.description,
            audit=AuditSummary(**result.audited.summary()),
            retrained=mean_summary(result.retrained),
            references=result.references,
            seconds=time.perf_counter() - started,
            output=str(directory),
            notes=notes,
        )
        report.checks = evaluate_checks(checks, report.to_dict())
        as_dict = report.to_dict()
        with outputs.stage() as staging:
            write_json(staging / AUDIT_FILES["report"], as_dict)
            write_text(staging / AUDIT_FILES["markdown"], markdown(as_dict))
            write_text(staging / AUDIT_FILES["samples"], samples_csv(result))
            write_with(staging / AUDIT_FILES["plot"], lambda tmp: plot_scores(result, tmp))
    return as_dict


SUMMARY_ROWS = {
    "auc": ("attack AUC, removed vs held-out (0.5: chance)", "{:.3f}"),
    "tpr_at_1pct_fpr": ("TPR at 1% FPR (%)", "{:.1f}"),
    "identified": ("removed samples called members (%)", "{:.1f}"),
    "forgetting_score": ("forgetting score (1: as retrained)", "{:.3f}"),
    "epsilon_median": ("median per-sample ε", "{:.2f}"),
}


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """``(measure, audited, retrained)`` rows of the report's two summaries."""
    return [
        (label, fmt.format(report["audit"][key]), fmt.format(report["retrained"][key]))
        for key, (label, fmt) in SUMMARY_ROWS.items()
    ]


def markdown(report: dict) -> str:
    refs = report["references"]
    lines = [
        "# gif audit",
        "",
        f"- checkpoint: `{report['checkpoint']}` (sha256 {report['sha256'][:12]})",
        f"- removal set ({report['task']}): {report['removal']}; {refs['removed']} removed "
        f"samples against {refs['held_out']} held-out test samples of the same labels",
        f"- references: {refs['count']} models, half trained with the removed and held-out "
        f"samples, half on the retrain oracle's data; {refs['trained']} trained now "
        f"({refs['train_seconds']:.1f} s), {refs['cached']} from `{refs['cache']}`",
        f"- seconds: {report['seconds']:.1f}",
        "",
        'A model that forgot scores like the retrained references (each "out" reference '
        "audited against the others): attack AUC near 0.5, few samples called members, a "
        "forgetting score near theirs.",
        "",
        "| measure | audited | retrained |",
        "|---|---|---|",
        *(
            f"| {label} | {audited} | {retrained} |"
            for label, audited, retrained in summary_rows(report)
        ),
        "",
        *(f"note: {n}" for n in report["notes"]),
        *checks_markdown(report.get("checks", [])),
    ]
    return "\n".join(lines) + "\n"


def samples_csv(result: Audit) -> str:
    """One row per removed sample, in the removal set's order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["sample", "confidence", "score", "epsilon"])
    audited = result.audited
    for i, (c, s, e) in enumerate(
        zip(result.removed_conf, audited.scores, audited.epsilons, strict=True)
    ):
        writer.writerow([i, f"{float(c):.6g}", f"{float(s):.6g}", f"{float(e):.6g}"])
    return out.getvalue()


def plot_scores(result: Audit, path: Path) -> None:
    """Histograms of the attack's score: removed and held-out samples under the audited
    model, and removed samples under the retrained references."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    retrained = torch.cat([a.scores for a in result.retrained])
    sets = {
        "removed (audited)": result.audited.scores,
        "held-out (audited)": result.audited.held_out_scores,
        "removed (retrained references)": retrained,
    }
    values = torch.cat(list(sets.values())).clamp(-50, 50)
    bins = torch.linspace(float(values.min()), float(values.max()) + 1e-9, 40).tolist()
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for label, scores in sets.items():
        axis.hist(scores.clamp(-50, 50).numpy(), bins=bins, alpha=0.5, density=True, label=label)
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("log-likelihood ratio, member vs non-member (clipped to ±50)")
    axis.set_ylabel("density")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
