"""What the two task benchmarks share (``remove_class.py``, ``recover_backdoor.py``).

Per seed (the config ``seed``: it sets the training of the base model, the validation split,
the selection and the Hessian sample), one base model and one retrain oracle are trained with
``run_train`` into a work folder; every method of that seed then edits the same base model
through ``run_edit`` (the step scale searched on the validation split, the oracle's
metrics and gaps in the same report). Results keep every per-seed number; tables show the mean
± sample standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from gifcli.config import Config, TrainConfig, load_config
from gifcli.context import prepare
from gifcli.influence.estimators import estimator
from gifcli.metrics import oracle_gap, scalar_metrics
from gifcli.runs import run_edit
from gifcli.tasks import task_type
from gifcli.train import run_train, train_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SOLVE_FIELDS = ("iterations", "hvps", "relative_residual", "converged", "seconds")
FIDELITY_COLUMNS = (
    ("kl_oracle_test", "KL test"),
    ("kl_oracle_removed", "KL removed"),
    ("agree_oracle_test", "agree test"),
    ("agree_oracle_removed", "agree removed"),
)
"""The fidelity to the retrained oracle every edit's report carries (``--oracle``): mean
KL(oracle ‖ edit) in nats and top-1 agreement in %, on the test split and the removal set."""

PAPER = (
    "influence.curvature=hessian",
    "influence.weight_decay=0",
    "influence.gradient=removal",
    "influence.damping_form=tikhonov",
    "influence.damping=0.01",
)
CORRECTED = (
    "influence.curvature=hessian",
    "influence.gradient=retained",
    "influence.damping_form=shift",
    "influence.damping=0",
)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gif-paper": ("gif", PAPER),
    "gif-corrected": ("gif", (*CORRECTED, "update.scale=1")),
    "gif-corrected-searched": ("gif", (*CORRECTED, "update.scale=auto")),
    "gif-corrected-all": ("gif", (*CORRECTED, "update.scale=1", "selection.ratio=1.0")),
    "first-order-all": ("first-order", ("selection.ratio=1.0",)),
}
"""Named estimator settings a benchmark's ``--methods`` may list beside the influence methods:
``name -> (influence.method, config overrides)``. ``gif-paper``: GIF as the paper has it (the
Hessian of the training loss alone, the removal set's gradient, Tikhonov damping λ = 0.01 on
the least-squares system). ``gif-corrected``: the Hessian of the objective the model was
trained on (``+ wd·I``, the weight decay the checkpoint records), the retained objective's
gradient, no damping, step 1 (the influence step itself); ``gif-corrected-searched``: the same
with the step searched on the validation split. ``*-all``: on every Linear/Conv2d parameter
(``selection.ratio`` 1) instead of the config's selection."""


# --------------------------------------------------------------------------- command line


def csv(cast: Callable = str) -> Callable[[str], list]:
    """An argparse type: a comma-separated list (``none``: the empty list)."""

    def parse(text: str) -> list:
        if text.strip().lower() == "none":
            return []
        return [cast(item) for item in text.split(",") if item.strip()]

    return parse


def add_common_arguments(
    parser: argparse.ArgumentParser, *, config: str, results: str, methods: Sequence[str]
) -> None:
    add = parser.add_argument
    add("--config", type=Path, default=ROOT / config, help=f"scenario (default {config})")
    add(
        "--data",
        type=Path,
        help="a tensors .npz/.pt file instead of the config's data set "
        "(sets data.dataset=tensors data.path=FILE)",
    )
    add_overrides(parser, "extra dotted config override, repeatable")
    add("--seeds", type=csv(int), default=[0, 1, 2], help="config seeds (default 0,1,2)")
    add(
        "--methods",
        type=csv(),
        default=list(methods),
        help=f"influence methods, or none (default {','.join(methods)})",
    )
    add(
        "--finetune",
        type=csv(int),
        default=list(FINETUNE_EPOCHS),
        help="epochs of the fine-tuning baselines, or none (default "
        f"{','.join(map(str, FINETUNE_EPOCHS))})",
    )
    add(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on 2 "
        "shared cores, 2 threads made solves up to 10x slower under load)",
    )
    add(
        "--work-dir",
        type=Path,
        help="keep checkpoints and run outputs here and reuse trained "
        "models whose resolved config matches (default: a temporary folder, deleted)",
    )
    add("--output", type=Path, default=RESULTS / results, help="results JSON")
    add(
        "--merge",
        action="store_true",
        help="rerun only the given runs (e.g. --methods sif) and replace them in --output, "
        "keeping every other number there; refused when a seed's base model or oracle measures "
        "differently from the stored one",
    )
    add("--markdown", type=Path, help="write the markdown section here (default: stdout)")
    add("--render", action="store_true", help="only render the markdown of --output")


def add_overrides(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{help_text} (e.g. influence.hessian_samples=512)",
    )


def base_overrides(args: argparse.Namespace) -> list[str]:
    data = ["data.dataset=tensors", f"data.path={args.data}"] if args.data else []
    return data + list(args.overrides)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces the numbers (``--markdown``, ``--plot`` and ``--work-dir``
    only say where text, figures and intermediate files go, so they are left out)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    for option in ("--markdown", "--plot", "--work-dir"):
        if option in arguments:
            at = arguments.index(option)
            del arguments[at : at + 2]
        arguments = [a for a in arguments if not a.startswith(f"{option}=")]
    return " ".join([".venv/bin/python", f"benchmarks/{script}", *arguments])


# --------------------------------------------------------------------------- running


class Log:
    """Progress lines on stderr, stamped with the seconds since the start; samples the load."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.load: list[float] = [os.getloadavg()[0]]

    def __call__(self, message: str) -> None:
        self.load.append(os.getloadavg()[0])
        print(f"[{self.elapsed():6.0f} s] {message}", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@contextmanager
def work_folder(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="gif-bench-") as tmp:
        yield Path(tmp)


def seed_config(
    args: argparse.Namespace, seed: int, folder: Path, extra: Sequence[str] = ()
) -> Config:
    overrides = [
        *base_overrides(args),
        f"seed={seed}",
        f"checkpoint={folder / 'base.safetensors'}",
        *extra,
    ]
    return load_config(args.config, overrides)


def train(config: Config, output: Path, *, retrain: bool) -> dict:
    """``run_train`` into ``output``, or the report of an earlier training there whose config
    differs at most in the sections training does not read (``TRAINING_IGNORES``)."""
    report_path = output.with_suffix(".report.json")
    config_path = output.with_suffix(".config.yaml")
    if (
        output.exists()
        and report_path.exists()
        and config_path.exists()
        and _trained_on(yaml.safe_load(config_path.read_text())) == _trained_on(config.to_dict())
    ):
        return {**json.loads(report_path.read_text()), "cached": True}
    return {**run_train(config=config, output=output, retrain=retrain, force=True), "cached": False}


TRAINING_IGNORES = ("selection", "influence", "update", "output")
REMOVAL_IGNORES = ("gradient_samples", "objective", "tolerance", "synthetic_samples")
"""Config sections and ``removal`` keys that only the edit reads."""


def _trained_on(config: dict) -> dict:
    kept = {k: v for k, v in config.items() if k not in TRAINING_IGNORES}
    removal = kept.get("removal") or {}
    kept["removal"] = {k: v for k, v in removal.items() if k not in REMOVAL_IGNORES}
    return kept


def train_pair(args: argparse.Namespace, seed: int, folder: Path, log: Log) -> dict:
    """The base model and the retrain oracle of one seed."""
    config = seed_config(args, seed, folder)
    base = train(config, folder / "base.safetensors", retrain=False)
    oracle = train(config, folder / "oracle.safetensors", retrain=True)
    log(
        f"seed {seed}: base model {base['acc_test']:.1f}% test accuracy "
        f"({base['seconds']:.1f} s), oracle {oracle['acc_test']:.1f}% "
        f"({oracle['seconds']:.1f} s){' (cached)' if base['cached'] else ''}"
    )
    return {"base": _train_summary(base), "oracle": _train_summary(oracle)}


def _train_summary(report: dict) -> dict:
    return {
        "acc_test": report["acc_test"],
        "seconds": report["seconds"],
        "train_samples": report["train_samples"],
        "cached": report["cached"],
    }


class SeedRuns:
    """The unlearning runs of one seed; reuses a run with identical settings and the mask of an
    earlier run with the same selection (so masked methods share one mask).

    ``scenario``: config overrides of every run (e.g. the removal set); ``oracle``: the retrain
    oracle of that scenario.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        seed: int,
        folder: Path,
        oracle: Path,
        task: str,
        log: Log,
        scenario: Sequence[str] = (),
    ) -> None:
        self.args, self.seed, self.folder, self.oracle = args, seed, folder, oracle
        self.task, self.log, self.scenario = task, log, list(scenario)
        self.runs: dict[tuple, dict] = {}
        self.masks: dict[tuple, tuple[str, Path]] = {}
        self.before: dict | None = None
        self.oracle_metrics: dict | None = None
        self.total: int | None = None  # trainable parameters of the model

    def config(self, extra: Sequence[str] = ()) -> Config:
        return seed_config(self.args, self.seed, self.folder, [*self.scenario, *extra])

    def run(
        self,
        method: str,
        selection: str | None = None,
        ratio: float | None = None,
        options: Sequence[str] = (),
    ) -> dict:
        """One ``run_edit`` of an influence method or a ``VARIANTS`` name; ``selection``/
        ``ratio`` default to the config's; ``options``: more overrides (e.g. the step
        objective), which do not change the mask."""
        influence, preset = VARIANTS.get(method, (method, ()))
        options = [*preset, *options]
        masked = estimator(influence).targeted
        config = self.config(options)
        selection = selection or config.selection.method
        ratio = config.selection.ratio if ratio is None else ratio
        if not masked:
            mask_key: tuple = ()
        elif ratio == 1.0:  # every selection method takes every Linear/Conv2d parameter
            mask_key = ("all", 1.0)
        else:
            mask_key = (selection, ratio)
        key = (method, *mask_key, *options)
        if key in self.runs:
            return self.runs[key]
        name = "-".join(str(part).rpartition("=")[2] for part in key).replace("/", "_")
        config = self.config(
            [
                *options,
                f"influence.method={influence}",
                f"selection.method={selection}",
                f"selection.ratio={ratio}",
                f"output.dir={self.folder / 'runs' / name}",
            ]
        )
        shared = self.masks.get(mask_key) if masked else None  # (run name, mask file)
        report = run_edit(
            config=config,
            command=self.task,
            mask_path=shared[1] if shared else None,
            oracle=self.oracle,
            force=True,
        )
        if masked and shared is None:
            self.masks[mask_key] = (name, Path(config.output.dir) / "mask.safetensors")
        self.before = self.before or scalar_metrics(report["metrics"]["before"])
        self.oracle_metrics = self.oracle_metrics or scalar_metrics(report["metrics"]["oracle"])
        record = summarize(report, mask_from=shared[0] if shared else None)
        self.total = record["total_params"]
        self.runs[key] = record
        self.log(
            f"seed {self.seed}: {' '.join([*self.scenario, name])}: "
            + ", ".join(f"{k} {record['metrics'][k]:.4g}" for k in self.headline())
            + f" ({record['seconds']:.1f} s)"
        )
        return record

    def headline(self) -> tuple[str, ...]:
        return (*task_type(self.task).metric_keys[:2], "kl_oracle_test", "kl_oracle_removed")

    def finetune(self, epochs: Sequence[int]) -> dict:
        """The fine-tuning baselines (``finetune_baseline``) of this seed and scenario."""
        return finetune_baseline(self.config(), self.oracle, epochs, self.log)


FINETUNE_EPOCHS = (1, 2, 5)
FINETUNE_LR_FRACTION = 0.1
"""Fine-tuning on the retained data, the practitioner's baseline: k epochs of ``gif train``'s
loop from the base model, at a tenth of the training learning rate (cosine schedule)."""


def finetuned(
    model: torch.nn.Module, retained, train: TrainConfig, *, epochs: int, seed: int
) -> tuple[torch.nn.Module, float]:
    """A copy of ``model`` fine-tuned on ``retained`` for ``epochs``, and the seconds it took."""
    tuned = copy.deepcopy(model)
    schedule = dataclasses.replace(train, epochs=epochs, lr=train.lr * FINETUNE_LR_FRACTION)
    started = time.perf_counter()
    train_model(tuned, retained, config=schedule, seed=seed, device=torch.device("cpu"))
    return tuned, time.perf_counter() - started


def finetune_baseline(config: Config, oracle: Path, epochs: Sequence[int], log: Log) -> dict:
    """Fine-tuning the config's model on the retrain oracle's data for each of ``epochs``: its
    metrics (with the fidelity to ``oracle``) and seconds (the training loop only)."""
    ctx = prepare(config)
    task = ctx.task()
    model, reference = ctx.load_model(), ctx.load_model(oracle, role="oracle")
    retained = task.retrain_split(ctx.data)
    out = {}
    for count in epochs:
        tuned, seconds = finetuned(model, retained, config.train, epochs=count, seed=config.seed)
        metrics = task.evaluate(
            tuned, ctx.data, device=ctx.device, seed=config.seed, oracle=reference
        )
        out[str(count)] = {"metrics": scalar_metrics(metrics), "seconds": seconds}
        log(
            f"seed {config.seed}: fine-tune {count} epochs ({seconds:.1f} s): KL test "
            f"{metrics['kl_oracle_test']:.4f}, KL removed {metrics['kl_oracle_removed']:.4f}"
        )
    return out


def run_benchmark(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    *,
    script: str,
    task: str,
    body: Callable[[SeedRuns], dict],
    **fields,
) -> dict:
    """Train each seed's base model and oracle, run ``body(runs)`` (the script's unlearning
    runs, returning what to keep), and write the results JSON."""
    log = Log()
    torch.set_num_threads(args.threads)
    stored = stored_results(args) if args.merge else None
    results = {
        "benchmark": task,
        "command": command_line(script, argv),
        "config": str(
            args.config.resolve().relative_to(ROOT)
            if args.config.resolve().is_relative_to(ROOT)
            else args.config
        ),
        "data": str(args.data) if args.data else None,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "methods": args.methods,
        "results_file": args.output.name,
        **fields,
        "machine": machine(args.threads),
        "per_seed": [],
    }
    with work_folder(args.work_dir) as work:
        for seed in args.seeds:
            folder = work / f"seed-{seed}"
            folder.mkdir(exist_ok=True)
            results["settings"] = settings(seed_config(args, seed, folder))
            models = train_pair(args, seed, folder, log)
            runs = SeedRuns(
                args, seed, folder, oracle=folder / "oracle.safetensors", task=task, log=log
            )
            kept = body(runs)
            results["settings"]["parameters"] = runs.total
            results["per_seed"].append(
                {
                    "seed": seed,
                    **models,
                    "before": runs.before,
                    "oracle_metrics": runs.oracle_metrics,
                    **kept,
                }
            )
    if stored is not None:
        results = merge(stored, results)
    finish(args, results, log)
    return results


def stored_results(args: argparse.Namespace) -> dict:
    if not args.output.exists():
        sys.exit(f"--merge: {args.output} does not exist; run the benchmark without --merge first")
    return json.loads(args.output.read_text())


def merge(stored: dict, rerun: dict) -> dict:
    """``stored`` with the runs of ``rerun`` in place of its own, and ``rerun``'s command and
    machine under ``reruns``. Exits when a seed's base model or oracle differs (the rows would
    compare edits of different models) or when the settings differ."""
    settings = {k: v for k, v in rerun["settings"].items() if k != "parameters"}
    if settings != {k: v for k, v in stored["settings"].items() if k != "parameters"}:
        sys.exit("--merge: the config's settings differ from the stored run's; rerun everything")
    by_seed = {entry["seed"]: entry for entry in stored["per_seed"]}
    for entry in rerun["per_seed"]:
        old = by_seed.get(entry["seed"])
        if old is None:
            sys.exit(f"--merge: seed {entry['seed']} is not in the stored results")
        for key in ("before", "oracle_metrics"):
            if entry[key] != old[key]:
                sys.exit(
                    f"--merge: seed {entry['seed']}: the {key} metrics differ from the stored "
                    "ones (another base model or oracle); rerun everything"
                )
        _merge_runs(old, {k: v for k, v in entry.items() if isinstance(v, dict) and k in old})
    stored["methods"] += [m for m in rerun["methods"] if m not in stored["methods"]]
    stored.setdefault("reruns", []).append(
        {key: rerun[key] for key in ("command", "methods", "seeds", "machine")}
    )
    return stored


def _merge_runs(stored: dict, new: dict) -> None:
    """Replace the run records of ``stored`` by those of ``new`` (a run record holds
    ``metrics``; anything else is a group of runs, merged key by key)."""
    for key, value in new.items():
        group = isinstance(value, dict) and "metrics" not in value
        if group and isinstance(stored.get(key), dict):
            _merge_runs(stored[key], value)
        else:
            stored[key] = value


def settings(config: Config) -> dict:
    influence = config.influence
    return {
        "classes": config.removal.classes,
        "dataset": config.data.dataset,
        "poison": config.data.poison and config.to_dict()["data"]["poison"],
        "arch": config.model.arch,
        "selection": config.selection.method,
        "ratio": config.selection.ratio,
        "solver": influence.solver,
        "curvature": influence.curvature,
        "damping": influence.damping,
        "max_iter": influence.max_iter,
        "hessian_samples": influence.hessian_samples,
        "batch_size": influence.batch_size,
        "grid_points": config.update.grid_points,
        "scale": config.update.scale,
        "epochs": config.train.epochs,
    }


def summarize(report: dict, *, mask_from: str | None) -> dict:
    """What a benchmark keeps of a ``run_edit`` report."""
    solver = report["solver"]
    salun = report["metrics"].get("salun")
    return {
        "metrics": scalar_metrics(report["metrics"]["after"]),
        "oracle_gap_mean": report["metrics"]["gap"]["mean"],
        "salun_gap_mean": salun["gap"]["mean"] if salun else None,
        "seconds": report["cost"]["seconds"]["edit"],
        "cost": {
            "seconds": report["cost"]["seconds"],
            "passes": report["cost"]["passes"],
            # the committed results keep their names: retrain_ratio in seconds, passes_ratio
            # in passes (the report's seconds_ratio and retrain_ratio)
            "retrain_ratio": report["cost"]["seconds_ratio"],
            "passes_ratio": report["cost"]["retrain_ratio"],
            "budget": report["cost"]["budget"],
        },
        "targets": report["selection"]["targets"],
        "changed": report["params"]["changed"],
        "total_params": report["params"]["total"],
        "mask_from": mask_from,
        "scale": report["update"]["scale"],
        "relative_step": report["update"]["relative_norm"],
        "solver": {"name": solver["name"], **{k: solver.get(k) for k in SOLVE_FIELDS}},
    }


def machine(threads: int) -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def finish(args: argparse.Namespace, results: dict, log: Log) -> None:
    """Stamp the wall time and load (of the last rerun when ``--merge``) and write the JSON."""
    load = log.load + [os.getloadavg()[0]]
    where = results["reruns"][-1] if args.merge else results
    where["wall_seconds"] = log.elapsed()
    where["load_average_1min"] = {
        "min": min(load),
        "mean": statistics.fmean(load),
        "max": max(load),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {args.output}")


def emit(args: argparse.Namespace, text: str) -> None:
    if args.markdown:
        args.markdown.write_text(text + "\n")
    else:
        print(text)


def measure_or_render(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    measure: Callable[[argparse.Namespace, Sequence[str] | None], dict],
    markdown: Callable[[dict], str],
) -> None:
    """A benchmark's main: measure (or, with ``--render``, read ``--output``) and emit."""
    results = json.loads(args.output.read_text()) if args.render else measure(args, argv)
    emit(args, markdown(results))


# --------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), NaNs dropped."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def cell(values: Sequence[float], digits: int = 1) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean ± std over seeds of the per-seed difference ``a − b``."""
    return mean_std([x - y for x, y in zip(a, b, strict=True)])


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def measured_on(results: dict) -> str:
    """The sentence on how a run (or a rerun) was measured: machine, seeds, wall time, load."""
    m, load = results["machine"], results["load_average_1min"]
    minutes, seconds = divmod(round(results["wall_seconds"]), 60)
    busy = (
        f"; the machine was shared, 1-minute load average {load['min']:.1f}-"
        f"{load['max']:.1f} (mean {load['mean']:.1f}) on {m['cpus']} cores, so the seconds "
        f"are inflated and noisy"
        if load["mean"] > 1.5
        else ""
    )
    return (
        f"Measured on {m['cpus']} CPU cores ({m['processor']}), {m['threads']} torch "
        f"thread(s), torch {m['torch']}, Python {m['python']}; seeds "
        f"{', '.join(map(str, results['seeds']))}; the whole run took {minutes} min "
        f"{seconds:02d} s{busy}."
    )


# --------------------------------------------------------------------------- markdown


def how_measured(results: dict, result_file: str, scenario: str) -> list[str]:
    """``scenario`` and the protocol in one paragraph, the exact command, the raw numbers."""
    s, seeds = results["settings"], results["per_seed"]
    source = ", ".join(
        filter(None, [f"`{results['config']}`", results["data"], " ".join(results["overrides"])])
    )
    return [
        f"{scenario} ({source}). Model `{s['arch']}` ({s['parameters']:,} parameters); per "
        f"seed one base model and one retrain oracle, each trained {s['epochs']} epochs with "
        f"`run_train` (seed = config "
        f"`seed`: training, validation split, selection, Hessian sample). Every edit: "
        f"`{s['curvature']}` curvature, `{s['solver']}` solver (damping {s['damping']:g}, "
        f"max_iter {s['max_iter']}), Hessian sample of {s['hessian_samples']} retained training "
        f"points in batches of {s['batch_size']}, step scale `{s['scale']}` (searched over "
        f"{s['grid_points']} points on the validation split, never on test). Metrics in %, "
        f"mean ± sample std over {len(seeds)} seed(s); seconds: the whole `run_edit` call "
        f"(data, selection, solve, step search, metrics), for the oracle its training time. "
        + measured_on(results),
        "",
        "```",
        results["command"],
        "```",
        "",
        *rerun_notes(results),
        f"Raw per-seed numbers: `benchmarks/results/{result_file}`.",
        "",
    ]


def rerun_notes(results: dict) -> list[str]:
    """One paragraph and command per ``--merge`` rerun: which rows it replaced."""
    lines = []
    for rerun in results.get("reruns", []):
        rows = ", ".join(f"`{m}`" for m in rerun["methods"])
        lines += [
            f"The {rows} row(s) were rerun on the same base models and oracles (checked: "
            "identical before and oracle metrics on every seed), every other row kept. "
            + measured_on(rerun),
            "",
            "```",
            rerun["command"],
            "```",
            "",
        ]
    return lines


def method_table(results: dict, columns: Sequence[str], labels: Sequence[str]) -> list[str]:
    """One row per method (mean ± std of ``columns``), framed by the base model and the
    oracle, with the parameters edited, the fidelity to the oracle where the results have it
    (``FIDELITY_COLUMNS``), the mean gap to the oracle, the seconds and their ratio to the
    same seed's measured retraining; fine-tuning rows where measured."""
    s, seeds = results["settings"], results["per_seed"]
    total = s["parameters"]
    fidelity = [(k, label) for k, label in FIDELITY_COLUMNS if k in seeds[0]["before"]]
    retrain = [r["oracle"]["seconds"] for r in seeds]

    def row(
        name: str,
        metrics: list[dict],
        edited: str,
        gap: str,
        seconds: list[float],
        estimated: str = "—",
    ) -> list:
        ratios = [t / r for t, r in zip(seconds, retrain, strict=True)] if seconds else []
        return [
            name,
            edited,
            *(cell([m[k] for m in metrics]) for k in columns),
            *(fidelity_cell([m.get(k) for m in metrics], k) for k, _ in fidelity),
            gap,
            cell(seconds) if seconds else "—",
            cell(ratios, 2) if seconds else "—",
            estimated,
        ]

    rows = [row("base model (before)", [r["before"] for r in seeds], "—", "—", [])]
    for method in results["methods"]:
        records = [r["methods"][method] for r in seeds]
        targets = records[0]["targets"]
        edited = (
            f"{targets:,} ({100 * targets / total:.1f}%, {s['selection']})"
            if targets < total
            else f"all {total:,}"
        )
        rows.append(
            row(
                f"`{method}`",
                [r["metrics"] for r in records],
                edited,
                cell([r["oracle_gap_mean"] for r in records]),
                [r["seconds"] for r in records],
                cell([r["cost"]["retrain_ratio"] for r in records], 2)
                if all("cost" in r for r in records)
                else "—",
            )
        )
    for epochs in seeds[0].get("finetune", {}):
        tuned = [r["finetune"][epochs] for r in seeds]
        metrics = [t["metrics"] for t in tuned]
        gaps = [
            oracle_gap(m, r["oracle_metrics"])["mean"] for m, r in zip(metrics, seeds, strict=True)
        ]
        rows.append(
            row(
                f"fine-tune, {epochs} epoch{'s' if epochs != '1' else ''}",
                metrics,
                f"all {total:,}",
                cell(gaps),
                [t["seconds"] for t in tuned],
            )
        )
    rows.append(
        row(
            "retrain oracle",
            [r["oracle_metrics"] for r in seeds],
            "all (retrained)",
            "0",
            retrain,
        )
    )
    header = [
        "method",
        "parameters edited",
        *labels,
        *(label for _, label in fidelity),
        "mean gap to oracle",
        "seconds",
        "× retraining",
        "report's × retraining",
    ]
    return table(header, rows)


def fidelity_cell(values: Sequence[float | None], key: str) -> str:
    """KL in nats to three significant digits, agreement in % to one decimal."""
    values = [math.nan if v is None else v for v in values]
    if not key.startswith("kl_"):
        return cell(values)
    mean, std = mean_std(values)
    return "n/a" if math.isnan(mean) else f"{mean:.3g} ± {std:.2g}"


def fidelity_lines(results: dict, seeds: list[dict] | None = None) -> list[str]:
    """The fidelity verdict of a results file's methods and fine-tuning rows (of ``seeds``,
    one scenario's per-seed records; default every seed's), with a blank line; nothing when
    the results have no fidelity columns."""
    seeds = results["per_seed"] if seeds is None else seeds
    methods = [*results["methods"], *finetune_names(seeds)]
    text = fidelity_verdict(lambda m: per_seed_metrics(seeds, m), methods)
    return [text, ""] if text else []


def fidelity_verdict(records: Callable[[str], list[dict]], methods: Sequence[str]) -> str:
    """Per fidelity metric, which of ``methods`` is closest to the oracle, and each corrected
    GIF row against first-order, paired over seeds; ``records(method)``: its per-seed metrics."""
    if not methods or "kl_oracle_test" not in records(methods[0])[0]:
        return ""
    sentences = []
    for key, label in FIDELITY_COLUMNS:
        values = {m: [r[key] for r in records(m)] for m in methods}
        sign = 1 if key.startswith("kl_") else -1  # lower KL, higher agreement is closer
        best = min(values, key=lambda m: sign * mean_std(values[m])[0])
        tied = [m for m in values if mean_std(values[m])[0] == mean_std(values[best])[0]]
        names = ", ".join(f"`{m}`" for m in tied) + (" (tied)" if len(tied) > 1 else "")
        text = f"{label}: closest {names} ({fidelity_cell(values[best], key)})"
        for corrected in (m for m in methods if m.startswith("gif-corrected")):
            # against first-order on the same parameters (``-all``), else the config's mask
            suffix = corrected.removeprefix("gif-corrected")
            baseline = next(
                (b for b in (f"first-order{suffix}", "first-order") if b in values), None
            )
            if baseline is None:
                break
            diff, std = paired(values[corrected], values[baseline])
            word = (
                "level with"
                if abs(diff) <= std
                else "closer to retraining than"
                if sign * diff < 0
                else "farther from retraining than"
            )
            text += f"; `{corrected}` {word} `{baseline}` ({diff:+.3g} ± {std:.2g} paired)"
        sentences.append(text)
    return "Fidelity to retraining (paired over seeds): " + "; ".join(sentences) + "."


def finetune_names(seeds: list[dict]) -> list[str]:
    """The fine-tuning rows of per-seed records (``fine-tune N``), where measured."""
    return [f"fine-tune {epochs}" for epochs in seeds[0].get("finetune", {})]


def per_seed_metrics(seeds: list[dict], method: str) -> list[dict]:
    """The per-seed metrics of a method, a ``fine-tune N`` row, ``before`` or ``oracle`` in
    per-seed records (``results["per_seed"]``, or one scenario's of them)."""
    if method == "before":
        return [r["before"] for r in seeds]
    if method == "oracle":
        return [r["oracle_metrics"] for r in seeds]
    if method.startswith("fine-tune "):
        return [r["finetune"][method.removeprefix("fine-tune ")]["metrics"] for r in seeds]
    return [r["methods"][method]["metrics"] for r in seeds]


def metric_of(results: dict, method: str, key: str) -> list[float]:
    """Per-seed values of ``key`` for a method, ``before`` or ``oracle``."""
    source = {"before": "before", "oracle": "oracle_metrics"}
    if method in source:
        return [r[source[method]][key] for r in results["per_seed"]]
    return [r["methods"][method]["metrics"][key] for r in results["per_seed"]]


def within(diff: float, std: float) -> str:
    """A note when a paired difference is inside its seed-to-seed spread."""
    return "; within the seed-to-seed spread" if abs(diff) <= std else ""


def f1_verdict(results: dict) -> str:
    """Which method wins by the task's F1, by how much (paired over seeds), and GIF against
    every other method and the oracle."""
    f1 = {m: metric_of(results, m, "f1") for m in results["methods"]}
    oracle = metric_of(results, "oracle", "f1")
    ranked = sorted(f1, key=lambda m: -mean_std(f1[m])[0])
    best = ranked[0]
    text = f"By F1, `{best}` wins ({cell(f1[best])})"
    if len(ranked) > 1:
        diff, std = paired(f1[best], f1[ranked[1]])
        text += (
            f", ahead of `{ranked[1]}` by {diff:.1f} ± {std:.1f} points (paired over seeds"
            f"{within(diff, std)})"
        )
    diff, std = paired(f1[best], oracle)
    text += (
        f", {abs(diff):.1f} ± {std:.1f} points {'above' if diff >= 0 else 'below'} the "
        f"retrain oracle ({cell(oracle)}{within(diff, std)})."
    )
    if "gif" in f1 and best != "gif":
        diff, std = paired(f1[best], f1["gif"])
        text += f" GIF loses to `{best}` by {diff:.1f} ± {std:.1f} F1 points{within(diff, std)}."
    if "gif" in f1 and len(f1) > 1:
        f1["the oracle"] = oracle
        gaps = [
            f"{m if m == 'the oracle' else f'`{m}`'} "
            f"{paired(f1['gif'], f1[m])[0]:+.1f} ± {paired(f1['gif'], f1[m])[1]:.1f}"
            for m in [*ranked, "the oracle"]
            if m != "gif"
        ]
        text += " GIF's F1 minus that of: " + ", ".join(gaps) + "."
    return text
