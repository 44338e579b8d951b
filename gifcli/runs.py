"""Runs from a config: load the model and data a config names, run the library, write files.

These are the bodies of the commands without their printing: ``run_edit`` (``gif
remove-class``, ``gif recover-backdoor``, ``gif remove-samples``), ``run_select`` (``gif
select-params``) and ``run_evaluate`` (``gif evaluate``). Each checks what can be checked
before the first expensive step: the task the config describes, the output folder, the oracle
checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

from gifcli import distributed
from gifcli.checkpoint import recorded_config, sha256_file
from gifcli.checks import Check, evaluate_checks
from gifcli.config import Config, build_config
from gifcli.context import prepare
from gifcli.cost import rates_cache, with_load
from gifcli.outputs import check_output_file, claim_output_dir
from gifcli.pipeline import Settings, edit, select
from gifcli.progress import ProgressFactory, silent
from gifcli.records import CheckpointRecord, EvaluateReport
from gifcli.report import (
    OUTPUT_FILES,
    mask_metadata,
    output_paths,
    train_metrics_text,
    write_outputs,
)
from gifcli.selection import load_mask, save_mask, summarize_mask
from gifcli.tasks import Task, check_task, described_task


def run_edit(
    *,
    config: Config,
    command: str,
    mask_path: Path | None = None,
    oracle: Path | None = None,
    force: bool = False,
    progress: ProgressFactory = silent,
    checks: Sequence[Check] = (),
    note: Callable[[str], None] = lambda message: None,
) -> dict:
    """Edit ``config.checkpoint`` for the task of ``command`` (which the config must
    describe), write the outputs into ``output.dir`` and return the report, with the result of
    each of ``checks`` under ``checks``. ``output.dir`` is locked and checked before any work;
    ``note(message)`` hears what was recovered from a stopped run."""
    task_type = check_task(config, command)
    claim = (
        claim_output_dir(config.output.dir, force=force, names=OUTPUT_FILES.values(), note=note)
        if distributed.is_main()  # the one rank that writes
        else nullcontext()
    )
    with claim:
        return _edit_from_config(
            config, task_type, mask_path, oracle, force, progress, checks, note
        )


def _edit_from_config(
    config: Config,
    task_type: type[Task],
    mask_path: Path | None,
    oracle: Path | None,
    force: bool,
    progress: ProgressFactory,
    checks: Sequence[Check],
    note: Callable[[str], None],
) -> dict:
    started = time.perf_counter()
    ctx = prepare(config)
    task = task_type.from_config(config, ctx.data)
    model = ctx.load_model()
    oracle_model = ctx.load_model(oracle, role="oracle") if oracle is not None else None
    mask = load_mask(mask_path, model) if mask_path is not None else None
    input_sha = sha256_file(config.checkpoint)
    load_seconds = time.perf_counter() - started
    for line in ctx.data.notes:
        note(line)  # once every input is checked
    with distributed.process_group(ctx.device):
        result = edit(
            model,
            task,
            ctx.data,
            Settings.from_config(config),
            mask=mask,
            oracle=oracle_model,
            progress=progress,
            inplace=True,
            note=note,
            rates_cache=rates_cache(),
        )
        result.report.cost = with_load(result.report.cost, load_seconds)
        result.report.selection.mask = str(mask_path) if mask_path else None
        result.report.removal.validation = ctx.data.validation
        result.report.checkpoint = CheckpointRecord(
            input=str(config.checkpoint),
            input_sha256=input_sha,
            output=str(output_paths(config.output.dir)["model"]),
        )
        result.report.checks = evaluate_checks(checks, result.report.to_dict())
        if distributed.is_main():  # every rank holds the same edit; one writes it
            return write_outputs(result, config.output.dir, config=config, force=force)
        return result.report.to_dict()


def run_select(*, config: Config, output: Path | None = None, force: bool = False) -> dict:
    """Select the target parameters of the config's task and save the mask (default:
    ``output.dir/mask.safetensors``); returns a summary with one row per layer."""
    output = output or output_paths(config.output.dir)["mask"]
    check_output_file(output, force=force)
    ctx = prepare(config)
    task = ctx.task()
    model = ctx.load_model()
    settings = Settings.from_config(config)
    with distributed.process_group(ctx.device):
        started = time.perf_counter()
        removal = task.removal_set(ctx.data, device=ctx.device, model=model)
        selection = select(model, removal, settings, device=ctx.device)
        seconds = time.perf_counter() - started
        if distributed.is_main():
            metadata = mask_metadata(task.name, config.selection, config.to_yaml())
            save_mask(output, selection.mask, metadata=metadata)
    layers = summarize_mask(model, selection.mask, selection.units)
    selected = sum(row["selected"] for row in layers)
    total = sum(row["parameters"] for row in layers)
    return {
        "task": task.name,
        "removal": task.description,
        "selection": {"method": config.selection.method, "ratio": config.selection.ratio},
        "mask": str(output),
        "selected": selected,
        "parameters": total,
        "fraction": selected / total,
        "seconds": seconds,
        "layers": layers,
    }


def run_evaluate(
    *,
    config: Config,
    checkpoint: Path,
    checks: Sequence[Check] = (),
    removal_given: bool = False,
) -> dict:
    """Overall and per-class test accuracy of ``checkpoint`` and the metrics of the config's
    task, with the result of each of ``checks``.

    An edited checkpoint records the removal set it was edited for (its metadata's config):
    unless ``removal_given`` (the user set ``removal.*`` explicitly), the metrics are taken for
    that removal set, with a note when it differs from the config's.
    """
    notes: list[str] = []
    config = _recorded_removal(config, checkpoint, removal_given, notes)
    ctx = prepare(config)
    model = ctx.load_model(checkpoint, role="evaluated")
    task = ctx.task()
    sampled = task.metrics_sample_size(ctx.data)
    if sampled is not None:
        notes.append(f"*_train metrics measured on a {train_metrics_text(sampled)}")
    report = EvaluateReport(
        task=task.name,
        checkpoint=str(checkpoint),
        sha256=sha256_file(checkpoint),
        removal=task.description,
        metrics=task.metrics(model, ctx.data, device=ctx.device, seed=config.seed),
        notes=notes,
    )
    report.checks = evaluate_checks(checks, report.to_dict())
    return report.to_dict()


def _recorded_removal(config: Config, checkpoint: Path, given: bool, notes: list[str]) -> Config:
    """``config`` with the ``removal`` section recorded in ``checkpoint``'s metadata, if any."""
    task, recorded_raw = recorded_config(checkpoint)
    recorded = recorded_raw.get("removal")
    if task != described_task(config).name or not isinstance(recorded, dict):
        return config  # not an edit for this task (e.g. a base model or an oracle)
    current = config.to_dict()["removal"]
    if {**current, **recorded} == current:
        return config
    if given:
        notes.append(
            f"{checkpoint} was edited for removal {recorded}; scoring the removal set given "
            "on the command line instead"
        )
        return config
    merged = build_config(
        {**config.to_dict(), "removal": {**current, **recorded}},
        source=f"{checkpoint} (its metadata)",
    )
    notes.append(
        f"removal set taken from {checkpoint}'s metadata (what it was edited for): "
        f"{_differences(current, recorded)}; pass removal.* overrides to score another"
    )
    return merged


def _differences(current: dict, recorded: dict) -> str:
    return ", ".join(
        f"removal.{key}={recorded[key]!r} (config: {current.get(key)!r})"
        for key in recorded
        if recorded[key] != current.get(key)
    )
