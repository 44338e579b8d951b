"""Scale benchmark of the influence engine (results: BENCHMARKS.md, "Scale").

Measures, on TinyNet at the shape of scikit-learn's digits (8×8, 10 classes, 390,410
parameters; seeded random weights: cost does not depend on training) with a Hessian sample of
digits training images (repeated to reach the larger sizes), in batches of ``--batch-size``:

1. seconds per HVP and peak memory against the Hessian sample size, for the default path
   (``linearize`` with its 1 GiB cache), ``linearize`` with a small cache, and
   forward-over-reverse (no cache); each point in a fresh process;
2. 1 against 2 processes on one sample: one process with one thread, one process with two
   threads, and ``torchrun --nproc_per_node 2`` with one thread per rank (gloo on 127.0.0.1),
   each rank streaming its half of the sample and all-reducing every product.

Peak memory is the process's peak resident set (VmHWM) above its level before the operator was
built (after a one-point warm-up product), i.e. what the Hessian sample's products add.

    .venv/bin/python benchmarks/scale.py          # about 3 minutes on 2 cores

Writes benchmarks/results/scale.json and benchmarks/SCALE.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gifcli import distributed
from gifcli.config import DataConfig
from gifcli.data import load_dataset
from gifcli.influence import CurvatureOperator
from gifcli.models import TinyNet

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.json"
MARKDOWN = HERE / "SCALE.md"
MEMORY_VARIANTS = (  # (column, hvp_mode, linearisation cache budget in bytes)
    ("linearize, 1 GiB cache (default)", "linearize", 1 << 30),
    ("linearize, 64 MiB cache", "linearize", 64 << 20),
    ("forward-over-reverse", "forward-over-reverse", 0),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--sizes", default="512,2048,8192", help="Hessian sample sizes, section 1")
    add("--batch-size", type=int, default=256, help="influence.batch_size")
    add("--products", type=int, default=5, help="timed HVPs per point (the first traces)")
    add("--processes-size", type=int, default=4096, help="Hessian sample size, section 2")
    add("--seed", type=int, default=0)
    add("--output", type=Path, default=RESULTS)
    add("--markdown", type=Path, default=MARKDOWN)
    add("--probe", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- one measurement


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(job: dict) -> None:
    """Child process (or torchrun rank): time ``job['products']`` HVPs, print JSON on rank 0."""
    torch.set_num_threads(job["threads"])
    distributed.init(torch.device("cpu"))
    splits = load_dataset(DataConfig(dataset="digits"), seed=job["seed"])
    torch.manual_seed(job["seed"])
    model = TinyNet(
        in_channels=splits.in_channels, image_size=splits.image_size, num_classes=splits.num_classes
    )
    repeats = -(-job["size"] // len(splits.train))
    x = splits.train.x.repeat(repeats, 1, 1, 1)[: job["size"]]
    y = splits.train.y.repeat(repeats)[: job["size"]]
    mine = distributed.shard(len(x))
    v = torch.randn(
        sum(p.numel() for p in model.parameters()),
        generator=torch.Generator().manual_seed(job["seed"]),
    )
    # One product on one point first, so torch's one-off initialisation is not measured.
    CurvatureOperator(
        model=model, x=x[:1], y=y[:1], batch_size=1, hvp_mode="forward-over-reverse"
    ).matvec(v)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    baseline = _status_kib("VmRSS")
    distributed.barrier()
    started = time.perf_counter()
    operator = CurvatureOperator(
        model=model,
        x=x[mine],
        y=y[mine],
        batch_size=job["batch_size"],
        hvp_mode=job["mode"],
        cache_bytes=job["cache_bytes"],
    )
    seconds = []
    for _ in range(job["products"]):
        clock = time.perf_counter()
        hv = operator.matvec(v)
        seconds.append(time.perf_counter() - clock)
    total = time.perf_counter() - started
    peak = torch.zeros(distributed.world_size(), dtype=torch.float64)
    peak[distributed.rank()] = (_status_kib("VmHWM") - baseline) / 1024
    peak = distributed.all_reduce_sum(peak)
    if distributed.is_main():
        print(
            json.dumps(
                {
                    "first_product_seconds": seconds[0],
                    "seconds_per_hvp": statistics.median(seconds[1:]),
                    "total_seconds": total,
                    "peak_mib": peak.tolist(),
                    "cached_batches": operator.cached_batches,
                    "rank_samples": len(mine),
                    "hv_norm": float(hv.norm()),
                }
            )
        )
    distributed.finish()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_probe(job: dict, *, processes: int = 1) -> dict:
    """Run ``probe`` in a fresh process, or in ``processes`` ranks under torchrun."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    done = subprocess.run(
        [*launcher, __file__, "--probe", json.dumps(job)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"probe failed ({job}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def job_for(
    args: argparse.Namespace,
    *,
    size: int,
    mode: str = "linearize",
    cache_bytes: int = 1 << 30,
    threads: int = 1,
) -> dict:
    return {
        "size": size,
        "mode": mode,
        "cache_bytes": cache_bytes,
        "threads": threads,
        "batch_size": args.batch_size,
        "products": args.products,
        "seed": args.seed,
    }


# --------------------------------------------------------------------------- sections


def bench_sizes(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    out: dict = {}
    for variant, mode, cache in MEMORY_VARIANTS:
        out[variant] = {}
        for size in sizes:
            out[variant][size] = run_probe(job_for(args, size=size, mode=mode, cache_bytes=cache))
            print(
                f"  {variant}, {size} samples: {out[variant][size]['seconds_per_hvp']:.3f} "
                f"s/HVP, {out[variant][size]['peak_mib'][0]:.0f} MiB",
                file=sys.stderr,
            )
    return out


def bench_processes(args: argparse.Namespace) -> dict:
    size = args.processes_size
    runs = {
        "1 process, 1 thread": run_probe(job_for(args, size=size)),
        "1 process, 2 threads": run_probe(job_for(args, size=size, threads=2)),
        "2 processes (torchrun), 1 thread each": run_probe(job_for(args, size=size), processes=2),
    }
    for name, run in runs.items():
        print(f"  {name}: {run['seconds_per_hvp']:.3f} s/HVP", file=sys.stderr)
    return {"size": size, "runs": runs}


# --------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    args, sizes, p = results["args"], results["sizes"], results["processes"]
    products = args["products"]
    lines = [
        "## Scale",
        "",
        "What one Hessian-vector product (HVP) costs as the Hessian sample grows, and what a "
        "second process buys.",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"TinyNet at digits' shape (8×8, 10 classes, {results['params']:,} parameters, "
        "seeded random weights: the cost does not depend on training), a Hessian sample of "
        f"digits training images (repeated past the {results['train_images']:,} there are), "
        f"batches of {args['batch_size']}, float32, CPU. {results['machine']}, shared (load "
        f"average {results['load_average']:.1f} at the start); the run took "
        f"{results['total_seconds'] / 60:.1f} min. Raw results: "
        "`benchmarks/results/scale.json`. Each point runs in a fresh process and times "
        f"{products} products: the first one traces the linearisation and is reported "
        "apart, the median of the others is the steady cost. Peak memory is the peak "
        "resident set above the level before the operator was built.",
        "",
        "### Seconds per HVP and peak memory against the Hessian sample size",
        "",
        "Steady seconds per HVP, peak MiB, batches whose linearisation is cached, and the "
        "first product (with the tracing) in parentheses.",
        "",
        "| Hessian samples | " + " | ".join(sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    counts = sorted({int(n) for runs in sizes.values() for n in runs})
    for n in counts:
        cells = []
        for runs in sizes.values():
            r = runs[str(n)]
            cached = f", {r['cached_batches']} cached" if r["cached_batches"] else ""
            cells.append(
                f"{r['seconds_per_hvp']:.3f} s, {r['peak_mib'][0]:.0f} MiB{cached} "
                f"({r['first_product_seconds']:.2f} s)"
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    small, large = str(counts[0]), str(counts[-1])
    default, capped, plain = (sizes[name] for name, _, _ in MEMORY_VARIANTS)
    batches = (counts[-1] - counts[0]) / args["batch_size"]

    def spread(runs: dict) -> str:
        peaks = [r["peak_mib"][0] for r in runs.values()]
        return f"{min(peaks):.0f}-{max(peaks):.0f}"

    per_batch = (default[large]["peak_mib"][0] - default[small]["peak_mib"][0]) / batches
    lines += [
        "",
        f"- Time grows linearly with the sample on every path: from {small} to {large} "
        f"samples ({counts[-1] // counts[0]}×) the steady cost grows "
        f"{default[large]['seconds_per_hvp'] / default[small]['seconds_per_hvp']:.1f}× "
        "(default), "
        f"{plain[large]['seconds_per_hvp'] / plain[small]['seconds_per_hvp']:.1f}× "
        "(forward-over-reverse). A replayed linearisation is "
        f"{plain[large]['seconds_per_hvp'] / default[large]['seconds_per_hvp']:.1f}× "
        "faster than forward-over-reverse; batches past the cache budget run at the "
        "forward-over-reverse speed.",
        f"- Memory: forward-over-reverse keeps nothing between products and stays flat "
        f"({spread(plain)} MiB for {small}-{large} samples): one batch's passes. The "
        "default path keeps every "
        f"batch's linearisation (about {per_batch:.0f} MiB per batch of "
        f"{args['batch_size']} here) until its 1 GiB budget is spent, so its peak grows "
        f"with the sample up to that budget ({default[large]['peak_mib'][0]:.0f} MiB at "
        f"{large}); with a 64 MiB budget it stays at {spread(capped)} MiB.",
        "",
    ]
    lines += [
        f"### 1 against 2 processes, {p['size']} Hessian samples (default path)",
        "",
        "| run | samples per rank | s / HVP (steady) | first HVP, s (traces) | "
        f"{products} HVPs incl. setup, s | peak MiB per rank |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in p["runs"].items():
        peaks = " / ".join(f"{m:.0f}" for m in r["peak_mib"])
        lines.append(
            f"| {name} | {r['rank_samples']} | {r['seconds_per_hvp']:.3f} | "
            f"{r['first_product_seconds']:.2f} | {r['total_seconds']:.2f} | {peaks} |"
        )
    one, threads, two = p["runs"].values()
    norms = [r["hv_norm"] for r in p["runs"].values()]
    lines += [
        "",
        "Two processes ran a product "
        f"{one['seconds_per_hvp'] / two['seconds_per_hvp']:.2f}× as fast as one process "
        "with one thread and "
        f"{threads['seconds_per_hvp'] / two['seconds_per_hvp']:.2f}× as fast as one process "
        "with both threads, on the same two cores. Each rank traces and caches only its "
        f"half of the sample (first product {one['first_product_seconds']:.2f} → "
        f"{two['first_product_seconds']:.2f} s, peak {one['peak_mib'][0]:.0f} → "
        f"{max(two['peak_mib']):.0f} MiB per rank); their times include the all-reduce "
        f"of the {results['params']:,}-float product. These are two processes on one "
        "shared 2-core machine; what more ranks buy depends on the cores or GPUs behind "
        "them. ‖Hv‖ is the same in the three runs to "
        f"{max(norms) / min(norms) - 1:.1e} (relative).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe:
        probe(json.loads(args.probe))
        return
    started = time.perf_counter()
    results: dict = {
        "command": " ".join([".venv/bin/python benchmarks/scale.py", *(argv or sys.argv[1:])]),
        "args": {k: v for k, v in vars(args).items() if k not in ("output", "markdown", "probe")},
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, Python "
        f"{platform.python_version()}",
        "params": sum(
            p.numel()
            for p in TinyNet(in_channels=1, image_size=(8, 8), num_classes=10).parameters()
        ),
        "train_images": len(load_dataset(DataConfig(dataset="digits"), seed=args.seed).train),
        "load_average": os.getloadavg()[0],
    }
    print("1. sample sizes", file=sys.stderr)
    results["sizes"] = bench_sizes(args)
    print("2. processes", file=sys.stderr)
    results["processes"] = bench_processes(args)
    results["total_seconds"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(json.loads(args.output.read_text()))
    args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
