"""Every unlearning method on one membership scale (results: BENCHMARKS.md, "Membership audit").

Per seed: one base model and one retrain oracle (``gif train``'s code), the audit's reference
models (``gifcli.audit``: ``audit.references`` of them, half trained with the removal set and
label-matched held-out test samples, half on the oracle's data), then every method edits the
base model and every result is audited against the same references:

- the unedited model and the retrain oracle;
- GIF (paper form and corrected, ``EDITS``) and first-order through ``run_edit`` (the
  config's other settings, step searched on the validation split);
- the field's baselines (``field_baselines``): NegGrad+, SalUn, l1-sparse, and plain
  fine-tuning (``common.finetuned``), each tuned over the grid ``GRIDS`` on the task's own
  validation objective (the one GIF's step search maximises; ties to the cheaper point),
  never on test.

Columns: the SalUn protocol (UA = 100 − accuracy on the removal set, RA = accuracy on the
retained training data, TA = test accuracy (retained classes for a class removal),
MIA-efficacy = the tool's ``mia_efficacy``), their mean gap to the oracle, the mean
KL(oracle ‖ model) on the test split and on the removal set, the audit's AUC,
TPR at 1% FPR, share identified and forgetting score, seconds and × retraining (the seed's
oracle training seconds, measured in the same process).

    .venv/bin/python benchmarks/audit.py --scenario samples --data runs/digits16-4000.npz \\
        --set train.epochs=10 --seeds 0,1,2
    .venv/bin/python benchmarks/audit.py --scenario memorised --data runs/digits16-4000.npz \\
        --set train.epochs=10 --seeds 0,1,2,3,4
    .venv/bin/python benchmarks/audit.py --scenario backdoor --seeds 0,1,2,3,4
    .venv/bin/python benchmarks/audit.py --scenario class --seeds 0,1,2
    .venv/bin/python benchmarks/audit.py --render --output benchmarks/results/audit_class.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from common import (
    RESULTS,
    ROOT,
    Log,
    add_overrides,
    base_overrides,
    cell,
    command_line,
    csv,
    finetuned,
    finish,
    machine,
    measure_or_render,
    measured_on,
    table,
    train,
    work_folder,
)
from field_baselines import l1_sparse, neggrad_plus, salun

from gifcli.audit import ReferenceCache, audit_model, design
from gifcli.config import load_config
from gifcli.context import prepare
from gifcli.runs import run_edit

SCENARIOS = {
    "samples": "configs/digits-samples.yaml",
    "memorised": "configs/digits-samples.yaml",
    "class": "configs/digits.yaml",
    "backdoor": "configs/digits-backdoor.yaml",
}
"""``memorised``: the base model's lowest-margin training samples (``MEMORISED``, the worst
case of a deletion request: the samples a model has to memorise to fit) in place of a random
share; ``backdoor``: the poisoned samples of a backdoored model, removed with the labels they
were trained with and re-added with their true ones."""
MEMORISED = 0.05
"""The share of the training split the ``memorised`` scenario removes."""
GRIDS = {
    "fine-tune": [{"epochs": e} for e in (1, 2, 5)],
    "NegGrad+": [{"beta": b, "lr": r, "epochs": 1} for r in (0.1, 1.0) for b in (0.95, 0.8, 0.5)],
    "SalUn": [{"ratio": r, "epochs": e} for e in (1, 2) for r in (0.3, 0.5)],
    "l1-sparse": [{"gamma": g, "lr": r, "epochs": 5} for r in (0.1, 1.0) for g in (1e-4, 1e-3)],
}
"""Each baseline's grid, gentlest first (ties in the validation objective go to the first);
``lr``: the fraction of the training learning rate (fine-tuning's is 0.1, ``common``)."""
EDITS = {
    "GIF (paper form)": [
        "influence.method=gif",
        "influence.gradient=removal",
        "influence.weight_decay=0",
        "influence.damping_form=tikhonov",
    ],
    "GIF corrected": ["influence.method=gif"],
    "first-order": ["influence.method=first-order"],
}
"""The tool's edits: overrides of the scenario's config. The paper form is the removal-set
gradient and the Tikhonov-damped curvature without weight decay (the tool's estimator before
the correction); corrected: the defaults (retained-objective gradient, the checkpoint's weight
decay in the curvature, shift damping)."""
ROWS = ("unedited", "retrain", *EDITS, *GRIDS)
PROTOCOL = ("UA", "RA", "TA", "MIA")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--scenario", choices=sorted(SCENARIOS), default="samples")
    add("--data", type=Path, help="a tensors file instead of the config's data set")
    add_overrides(parser, "extra dotted config override, repeatable")
    add("--seeds", type=csv(int), default=[0, 1, 2], help="config seeds (default 0,1,2)")
    add("--references", type=int, default=8, help="audit.references (default 8)")
    add("--threads", type=int, default=1, help="torch threads (default 1)")
    add("--work-dir", type=Path, help="keep models here and reuse them (default: temporary)")
    add("--output", type=Path, help="results JSON (default benchmarks/results/audit_SCENARIO)")
    add("--markdown", type=Path, help="write the markdown section here (default: stdout)")
    add("--render", action="store_true", help="only render the markdown of --output")
    args = parser.parse_args(argv)
    args.output = args.output or RESULTS / f"audit_{args.scenario}.json"
    args.merge = False  # common.finish: one run, no reruns
    args.config = ROOT / SCENARIOS[args.scenario]
    return args


def protocol(task, metrics: dict) -> dict:
    """The SalUn protocol from a task's metrics (percent). A backdoor's removal set is its
    poisoned samples: UA is the share no longer given the poisoned label, RA the clean
    training accuracy, TA the clean test accuracy; it has no MIA-efficacy (None)."""
    if "corrupt_acc_train" in metrics:
        return {
            "UA": 100 - metrics["corrupt_acc_train"],
            "RA": metrics["clean_acc_train"],
            "TA": metrics["clean_acc_test"],
            "MIA": None,
        }
    test = "retain_acc_test" if "retain_acc_test" in metrics else "acc_test"
    return {
        "UA": 100 - metrics["forget_acc_train"],
        "RA": metrics["retain_acc_train"],
        "TA": metrics[test],
        "MIA": metrics["mia_efficacy"],
    }


@torch.no_grad()
def lowest_margin(config, folder: Path, share: float) -> Path:
    """A ``removal.indices`` file of the ``share`` of training samples with the lowest margin
    (true-class logit minus the largest other) under the base model: the ones it fits least
    easily, which it has to memorise. Indices into the full training set."""
    ctx = prepare(config)
    model = ctx.load_model().eval()
    train = ctx.data.train
    logits = torch.cat([model(train.x[i : i + 512]) for i in range(0, len(train), 512)])
    true = logits.gather(1, train.y[:, None]).squeeze(1)
    others = logits.scatter(1, train.y[:, None], float("-inf")).amax(1)
    count = max(1, round(share * len(train)))
    positions = torch.argsort(true - others)[:count]
    path = folder / "memorised.txt"
    indices = ctx.data.train_source[positions].sort().values
    path.write_text("".join(f"{int(i)}\n" for i in indices))
    return path


@torch.no_grad()
def finite(model: torch.nn.Module, split) -> bool:
    """Finite weights and finite outputs on ``split``."""
    weights = all(torch.isfinite(p).all() for p in model.parameters())
    return weights and bool(torch.isfinite(model(split.x)).all())


def run_seed(args: argparse.Namespace, seed: int, folder: Path, log: Log) -> dict:
    overrides = [
        *base_overrides(args),
        f"seed={seed}",
        f"checkpoint={folder / 'base.safetensors'}",
        f"audit.references={args.references}",
    ]
    config = load_config(args.config, overrides)
    base_report = train(config, folder / "base.safetensors", retrain=False)
    if args.scenario == "memorised":
        listed = lowest_margin(config, folder, MEMORISED)
        overrides += [f"removal.indices={listed}", "removal.random=null"]
        config = load_config(args.config, overrides)
    oracle_report = train(config, folder / "oracle.safetensors", retrain=True)
    retrain_seconds = oracle_report["seconds"]
    ctx = prepare(config)
    task = ctx.task()
    base = ctx.load_model()
    removal = task.removal_set(ctx.data, device=ctx.device, model=base)
    plan = design(task, ctx.data, base, device=ctx.device, seed=seed)
    removed, retained = plan.removed, plan.train_out
    cache = ReferenceCache(folder / "references")
    started = time.perf_counter()
    reference = audit_model(ctx, task, base, cache)  # trains the references once
    log(f"seed {seed}: references ready ({time.perf_counter() - started:.0f} s)")

    oracle = ctx.load_model(folder / "oracle.safetensors")

    def measure(model: torch.nn.Module, seconds: float | None, extra: dict | None = None) -> dict:
        result = audit_model(ctx, task, model, cache)
        metrics = task.evaluate(model, ctx.data, device=ctx.device, seed=seed, oracle=oracle)
        row = {
            **protocol(task, metrics),
            **{key: metrics[key] for key in ("kl_oracle_test", "kl_oracle_removed")},
            **result.audited.summary(),
            "seconds": seconds,
            "x_retrain": None if seconds is None else seconds / retrain_seconds,
            **(extra or {}),
        }
        return row

    rows = {
        "unedited": measure(base, None),
        "retrain": measure(oracle, retrain_seconds),
    }
    retrained_refs = {
        key: statistics.fmean(a.summary()[key] for a in reference.retrained)
        for key in reference.audited.summary()
    }
    for name, options in EDITS.items():
        run = "-".join(name.replace("(", "").replace(")", "").split())
        edit_config = load_config(
            args.config, [*overrides, *options, f"output.dir={folder / 'runs' / run}"]
        )
        report = run_edit(config=edit_config, command=task.name, force=True)
        model = ctx.load_model(Path(edit_config.output.dir) / "model.safetensors")
        rows[name] = measure(model, report["cost"]["seconds"]["edit"])
        log(f"seed {seed}: {name}: {rows[name]}")
    baselines: dict[str, Callable[..., tuple[torch.nn.Module, float]]] = {
        "fine-tune": lambda epochs: finetuned(
            base, retained, config.train, epochs=epochs, seed=seed
        ),
        "NegGrad+": lambda **p: neggrad_plus(base, removed, retained, config.train, seed=seed, **p),
        "SalUn": lambda **p: salun(
            base, removed, retained, config.train, seed=seed, num_classes=ctx.data.num_classes, **p
        ),
        "l1-sparse": lambda **p: l1_sparse(base, retained, config.train, seed=seed, **p),
    }
    for name, grid in GRIDS.items():
        best, total = None, 0.0
        for point in grid:
            model, seconds = baselines[name](**point)
            total += seconds
            if not finite(model, removed):  # diverged: not a candidate (as gif train refuses it)
                log(f"seed {seed}: {name} {point} diverged; skipped")
                continue
            value, _ = removal.objective(model)
            if best is None or value > best[0]:
                best = (value, point, model, seconds)
        if best is None:  # every grid point diverged: no model to audit
            rows[name] = {"chosen": "every grid point diverged", "grid_seconds": total}
            log(f"seed {seed}: {name}: every grid point diverged")
            continue
        value, point, model, seconds = best
        rows[name] = measure(
            model, seconds, {"chosen": point, "objective_val": value, "grid_seconds": total}
        )
        log(f"seed {seed}: {name}: {rows[name]}")
    return {
        "base_acc_test": base_report["acc_test"],
        "oracle_acc_test": oracle_report["acc_test"],
        "retrain_seconds": retrain_seconds,
        "removed": len(removed),
        "retrained_references": retrained_refs,
        "rows": rows,
        "description": (
            f"{len(removed)} training samples: the {MEMORISED:.0%} of the training split with "
            "the lowest margin under the base model"
            if args.scenario == "memorised"
            else task.description
        ),
    }


def measure(args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    torch.set_num_threads(args.threads)
    log = Log()
    config = load_config(args.config, base_overrides(args))
    results = {
        "command": command_line("audit.py", argv),
        "scenario": args.scenario,
        "config": SCENARIOS[args.scenario],
        "data": str(args.data) if args.data else config.data.dataset,
        "overrides": list(args.overrides),
        "references": args.references,
        "grids": GRIDS,
        "arch": config.model.arch,
        "epochs": config.train.epochs,
        "description": None,
        "seeds": args.seeds,
        "machine": machine(args.threads),
        "per_seed": {},
    }
    with work_folder(args.work_dir) as work:
        for seed in args.seeds:
            outcome = run_seed(args, seed, work / f"seed-{seed}", log)
            results["description"] = outcome.pop("description")
            results["per_seed"][str(seed)] = outcome
    finish(args, results, log)
    return results


def markdown(results: dict) -> str:
    seeds = list(results["per_seed"].values())

    def values(row: str, key: str) -> list[float]:
        return [s["rows"][row][key] for s in seeds if s["rows"][row].get(key) is not None]

    def gap(row: str) -> list[float]:
        return [
            statistics.fmean(
                abs(s["rows"][row][k] - s["rows"]["retrain"][k])
                for k in PROTOCOL
                if s["rows"]["retrain"][k] is not None
            )
            for s in seeds
            if s["rows"][row].get("UA") is not None
        ]

    header = [
        "method",
        "UA",
        "RA",
        "TA",
        "MIA-eff.",
        "avg gap",
        "KL test",
        "KL removed",
        "audit AUC",
        "TPR@1%FPR",
        "identified",
        "forgetting",
        "seconds",
        "× retrain",
        "× retrain, grid",
    ]
    body = []
    for row in ROWS:
        cells = [row, *(cell(values(row, k)) for k in PROTOCOL), cell(gap(row))]
        cells += [cell(values(row, k), 3) for k in ("kl_oracle_test", "kl_oracle_removed")]
        cells += [cell(values(row, "auc"), 3), cell(values(row, "tpr_at_1pct_fpr"))]
        cells += [cell(values(row, "identified")), cell(values(row, "forgetting_score"), 3)]
        seconds = values(row, "seconds")
        cells += [
            cell(seconds) if seconds else "—",
            cell(values(row, "x_retrain"), 2) if seconds else "—",
        ]
        grid = [
            s["rows"][row]["grid_seconds"] / s["retrain_seconds"]
            for s in seeds
            if "grid_seconds" in s["rows"][row]
        ]
        cells.append(cell(grid, 2) if grid else "—")
        body.append(cells)
    refs = [s["retrained_references"] for s in seeds]
    body.append(
        ["retrained references (each vs the others)", *["—"] * 7]
        + [cell([r["auc"] for r in refs], 3), cell([r["tpr_at_1pct_fpr"] for r in refs])]
        + [cell([r["identified"] for r in refs]), cell([r["forgetting_score"] for r in refs], 3)]
        + ["—", "—", "—"]
    )
    chosen = {row: ", ".join(str(s["rows"][row]["chosen"]) for s in seeds) for row in GRIDS}
    source = ", ".join(
        filter(None, [f"`{results['config']}`", results["data"], " ".join(results["overrides"])])
    )
    lines = [
        f"{results['description']} ({source}); `{results['arch']}`, {results['epochs']} "
        f"training epochs; {results['references']} reference models per seed; mean ± std over "
        f"{len(seeds)} seed(s). " + measured_on(results),
        "",
        "```",
        results["command"],
        "```",
        "",
        *table(header, body),
        "",
        "Grid points chosen on the validation objective, per seed: "
        + "; ".join(f"{row}: {text}" for row, text in chosen.items())
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    measure_or_render(parse_args(argv), argv, measure, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
