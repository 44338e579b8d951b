"""Data-scale benchmark: peak memory and wall time of ``gif remove-class`` on image folders of
growing size (results: BENCHMARKS.md, "Data scale").

Generates, in a temporary folder (removed afterwards), an image folder of 10 classes of 64×64
RGB PNGs (each class a colour gradient of its own plus noise): ``--sizes`` training images and
a test split of ``--test-size`` images shared by every size (the smaller training folders link
to the first images of each class of the largest). For each size, in fresh processes:

1. ``gif train`` (TinyNet, ``--epochs`` epochs) trains the base model;
2. ``gif remove-class`` removes class 0, its peak resident set read from the process's own
   ``rusage`` (``os.wait4``: ``ru_maxrss``, the peak of that process alone) and its wall time
   measured around it; the stage times come from its report.

Every size uses the same settings, so only what must grow with the data set grows: the
validation split is ``--val-size`` images (``data.val_fraction = val-size / n``), the
``*_train`` metrics a seeded sample of ``--train-samples`` (``metrics.train_samples``), the
Hessian sample ``--hessian-samples`` (its linearisation cache ``--cache-mb``); the removal
set (a tenth of the training images) and the listing of the folder grow with n. One intra-op
thread, no decoding workers.

    .venv/bin/python benchmarks/data_scale.py        # about 18 minutes on 2 shared cores

Writes benchmarks/results/data_scale.json (and prints a summary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "data_scale.json"
CLASSES = 10
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--sizes", default="5000,20000,80000", help="training images per folder")
    add("--test-size", type=int, default=1000, help="test images (every size)")
    add("--image-size", type=int, default=64, help="side of the square images")
    add("--val-size", type=int, default=500, help="validation images (every size)")
    add("--train-samples", type=int, default=4000, help="metrics.train_samples")
    add("--hessian-samples", type=int, default=256, help="influence.hessian_samples")
    add("--max-iter", type=int, default=5, help="influence.max_iter")
    add("--grid-points", type=int, default=12, help="update.grid_points")
    add("--cache-mb", type=int, default=256, help="influence.cache_mb (linearisation cache)")
    add("--epochs", type=int, default=1, help="train.epochs of the base model")
    add("--batch-size", type=int, default=128, help="train.batch_size and influence.batch_size")
    add("--lr", type=float, default=0.01, help="train.lr")
    add("--seed", type=int, default=0)
    add("--output", type=Path, default=RESULTS, help="results file")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the image folder


def class_image(label: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """A 64×64×3 uint8 image of class ``label``: a colour gradient whose direction and hue
    belong to the class, plus uniform noise."""
    angle = 2 * np.pi * label / CLASSES
    ys, xs = np.mgrid[0:side, 0:side] / side
    ramp = np.cos(angle) * xs + np.sin(angle) * ys
    hue = np.array([np.cos(angle), np.cos(angle + 2.1), np.cos(angle + 4.2)])
    image = 128 + 90 * ramp[..., None] * hue + rng.uniform(-40, 40, size=(side, side, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(folder: Path, per_class: int, *, side: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in range(CLASSES):
        target = folder / f"class{label}"
        target.mkdir(parents=True)
        for index in range(per_class):
            image = Image.fromarray(class_image(label, rng, side), mode="RGB")
            image.save(target / f"{index:06d}.png", compress_level=1)


def link_subset(source: Path, target: Path, per_class: int) -> None:
    """``target/classK`` holding links to the first ``per_class`` images of ``source/classK``."""
    for label in range(CLASSES):
        (target / f"class{label}").mkdir(parents=True)
        for index in range(per_class):
            name = f"class{label}/{index:06d}.png"
            os.link(source / name, target / name)


# --------------------------------------------------------------------------- measured runs


def measured(args: list[str]) -> dict:
    """Run ``python -m gifcli ARGS`` with one thread; its peak RSS (MiB), wall time, exit."""
    env = {**os.environ, **THREADS, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gifcli", *args], env=env, stdout=subprocess.PIPE, stderr=stderr
        )
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
        seconds = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            stderr.seek(0)
            message = stderr.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"gif {' '.join(args)} exited {code}: {message}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": seconds, "stdout": stdout}


def floor_rss() -> float:
    """Peak RSS (MiB) of a process that only imports what an edit imports."""
    code = "import torch, torchvision, sklearn.svm, PIL.Image, gifcli.runs, gifcli.cli.main"
    process = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, **THREADS, "PYTHONPATH": str(ROOT)}
    )
    _, _, usage = os.wait4(process.pid, 0)
    return usage.ru_maxrss / 1024


def write_config(path: Path, root: Path, n: int, options: argparse.Namespace) -> None:
    path.write_text(
        f"seed: {options.seed}\n"
        "device: cpu\n"
        "model: {arch: tinynet, num_classes: 10}\n"
        f"data: {{dataset: imagefolder, root: {root}, val_fraction: {options.val_size / n}, "
        "mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}\n"
        "removal: {classes: [0]}\n"
        f"influence: {{hessian_samples: {options.hessian_samples}, max_iter: {options.max_iter}, "
        f"batch_size: {options.batch_size}, cache_mb: {options.cache_mb}}}\n"
        f"update: {{grid_points: {options.grid_points}}}\n"
        f"train: {{epochs: {options.epochs}, batch_size: {options.batch_size}, lr: {options.lr}}}\n"
        f"metrics: {{train_samples: {options.train_samples}}}\n"
        f"output: {{dir: {path.parent / 'edit'}}}\n"
    )


def run_size(work: Path, images: Path, n: int, options: argparse.Namespace) -> dict:
    folder = work / f"n{n}"
    root = folder / "data"
    link_subset(images / "train", root / "train", n // CLASSES)
    os.symlink(images / "test", root / "test")
    config = folder / "config.yaml"
    write_config(config, root, n, options)
    checkpoint = folder / "base.safetensors"
    trained = measured(["train", str(config), "-o", str(checkpoint)])
    edited = measured(["remove-class", str(config), f"checkpoint={checkpoint}", "--json"])
    report = json.loads(edited.pop("stdout"))
    trained.pop("stdout")
    return {
        "n_train_images": n,
        "train_samples": report["removal"]["train_samples"],
        "removal_samples": report["removal"]["samples"],
        "hessian_samples": report["removal"]["hessian_samples"],
        "metrics_train_samples": report["metrics"]["train_samples"],
        "edit": {**edited, "timing": report["timing"]},
        "train": trained,
        "after": {k: report["metrics"]["after"][k] for k in ("forget_acc_test", "retain_acc_test")},
        "before": {
            k: report["metrics"]["before"][k] for k in ("forget_acc_test", "retain_acc_test")
        },
    }


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (results name no machine)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    sizes = sorted(int(s) for s in options.sizes.split(","))
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gif-data-scale-"))
    try:
        images = work / "images"
        clock = time.perf_counter()
        write_images(images / "train", sizes[-1] // CLASSES, side=options.image_size, seed=1)
        write_images(images / "test", options.test_size // CLASSES, side=options.image_size, seed=2)
        generated = time.perf_counter() - clock
        print(f"generated {sizes[-1] + options.test_size} images in {generated:.0f} s", flush=True)
        runs = []
        for n in sizes:
            runs.append(run_size(work, images, n, options))
            edit = runs[-1]["edit"]
            print(
                f"n={n}: edit peak {edit['peak_rss_mib']:.0f} MiB, {edit['seconds']:.1f} s; "
                f"train {runs[-1]['train']['seconds']:.1f} s",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    smallest, largest = runs[0]["edit"]["peak_rss_mib"], runs[-1]["edit"]["peak_rss_mib"]
    result = {
        "settings": {**vars(options), "output": _shown(options.output)},
        "machine": {
            "python": platform.python_version(),
            "torch": __import__("torch").__version__,
            "cpus": os.cpu_count(),
            "threads": 1,
            "load_average_start": os.getloadavg()[0],
        },
        "import_floor_rss_mib": floor_rss(),
        "generate_seconds": generated,
        "runs": runs,
        "peak_ratio_largest_to_smallest": largest / smallest,
        "total_seconds": time.perf_counter() - started,
    }
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"peak RSS ratio {sizes[-1]} / {sizes[0]}: {largest / smallest:.2f}; wrote {options.output}"
    )


if __name__ == "__main__":
    main()
