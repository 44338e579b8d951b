"""The outputs of an edit (SPEC §5): checkpoint, mask, report.json, report.md, config, plot.

Everything is computed before anything is written; the files are written into a staging
folder and published as one set (``gifcli.outputs``), so a failed run leaves the previous
outputs as they were.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from gifcli.checkpoint import checkpoint_metadata, save_checkpoint, sha256_file
from gifcli.checks import format_value
from gifcli.config import Config
from gifcli.outputs import claim_output_dir, write_json, write_text, write_with
from gifcli.selection import save_mask

OUTPUT_FILES = {
    "model": "model.safetensors",
    "mask": "mask.safetensors",
    "report": "report.json",
    "markdown": "report.md",
    "config": "config.yaml",
    "plot": "sweep.png",
}


def scalar_metrics(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def oracle_gap(after: dict, oracle: dict) -> dict[str, float]:
    """``|after − oracle|`` on every scalar metric, and their mean (``mean``)."""
    gap = {k: abs(v - oracle[k]) for k, v in scalar_metrics(after).items() if k in oracle}
    finite = [v for v in gap.values() if math.isfinite(v)]
    gap["mean"] = sum(finite) / len(finite) if finite else float("nan")
    return gap


def write_outputs(
    *,
    paths: dict[str, Path],
    report: dict,
    model: nn.Module,
    mask: dict,
    config: Config,
    force: bool = False,
) -> None:
    """Write every output of an edit and publish them as one set in the folder of ``paths``;
    fills ``report['checkpoint']['output_sha256']``."""
    metadata = checkpoint_metadata(
        task=report["task"],
        config_yaml=config.to_yaml(),
        input_sha256=report["checkpoint"]["input_sha256"],
        method=report["method"],
    )
    names = OUTPUT_FILES.values()
    with (
        claim_output_dir(paths["model"].parent, force=force, names=names) as outputs,
        outputs.stage() as staging,
    ):
        staged = {key: staging / path.name for key, path in paths.items()}
        save_checkpoint(staged["model"], model.state_dict(), metadata)
        report["checkpoint"]["output_sha256"] = sha256_file(staged["model"])
        save_mask(staged["mask"], mask, metadata=mask_metadata(report["task"], config))
        if report["update"]["sweep"]:
            write_with(staged["plot"], lambda tmp: plot_sweep(report, tmp))
        write_text(staged["config"], config.to_yaml())
        write_text(staged["markdown"], markdown(report))
        write_json(staged["report"], report)


def mask_metadata(task: str, config: Config) -> dict[str, str]:
    """A mask file's metadata: the task, the selection and the resolved config."""
    return {
        "task": task,
        "selection": config.selection.method,
        "ratio": str(config.selection.ratio),
        "config": config.to_yaml(),
    }


def plot_sweep(report: dict, path: Path) -> None:
    """The validation metrics against the step scale, the chosen scale marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    sweep = report["update"]["sweep"]
    scales = [p["scale"] for p in sweep]
    keys = [k for k in sweep[0] if k.endswith("_val")] + ["objective"]
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for key in keys:
        axis.plot(scales, [p[key] for p in sweep], marker=".", label=key)
    axis.axvline(
        report["update"]["scale"],
        color="black",
        linestyle="--",
        label=f"chosen s={report['update']['scale']:.3g}",
    )
    axis.set_xscale("log")
    axis.set_xlabel("step scale s")
    axis.set_ylabel("validation metric (%)")
    axis.set_title(f"{report['task']}: {report['method']} step search")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def format_cell(value: object, spec: str = ".2f") -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else format(value, spec)
    return "n/a" if value is None else str(value)


def metrics_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the before/after(/oracle/gap) table, one row per scalar metric."""
    columns = [c for c in ("before", "after", "oracle", "gap") if c in metrics]
    keys = list(scalar_metrics(metrics["before"]))
    rows = [[key] + [format_cell(metrics[c].get(key)) for c in columns] for key in keys]
    if "gap" in metrics:
        mean = format_cell(metrics["gap"]["mean"])
        rows.append(["mean gap"] + [""] * (len(columns) - 1) + [mean])
    return ["metric"] + columns, rows


def markdown(report: dict) -> str:
    """report.md: what was done, how it was measured, and the metrics table."""
    solver, update, params = report["solver"], report["update"], report["params"]
    header, rows = metrics_rows(report["metrics"])
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    chosen = (
        "searched on the validation split (best harmonic-mean objective, ties to the "
        f"smaller step) over {len(update['sweep'])} log-spaced scales"
        if update["sweep"]
        else "given in the config"
    )
    lines = [
        f"# gif {report['task']}",
        "",
        f"- removal set: {report['removal']['description']} "
        f"({report['removal']['samples']} of {report['removal']['train_samples']} training "
        f"samples); Hessian sample: {report['removal']['hessian_samples']} retained samples",
        f"- method: `{report['method']}`, curvature `{solver['curvature']}`, solver "
        f"`{solver['name']}` (damping {solver['damping']:g}): {solver['iterations']} "
        f"iterations, {solver['hvps']} HVPs, relative residual "
        f"{format_cell(solver['relative_residual'], '.3g')}, converged: {solver['converged']}",
        f"- selection: `{report['selection']['method']}` at ratio "
        f"{report['selection']['ratio']:g}; {params['changed']} of {params['total']} "
        f"parameters changed ({100 * params['fraction']:.2f}%)",
        f"- step scale: {update['scale']:.4g}, {chosen}; update norm {update['norm']:.4g}",
        f"- input checkpoint: `{report['checkpoint']['input']}` "
        f"(sha256 `{report['checkpoint']['input_sha256'][:12]}…`)",
        f"- time: {report['timing']['total_seconds']:.1f} s",
        "",
        "Metrics are percentages on the test split (``*_train`` on the training split); "
        "the step scale never saw the test split.",
        "",
        *table,
        "",
        *checks_markdown(report.get("checks", [])),
    ]
    return "\n".join(lines)


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
