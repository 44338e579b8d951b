"""The outputs of an edit: checkpoint, mask, report.json, report.md, config, plot.

See docs/design.md, "Outputs".

Everything is computed before anything is written; the files are written into a staging
folder and published as one set (``gifcli.outputs``), so a failed run leaves the previous
outputs as they were.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from gifcli.checkpoint import checkpoint_metadata, save_checkpoint, sha256_file
from gifcli.config import Config, SelectionConfig
from gifcli.influence.solvers import STATUSES
from gifcli.metrics import scalar_metrics
from gifcli.outputs import claim_output_dir, write_json, write_text, write_with
from gifcli.records import FIDELITY_KEYS, format_value
from gifcli.selection import save_mask

if TYPE_CHECKING:
    from gifcli.pipeline import EditResult

KL_KEYS = tuple(key for key in FIDELITY_KEYS if key.startswith("kl_"))

INDICES_SHA256 = "removal_indices_sha256"
"""Checkpoint metadata: the sha256 of the ``removal.indices`` file an edit forgot, so that
``gif evaluate`` refuses a listing changed since."""

OUTPUT_FILES = {
    "model": "model.safetensors",
    "mask": "mask.safetensors",
    "report": "report.json",
    "markdown": "report.md",
    "config": "config.yaml",
    "plot": "sweep.png",
}


def output_paths(directory: str | Path) -> dict[str, Path]:
    """Where each output of an edit goes in ``directory``."""
    return {key: Path(directory) / name for key, name in OUTPUT_FILES.items()}


def write_outputs(
    result: EditResult,
    directory: str | Path,
    *,
    config: Config | None = None,
    force: bool = False,
) -> dict:
    """Write an edit's outputs into ``directory``: the edited model, its mask, report.json,
    report.md, the resolved config (``config``, else the edit's settings) and the sweep plot.

    The files are staged beside ``directory`` and published as one set (``gifcli.outputs``);
    an existing non-empty ``directory`` is replaced only with ``force``. Returns the report as
    written (``checkpoint.output`` and ``output_sha256`` filled in).
    """
    paths = output_paths(directory)
    report = result.report
    settings_yaml = config.to_yaml() if config is not None else _settings_yaml(result)
    listing = {}
    if config is not None and config.removal.indices is not None:
        listing[INDICES_SHA256] = sha256_file(config.removal.indices)
    metadata = checkpoint_metadata(
        task=report.task,
        config_yaml=settings_yaml,
        input_sha256=report.checkpoint.input_sha256,
        method=report.method,
        removal=result.task.description,
        **listing,
    )
    names = OUTPUT_FILES.values()
    with (
        claim_output_dir(directory, force=force, names=names) as outputs,
        outputs.stage() as staging,
    ):
        staged = {key: staging / path.name for key, path in paths.items()}
        save_checkpoint(staged["model"], result.model.state_dict(), metadata)
        report.checkpoint.output = str(paths["model"])
        report.checkpoint.output_sha256 = sha256_file(staged["model"])
        as_dict = report.to_dict()
        save_mask(
            staged["mask"],
            result.mask,
            metadata=mask_metadata(report.task, result.settings.selection, settings_yaml),
        )
        if as_dict["update"]["sweep"]:
            write_with(staged["plot"], lambda tmp: plot_sweep(as_dict, tmp))
        write_text(staged["config"], settings_yaml)
        write_text(staged["markdown"], markdown(as_dict))
        write_json(staged["report"], as_dict)
    return as_dict


def _settings_yaml(result: EditResult) -> str:
    return yaml.safe_dump(dataclasses.asdict(result.settings), sort_keys=False)


def mask_metadata(task: str, selection: SelectionConfig, config_yaml: str) -> dict[str, str]:
    """A mask file's metadata: the task, the selection and the resolved config."""
    return {
        "task": task,
        "selection": selection.method,
        "ratio": str(selection.ratio),
        "config": config_yaml,
    }


SWEEP_LABELS = {
    "match_val": "match: removal set vs validation (100: indistinguishable)",
    "ks_val": "KS distance of their losses (×100)",
    "confidence_gap_val": "mean confidence gap to validation",
    "acc_val": "validation accuracy",
    "forget_acc_train": "accuracy on the removal set",
    "forget_acc_val": "forget accuracy (validation)",
    "retain_acc_val": "retain accuracy (validation)",
    "clean_acc_val": "clean accuracy (validation)",
    "robust_acc_val": "robust accuracy (validation)",
    "asr_val": "attack success rate (validation)",
    "objective": "objective (the search keeps its best)",
}
"""Legend labels of the sweep plot's curves (a key without one is shown as it is)."""


def plot_sweep(report: dict, path: Path) -> None:
    """The validation metrics against the step, the chosen step marked; the legend beside the
    plot, the axes a little wider than the data, percentages on a 0-100 axis (an objective
    penalised below it, by a step that costs too much validation accuracy, is said so)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    sweep = report["update"]["sweep"]
    figure, axis = plt.subplots(figsize=(9.6, 4.2))
    if len({p["damping"] for p in sweep}) > 1:  # damping: auto, one curve of the objective per λ
        for relative in sorted({p["relative_damping"] for p in sweep}):
            curve = sorted(
                (p["relative_step"], p["objective"])
                for p in sweep
                if p["relative_damping"] == relative
            )
            axis.plot(*zip(*curve, strict=True), marker=".", label=f"λ = {relative:.2g} σ_max")
        chosen = report["update"]["relative_norm"] or 0.0
        relative = report["solver"]["damping_relative"] or 0.0
        axis.axvline(
            chosen, color="black", linestyle="--", label=f"chosen, λ = {relative:.2g} σ_max"
        )
        axis.set_xlabel("relative step |s·Δ| / |θ_t|")
        axis.set_ylabel("validation objective (%)")
    else:
        scales = [p["scale"] for p in sweep]
        keys = [k for k in sweep[0] if k.endswith(("_val", "_train"))] + ["objective"]
        for key in keys:
            axis.plot(scales, [p[key] for p in sweep], marker=".", label=SWEEP_LABELS.get(key, key))
        axis.axvline(
            report["update"]["scale"],
            color="black",
            linestyle="--",
            label=f"chosen s = {report['update']['scale']:.3g}",
        )
        axis.set_xlabel("step scale s")
        axis.set_ylabel("percent")
        lowest = min(p["objective"] for p in sweep)
        axis.set_ylim(-5, 105)
        if lowest < -5:
            axis.text(
                0.01,
                0.01,
                "objective below the axis: steps that lose more validation accuracy than allowed",
                transform=axis.transAxes,
                fontsize="small",
            )
    axis.set_xscale("log")
    axis.margins(x=0.05)  # the smallest or largest step is not on the frame
    axis.set_title(f"{report['task']}: {report['method']} step search")
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def solve_text(solver: dict) -> str:
    """The solve in plain words, with what its status means."""
    if solver["status"] == "no-solve":
        return "no curvature solve (first-order)"
    return (
        f"{solver['name']}: {solver['iterations']} iterations, {solver['hvps']} HVPs, "
        f"{damping_text(solver)}, relative residual "
        f"{format_cell(solver['relative_residual'], '.3g')}; "
        f"{solver['status']} ({STATUSES[solver['status']]})"
    )


def damping_text(solver: dict) -> str:
    """The objective's weight decay and the damping λ used (its form, relative to σ_max when
    that was estimated, and who chose it)."""
    text = (
        f"weight decay {solver['weight_decay']:.3g}, {solver['damping_form']} damping "
        f"{solver['damping']:.3g}"
    )
    if solver["damping_relative"] is not None:
        text += f" ({solver['damping_relative']:.3g} × σ_max {solver['sigma_max']:.3g})"
    if solver["damping_chosen_by"] == "validation":
        text += " chosen with the step on the validation split"
    return text


def changed_text(report: dict) -> str:
    """How many target parameters changed, and why fewer may change than were selected."""
    params, targets = report["params"], report["selection"]["targets"]
    text = (
        f"{params['changed']:,} of {targets:,} target parameters changed "
        f"({100 * params['fraction']:.2f}% of all {params['total']:,})"
    )
    if params["changed"] < targets:
        text += (
            "; targets with zero gradient and curvature (e.g. convolution taps that only ever "
            "see padding) keep their value"
        )
    return text


def summary_lines(report: dict) -> list[str]:
    """The solve, the step and the parameters changed, for the terminal."""
    update = report["update"]
    lines = [
        f"solver {solve_text(report['solver'])}",
        f"{step_text(update)}; {changed_text(report)}",
    ]
    if report["removal"]["validation"]:
        lines.append(f"validation split: {report['removal']['validation']}")
    if smallest_step_chosen(update):
        lines.append(
            f"the step search chose its smallest step (relative {update['relative_norm']:.3g}, "
            "update.grid_min): the edit barely changes the model; lower update.grid_min to "
            "search smaller steps, or check that the removal set differs from unseen data"
        )
    return [*lines, cost_text(report["cost"])]


def smallest_step_chosen(update: dict) -> bool:
    """Whether the step search kept the smallest relative step it tried."""
    steps = [p["relative_step"] for p in update["sweep"]]
    if update["chosen_by"] != "validation" or not steps or update["relative_norm"] is None:
        return False
    return update["relative_norm"] <= min(steps) * (1 + 1e-9)


def step_text(update: dict) -> str:
    """The step as a multiple of the influence step (scale 1), and who chose it."""
    chosen = {
        "validation": "searched on the validation split",
        "task": "the task's default",
    }.get(update["chosen_by"], "given")
    return f"step scale {update['scale']:.4g}× the influence step ({chosen})"


def cost_text(cost: dict) -> str:
    """``edit 0.21× retraining (counted: …); 2.4 s now, …``: the edit's cost in one line, the
    figure a gate reads first."""
    retrain, ratio, seconds = cost["retrain"], cost["retrain_ratio"], cost["seconds_ratio"]
    if ratio is None:
        return f"edit {cost['seconds']['edit']:.1f} s, against no retraining"
    return (
        f"edit {ratio:.2f}× retraining (counted: {cost['passes']['edit']:,.0f} sample passes "
        f"against {retrain['epochs']} epochs over {retrain['samples']:,} samples at "
        f"{retrain['step_passes']:.2f} passes a sample); {cost['seconds']['edit']:.1f} s now, "
        f"{format_cell(seconds)}× the {retrain['seconds']:.1f} s retraining would take now"
    )


def budget_text(budget: dict) -> str:
    """How the solve was sized, in words."""
    size = f"{budget['hessian_samples']} Hessian samples × {budget['max_iter']} iterations"
    if budget["chosen_by"] == "config":
        return f"solve sized by the config ({size})"
    return (
        f"solve sized by influence.budget {budget['fraction']:g} of a retraining ({size}, "
        f"predicted {budget['predicted_ratio']:.2f}× in sample passes)"
    )


def format_cell(value: object, spec: str = ".2f") -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else format(value, spec)
    return "n/a" if value is None else str(value)


def metrics_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the before/after(/oracle/gap) table, one row per scalar metric (KL
    in nats to three significant digits, percentages to two decimals)."""
    columns = [c for c in ("before", "after", "oracle", "gap") if c in metrics]
    keys = list(scalar_metrics(metrics["before"]))
    rows = [
        [key]
        + [format_cell(metrics[c].get(key), ".3g" if key in KL_KEYS else ".2f") for c in columns]
        for key in keys
    ]
    if "gap" in metrics:
        mean = format_cell(metrics["gap"]["mean"])
        rows.append(["mean gap"] + [""] * (len(columns) - 1) + [mean])
    return ["metric"] + columns, rows


SALUN_LABELS = {"ua": "UA", "ra": "RA", "ta": "TA", "mia_efficacy": "MIA-efficacy"}


def salun_rows(metrics: dict) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows of the SalUn protocol table (None where the task has none)."""
    protocol = metrics.get("salun")
    if protocol is None:
        return None
    columns = [c for c in ("before", "after", "oracle", "gap") if c in protocol]
    rows = [
        [f"{label} ({key})"] + [format_cell(protocol[c][key]) for c in columns]
        for key, label in SALUN_LABELS.items()
    ]
    if "gap" in protocol:
        rows.append(
            ["average gap"] + [""] * (len(columns) - 1) + [format_cell(protocol["gap"]["mean"])]
        )
    return ["protocol"] + columns, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def markdown(report: dict) -> str:
    """report.md: what was done, how it was measured, and the metrics table."""
    solver, update = report["solver"], report["update"]
    table = markdown_table(*metrics_rows(report["metrics"]))
    chosen = (
        "searched on the validation split (best task objective, ties to the "
        f"smaller step) over {len(update['sweep'])} log-spaced scales"
        if update["sweep"]
        else "the task's default, no search"
        if update["chosen_by"] == "task"
        else "given in the config"
    )
    lines = [
        f"# gif {report['task']}",
        "",
        f"- removal set: {report['removal']['description']} "
        f"({report['removal']['samples']} of {report['removal']['train_samples']} training "
        f"samples); Hessian sample: {report['removal']['hessian_samples']} retained samples",
        f"- method: `{report['method']}`, curvature `{solver['curvature']}`; solver "
        f"{solve_text(solver)}",
        f"- selection: `{report['selection']['method']}` at ratio "
        f"{report['selection']['ratio']:g}; {changed_text(report)}",
        f"- {step_text(update)}: {chosen}; update norm {update['norm']:.4g}",
        _input_line(report["checkpoint"]),
        f"- cost: {cost_text(report['cost'])}; {budget_text(report['cost']['budget'])}",
        "",
        "Metrics are percentages on the test split (``*_train`` on the "
        f"{train_metrics_text(report['metrics'].get('train_samples'))}); the step scale never "
        "saw the test split." + (FIDELITY_TEXT if "gap" in report["metrics"] else ""),
        "",
        *table,
        "",
        *salun_markdown(report["metrics"]),
        *checks_markdown(report.get("checks", [])),
    ]
    return "\n".join(lines)


FIDELITY_TEXT = (
    " `kl_oracle_*`: mean KL(oracle ‖ model) of the predicted distributions, in nats; "
    "`agree_oracle_*`: % of samples whose top-1 class is the oracle's; `*_test` on the test "
    "split, `*_removed` on the removal set's samples among the `*_train` ones (the oracle's "
    "own column compares it with itself). The mean gap leaves these out."
)


def salun_markdown(metrics: dict) -> list[str]:
    """The SalUn protocol section of report.md (nothing where the task has none)."""
    protocol = salun_rows(metrics)
    if protocol is None:
        return []
    return [
        "## SalUn protocol",
        "",
        "UA: 100 − accuracy on the removal set; RA: accuracy on the retained training "
        "samples; TA: test accuracy (of the retained classes, for a class removal); "
        "MIA-efficacy: the share of the removal set a confidence attack calls non-members "
        "(the metrics above, in the protocol of SalUn and l1-sparse; average gap: the mean "
        "|after − oracle| of the four).",
        "",
        *markdown_table(*protocol),
        "",
    ]


def train_metrics_text(train_samples: int | None) -> str:
    """What the ``*_train`` metrics were measured on (``metrics.train_samples``)."""
    if train_samples is None:
        return "training split"
    return f"seeded sample of {train_samples:,} training samples, metrics.train_samples"


def _input_line(checkpoint: dict) -> str:
    if checkpoint["input"] is None:
        return "- input: a model in memory"
    return (
        f"- input checkpoint: `{checkpoint['input']}` (sha256 `{checkpoint['input_sha256'][:12]}…`)"
    )


def checks_markdown(checks: list[dict]) -> list[str]:
    """The ``--check`` gates of the run, one row each (nothing without checks)."""
    if not checks:
        return []
    rows = [
        f"| `{c['expression']}` | {format_value(c['left'])} | {format_value(c['right'])} | "
        f"{'pass' if c['passed'] else 'FAIL'} |"
        for c in checks
    ]
    failed = sum(not c["passed"] for c in checks)
    verdict = f"{failed} of {len(checks)} failed" if failed else f"all {len(checks)} passed"
    return [
        "## Checks",
        "",
        f"`--check` gates: {verdict}.",
        "",
        "| check | left | right | result |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
