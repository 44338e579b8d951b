"""Several processes under torch.distributed (gloo on CPU) give the one-process result.

- rank helpers, ``shard`` and device resolution read the torchrun environment;
- two spawned ranks holding halves of a sample reproduce the full-sample HVP, removal gradient
  and selection (float64, to rounding);
- ``torchrun --nproc_per_node 2 gif remove-class`` equals one process to 1e-5 relative (same
  mask, step scale, update norm, changed parameters, saved tensors), rank 0 alone writing and
  printing; an input error stops both ranks with the message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gifcli import distributed
from gifcli.config import load_config
from gifcli.device import resolve_device
from gifcli.errors import GifError
from gifcli.influence import CurvatureOperator, removal_gradient
from gifcli.report import OUTPUT_FILES
from gifcli.runs import run_edit
from gifcli.selection import select_targets
from gifcli.tasks import RemoveClass
from gifcli.train import run_train
from tests.conftest import DIGITS, ROOT

TORCHRUN_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "GROUP_RANK",
)
SMALL = [
    "influence.hessian_samples=256",
    "influence.batch_size=64",
    "influence.max_iter=5",
    "update.grid_points=8",
    "device=cpu",
]
"""A small, fast remove-class run: each of 2 ranks streams 2 batches of its 128 points."""

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(monkeypatch, rank: int, world: int) -> None:
    """The environment torchrun gives rank ``rank`` of ``world`` (one machine)."""
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank)):
        monkeypatch.setenv(name, str(value))


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(a)


# --------------------------------------------------------------------------- environment


def test_one_process_is_rank_zero_of_one_and_reduces_nothing(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    t = torch.arange(3.0)
    distributed.init(torch.device("cpu"))
    assert not distributed.launched() and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_reduce_sum(t) is t
    assert torch.equal(distributed.shard(5), torch.arange(5))
    distributed.barrier()  # no group, no wait


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("count", [4, 10, 11, 257])
def test_shards_are_contiguous_balanced_and_cover_the_sample_once(monkeypatch, world, count):
    shards = []
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        shards.append(distributed.shard(count))
    assert torch.equal(torch.cat(shards), torch.arange(count))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_fewer_points_than_ranks_are_held_by_every_rank(monkeypatch):
    for rank in range(4):
        as_rank(monkeypatch, rank, 4)
        assert torch.equal(distributed.shard(3), torch.arange(3))
    assert not distributed.is_main()


def test_auto_falls_back_to_cpu_and_cuda_without_cuda_is_an_error(monkeypatch):
    as_rank(monkeypatch, 1, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(GifError, match="CUDA is not available"):
        resolve_device("cuda")


def test_each_torchrun_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    as_rank(monkeypatch, 1, 2)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(GifError, match="names one GPU"):
        resolve_device("cuda:0")
    as_rank(monkeypatch, 2, 3)
    with pytest.raises(GifError, match="--nproc_per_node"):
        resolve_device("cuda")


# --------------------------------------------------------------------------- two gloo ranks


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()
    x, y = torch.randn(37, 6, dtype=torch.float64), torch.randint(0, 4, (37,))
    return model, x, y


def _engine(x: torch.Tensor, y: torch.Tensor, model: nn.Module, *, m: int) -> dict:
    """HVP, removal gradient and unit statistics of ``(x, y)``; ``m`` the whole set's size."""
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    hv = CurvatureOperator(
        model=model, x=x, y=y, batch_size=5, hvp_mode="forward-over-reverse"
    ).matvec(v)
    g = removal_gradient(model, removal_x=x, removal_y=y, n_train=100, batch_size=4, removal_size=m)
    selection = select_targets(
        model,
        x,
        y,
        method="top-gradients",
        ratio=0.3,
        batch_size=3,
        reduce=distributed.all_reduce_sum,
    )
    return {"hv": hv, "g": g, "mask": selection.mask}


def _gloo_rank(rank: int, world: int, port: int, out: str) -> None:
    """One spawned rank: join the group from torchrun's variables, compute on its shard."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    model, x, y = _problem()
    mine = distributed.shard(len(x))
    result = _engine(x[mine], y[mine], model, m=len(x))
    result["shard"] = len(mine)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    distributed.finish()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_ranks_reproduce_the_one_process_engine(tmp_path):
    torch.multiprocessing.spawn(_gloo_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model, x, y = _problem()
    single = _engine(x, y, model, m=len(x))
    assert [r["shard"] for r in ranks] == [19, 18]
    for key in ("hv", "g"):
        assert torch.equal(ranks[0][key], ranks[1][key])  # every rank holds the same result
        torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-12, atol=1e-14)
    for name, mask in single["mask"].items():
        assert torch.equal(ranks[0]["mask"][name], mask), name


# --------------------------------------------------------------------------- torchrun gif


def torchrun(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 gif ARGS...`` on 127.0.0.1, one thread per rank."""
    gif = shutil.which("gif", path=str(Path(sys.executable).parent)) or shutil.which("gif")
    if gif is None:
        pytest.skip("the gif console script is not installed")
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="120")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        gif,
        *map(str, args),
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory) -> Path:
    """TinyNet trained 4 epochs on digits (about 80% test accuracy, a few seconds)."""
    path = tmp_path_factory.mktemp("distributed") / "base.safetensors"
    config = load_config(DIGITS, [f"checkpoint={path}", "train.epochs=4", "device=cpu"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train(config=config, output=path, retrain=False, force=False)
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, quick_base):
    one, two = tmp_path / "one", tmp_path / "two"
    overrides = [f"checkpoint={quick_base}", *SMALL]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_edit(
            config=load_config(DIGITS, [*overrides, f"output.dir={one}"]), command=RemoveClass.name
        )
    finally:
        torch.set_num_threads(threads)

    done = torchrun("remove-class", DIGITS, *overrides, f"output.dir={two}", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)  # one report on stdout: rank 0's
    assert sorted(p.name for p in two.iterdir()) == sorted(OUTPUT_FILES.values())

    a, b = (json.loads((out / "report.json").read_text()) for out in (one, two))
    assert printed["update"]["scale"] == b["update"]["scale"]
    assert b["removal"]["hessian_samples"] == 256 and b["removal"]["samples"] == 131
    assert relative(a["update"]["scale"], b["update"]["scale"]) < 1e-5
    assert relative(a["update"]["norm"], b["update"]["norm"]) < 1e-5
    assert a["params"]["changed"] == b["params"]["changed"] > 0
    assert a["solver"]["hvps"] == b["solver"]["hvps"]
    mask_a, mask_b = (load_file(out / "mask.safetensors") for out in (one, two))
    assert all(torch.equal(mask_a[name], mask_b[name]) for name in mask_a)
    model_a, model_b = (load_file(out / "model.safetensors") for out in (one, two))
    assert model_a.keys() == model_b.keys()
    for name, tensor in model_a.items():
        error = float((tensor.double() - model_b[name].double()).norm() / tensor.double().norm())
        assert error < 1e-5, name


@pytest.mark.slow
@pytest.mark.distributed
def test_an_input_error_stops_every_rank_with_its_message(tmp_path, quick_base):
    done = torchrun(
        "remove-class",
        DIGITS,
        f"checkpoint={quick_base}",
        *SMALL,
        "selection.include=[no_such_layer]",
        f"output.dir={tmp_path / 'out'}",
        timeout=90,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    # Rank 0 says what is wrong (the others do too, unless torchrun stopped them first).
    assert "error: selection.include: pattern 'no_such_layer'" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_when_rank_0_alone_stops_the_other_rank_says_so_in_one_line(tmp_path, quick_base):
    """Rank 0, stopped while it writes, exits on its own; rank 1, waiting for it at the final
    barrier, reports the lost peer in one line instead of gloo's traceback."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="200")
    out, logs = tmp_path / "out", tmp_path / "logs"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--log-dir",
        str(logs),
        "--redirects",
        "3",  # each rank's stdout and stderr into its own file
        str(ROOT / "tests" / "paused_gif.py"),  # gif, stopped once every file is staged
        "staged",
        "remove-class",
        str(DIGITS),
        f"checkpoint={quick_base}",
        *SMALL,
        f"output.dir={out}",
        "--quiet",
    ]
    launcher = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def stderr_of(rank: int) -> str:
        files = list(logs.glob(f"*/attempt_0/{rank}/stderr.log"))
        return files[0].read_text() if files else ""

    try:
        deadline = time.monotonic() + 90
        while "paused at staged" not in stderr_of(0) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "paused at staged" in stderr_of(0), stderr_of(0)
        time.sleep(2)  # rank 1 reaches the final barrier
        os.kill(int((tmp_path / "out.lock").read_text()), signal.SIGTERM)
        launcher.wait(timeout=90)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    assert stderr_of(0).endswith("interrupted: nothing was written\n"), stderr_of(0)
    other = stderr_of(1)
    assert "Traceback" not in other, other
    if other:  # unless torchrun stopped rank 1 first
        assert other == (
            "error (rank 1): another rank stopped (Connection closed by peer); its own message "
            "says why\n"
        )
    assert not out.exists()


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@needs_cuda
def test_cuda_edit_matches_cpu_and_writes_cpu_tensors(tmp_path, quick_base):
    reports = {}
    for device in ("cpu", "cuda"):
        config = load_config(
            DIGITS,
            [
                f"checkpoint={quick_base}",
                *SMALL,
                f"device={device}",
                f"output.dir={tmp_path / device}",
            ],
        )
        reports[device] = run_edit(config=config, command=RemoveClass.name)
    cpu, cuda = reports["cpu"], reports["cuda"]
    # Not to rounding: cuDNN may run the convolutions in TF32.
    assert relative(cpu["update"]["raw_norm"], cuda["update"]["raw_norm"]) < 0.05
    assert cpu["selection"]["targets"] == cuda["selection"]["targets"]
    mask_cpu, mask_cuda = (load_file(tmp_path / d / "mask.safetensors") for d in reports)
    agree = sum(int((mask_cpu[n] & mask_cuda[n]).sum()) for n in mask_cpu)
    assert agree >= 0.95 * cpu["selection"]["targets"]
    saved = load_file(tmp_path / "cuda" / "model.safetensors")
    assert saved.keys() == load_file(quick_base).keys()
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in saved.values())
