"""Runs from a config: load the model and data a config names, run the library, write files.

These are the bodies of the commands without their printing: ``run_edit`` (``gif
remove-class``, ``gif recover-backdoor``, ``gif remove-samples``), ``run_select`` (``gif
select-params``) and ``run_evaluate`` (``gif evaluate``). Each checks what can be checked
before the first expensive step: the task the config describes, the output folder, the oracle
checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

from gifcli import distributed
from gifcli.checkpoint import check_checkpoint, read_metadata, recorded_config, sha256_file
from gifcli.checks import Check, evaluate_checks
from gifcli.config import Config, build_config
from gifcli.context import EVALUATED_HINT, prepare
from gifcli.cost import rates_cache, with_load
from gifcli.errors import GifError
from gifcli.metrics import salun_metrics
from gifcli.outputs import claim_output_dir, claim_output_files, refuse_inputs_inside
from gifcli.pipeline import Settings, edit, select
from gifcli.progress import ProgressFactory, silent
from gifcli.records import CheckpointRecord, EvaluateReport
from gifcli.report import (
    INDICES_SHA256,
    OUTPUT_FILES,
    mask_metadata,
    output_paths,
    train_metrics_text,
    write_outputs,
)
from gifcli.selection import load_mask, save_mask, summarize_mask
from gifcli.tasks import TASK_NAMES, Task, check_task, described_task


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
    refuse_inputs_inside(config.output.dir, _inputs(config, mask_path, oracle))
    claim = (
        claim_output_dir(config.output.dir, force=force, names=OUTPUT_FILES.values(), note=note)
        if distributed.is_main()  # the one rank that writes
        else nullcontext()
    )
    with claim:
        return _edit_from_config(
            config, task_type, mask_path, oracle, force, progress, checks, note
        )


def _inputs(config: Config, mask: Path | None, oracle: Path | None) -> dict[str, str | Path | None]:
    """Every file or folder an edit reads, by what it is (None: not given)."""
    data = config.data
    poison_image = data.poison.image if data.poison is not None else None
    trigger = config.removal.trigger
    return {
        "the checkpoint": config.checkpoint,
        "the --oracle checkpoint": oracle,
        "the --mask": mask,
        "data.path": data.path if data.dataset == "tensors" else None,
        "data.root": data.root if data.dataset not in ("digits", "tensors") else None,
        "removal.indices": config.removal.indices,
        "removal.poison_indices": config.removal.poison_indices,
        "data.poison.image": poison_image,
        "removal.trigger.image": trigger.image if trigger is not None else None,
    }


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
    config = with_trained_weight_decay(config, note)
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


def with_trained_weight_decay(config: Config, note: Callable[[str], None]) -> Config:
    """``config`` with ``influence.weight_decay`` resolved (docs/design.md, "Notation"): as
    given, else the weight decay ``config.checkpoint`` was trained with (``gif train``
    records it; a checkpoint it wrote before records its config), else 0 with a note."""
    if config.influence.weight_decay is not None:
        return config
    recorded = recorded_weight_decay(config.checkpoint) if config.checkpoint else None
    if recorded is None and config.checkpoint and Path(config.checkpoint).is_file():
        note(
            f"influence.weight_decay: {config.checkpoint} does not record the weight decay it "
            "was trained with; the influence step assumes none (set influence.weight_decay to "
            "its L2 coefficient)"
        )
    if recorded is None:  # a missing checkpoint is refused where it is loaded
        recorded = 0.0
    resolved = dataclasses.replace(
        config, influence=dataclasses.replace(config.influence, weight_decay=recorded)
    )
    resolved.source = config.source
    return resolved


def recorded_weight_decay(checkpoint: str | Path) -> float | None:
    """The weight decay a checkpoint written by gif records (its ``weight_decay`` metadata,
    else its config's ``influence.weight_decay`` or ``train.weight_decay``); None for any
    other checkpoint."""
    if not Path(checkpoint).is_file():
        return None
    _, raw = recorded_config(checkpoint)
    metadata = read_metadata(checkpoint) if raw else {}
    sections = [
        raw.get(key) if isinstance(raw.get(key), dict) else {} for key in ("influence", "train")
    ]
    value = metadata.get("weight_decay")
    for section in sections:  # an edit's resolved influence.weight_decay, then its training's
        value = section.get("weight_decay") if value is None else value
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def run_select(*, config: Config, output: Path | None = None, force: bool = False) -> dict:
    """Select the target parameters of the config's task and save the mask (default:
    ``output.dir/mask.safetensors``); returns a summary with one row per layer."""
    output = output or output_paths(config.output.dir)["mask"]
    claim = claim_output_files([output], force=force) if distributed.is_main() else nullcontext()
    with claim as temporary:
        return _select_from_config(config, output, temporary)


def _select_from_config(config: Config, output: Path, temporary: dict[Path, Path] | None) -> dict:
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
            save_mask(temporary[Path(output)], selection.mask, metadata=metadata)
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

    An edited checkpoint records the removal set it was edited for (its metadata's config,
    and the sha256 of a ``removal.indices`` file): unless ``removal_given`` (the user set
    ``removal.*`` explicitly), the metrics are taken for that removal set and that task, with
    a note when it differs from the config's (``evaluation_config``).
    """
    config, notes = evaluation_config(config, checkpoint, removal_given=removal_given)
    ctx = prepare(config)
    model = ctx.load_model(checkpoint, role="evaluated")
    task = ctx.task()
    task.retrain_split(ctx.data)  # refused as by the edits when the data lack the removal set
    sampled = task.metrics_sample_size(ctx.data)
    if sampled is not None:
        notes.append(f"*_train metrics measured on a {train_metrics_text(sampled)}")
    metrics = task.metrics(model, ctx.data, device=ctx.device, seed=config.seed)
    report = EvaluateReport(
        task=task.name,
        checkpoint=str(checkpoint),
        sha256=sha256_file(checkpoint),
        removal=task.description,
        metrics=metrics,
        notes=notes,
        salun=None if task.salun_sources is None else salun_metrics(metrics, task.salun_sources),
    )
    report.checks = evaluate_checks(checks, report.to_dict())
    return report.to_dict()


RECORDED_KEYS = ("removal", "data.poison")
"""What an edited checkpoint's metadata says about its removal set: ``removal`` and the
poison scenario a backdoor is described by."""


def evaluation_config(
    config: Config, checkpoint: Path, *, removal_given: bool = False
) -> tuple[Config, list[str]]:
    """The config ``gif evaluate`` scores ``checkpoint`` with, and its notes: ``config`` with
    the removal set (and task) an edited checkpoint records, unless ``removal_given``. A
    recorded ``removal.indices`` file that is missing or changed since the edit is refused."""
    notes: list[str] = []
    check_checkpoint(checkpoint, EVALUATED_HINT)
    task, raw = recorded_config(checkpoint, notes)
    if task not in TASK_NAMES or not isinstance(raw.get("removal"), dict):
        return config, notes  # not an edit (a base model, an oracle, another tool's file)
    current = config.to_dict()
    recorded = {key: _at(raw, key) for key in RECORDED_KEYS}
    differs = {k: v for k, v in recorded.items() if _at(current, k) != v}
    differs["removal"] = {
        k: v for k, v in recorded["removal"].items() if current["removal"].get(k) != v
    }
    if not differs["removal"]:
        del differs["removal"]
    if removal_given:
        if differs:
            notes.append(
                f"{checkpoint} was edited by {task} for {_shown(differs)}; scoring the removal "
                "set given on the command line instead"
            )
        return config, notes
    if differs:
        merged = copy.deepcopy(current)
        merged["removal"] = {**current["removal"], **recorded["removal"]}
        merged["data"]["poison"] = recorded["data.poison"]
        was = described_task(config).name
        source = config.source
        config = build_config(merged, source=f"{checkpoint} (its metadata)")
        config.source = source
        notes.append(
            f"scored as {task} on the removal set {checkpoint} records (what it was edited "
            f"for: {_shown(differs)})"
            + (f", not as the config's {was} task" if was != task else "")
            + "; pass removal.* overrides to score another"
        )
    _check_listing(config, checkpoint, read_metadata(checkpoint), notes)
    return config, notes


def _check_listing(config: Config, checkpoint: Path, metadata: dict, notes: list[str]) -> None:
    """Refuse a recorded ``removal.indices`` file that is missing or changed since the edit."""
    path = config.removal.indices
    if path is None:
        return
    recorded = metadata.get(INDICES_SHA256)
    if not Path(path).is_file():
        raise GifError(
            f"{path}: the listing {checkpoint} was edited to forget is missing; restore it, or "
            "pass removal.indices=FILE to score another listing"
        )
    if recorded is None:
        notes.append(f"{checkpoint} records no hash of {path}: scored on the file as it is now")
    elif sha256_file(path) != recorded:
        raise GifError(
            f"{path}: changed since {checkpoint} was edited to forget the samples it listed "
            f"(sha256 {recorded[:12]}… then); restore it, or pass removal.indices=FILE to "
            "score another listing"
        )


def _at(raw: dict, dotted: str) -> object:
    for key in dotted.split("."):
        raw = raw.get(key) if isinstance(raw, dict) else None
    return raw


def _shown(differs: dict) -> str:
    parts = [f"{key}={value!r}" for key, value in differs.items() if key != "removal"]
    parts += [f"removal.{key}={value!r}" for key, value in differs.get("removal", {}).items()]
    return ", ".join(parts)
