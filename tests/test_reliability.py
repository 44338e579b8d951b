"""Hostile and faulty inputs through the CLI, and runs that are interrupted, killed, out of
disk or concurrent.

Every bad input exits 1 (2 for the command line) with its own message: never a traceback,
never the internal-error line, nothing written, the inputs unchanged. An interrupted or killed
edit leaves the complete old or the complete new output set (the next run cleans up after a
kill); a second run on the same folder fails at once; the same command twice writes the same
bytes, except the report's timing fields.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gifcli.checkpoint import checkpoint_metadata, save_checkpoint
from gifcli.cli.main import app
from gifcli.config import ModelConfig
from gifcli.models import build_model
from tests.conftest import DIGITS, DIGITS_BACKDOOR, DIGITS_SAMPLES, ROOT, png_claiming

FAST = [
    "influence.max_iter=2",
    "influence.hessian_samples=64",
    "update.grid_points=4",
    "device=cpu",
]
"""A remove-class edit of about a second on digits."""
TIMING = ("cost", ("solver", "seconds"))
"""The fields of report.json that differ between two runs of one command."""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """An untrained TinyNet for digits: enough for every input check and for a fast edit. It
    records its config and weight decay as `gif train` does (no note about a foreign file)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(), in_channels=1, image_size=(8, 8))
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    metadata = checkpoint_metadata(task="train", config_yaml=DIGITS.read_text(), weight_decay=0.0)
    save_checkpoint(path, model.state_dict(), metadata)
    return path


def invoke(*args, env=None):
    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", **(env or {})})
    return runner.invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (links not followed) with its content's sha256."""
    found = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                found[key] = "folder"
            elif not path.is_file():
                found[key] = "not a regular file"  # a FIFO: reading it would block
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# ----------------------------------------------------------------------- hostile inputs


def _state(base: Path, change) -> dict:
    from safetensors.torch import load_file

    state = load_file(base)
    change(state)
    return state


def _checkpoint(tmp: Path, base: Path, name: str, change) -> Path:
    path = tmp / name
    save_checkpoint(path, _state(base, change), {})
    return path


def _scaled(value: float):
    return lambda state: [t.fill_(value) for k, t in state.items() if k.endswith("weight")]


def _npz(tmp: Path, **labels) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (20, 8, 8), dtype=np.uint8),
        "y_train": np.arange(20) % 10,
        "x_test": rng.integers(0, 256, (10, 8, 8), dtype=np.uint8),
        "y_test": np.arange(10),
    }
    arrays.update(labels)
    path = tmp / "data.npz"
    np.savez(path, **arrays)
    return path


def _write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _alias_bomb(tmp: Path) -> Path:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * 20) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 20) + "]" for i in range(1, 4)]
    return _write(tmp, "bomb.yaml", "\n".join(lines) + "\nremoval: {classes: *l3}\n")


def _outputs_with(tmp: Path, replaced: dict[str, str]) -> Path:
    """An output folder holding a previous set, some entries replaced by a folder or a
    dangling link."""
    out = tmp / "out"
    out.mkdir()
    for name in ("model.safetensors", "mask.safetensors", "report.json", "config.yaml"):
        (out / name).write_text("previous")
    for name, kind in replaced.items():
        (out / name).unlink()
        if kind == "folder":
            (out / name).mkdir()
        else:
            (out / name).symlink_to(tmp / "nowhere")
    return out


CASES: dict[str, tuple] = {}


def case(name: str, code: int, message: str):
    """Register ``make(tmp, base) -> command line`` as a hostile input: ``code`` and a
    fragment of the ``message`` it must give."""

    def register(make):
        CASES[name] = (make, code, message)
        return make

    return register


def edit(tmp: Path, base: Path, *extra, config=DIGITS, command="remove-class") -> list:
    """A fast edit of ``base`` into ``tmp/out``."""
    return edit_into(tmp / "out", base, *extra, config=config, command=command)


def edit_into(out: Path, base: Path, *extra, config=DIGITS, command="remove-class") -> list:
    return [command, config, f"checkpoint={base}", *FAST, f"output.dir={out}", *extra]


def evaluate(base: Path, *extra, config=DIGITS) -> list:
    return ["evaluate", config, *extra, "-c", base]


# memory blow-ups from tiny files


@case("yaml alias bomb", 1, "YAML aliases (*name) repeat more than 100,000 values")
def _(tmp, base):
    return ["evaluate", _alias_bomb(tmp), "-c", base]


@case("npz label 10**12", 1, "y_train holds the label 1000000000000")
def _(tmp, base):
    path = _npz(tmp, y_train=np.array([*range(10)] * 2)[:-1].tolist() + [10**12])
    return evaluate(base, "data.dataset=tensors", f"data.path={path}")


@case("model.num_classes=10**12", 1, "model.num_classes: must be in 2..100000")
def _(tmp, base):
    return evaluate(base, f"model.num_classes={10**12}")


@case("model.in_channels=10**6", 1, "model.in_channels: must be in 1..4096")
def _(tmp, base):
    return evaluate(base, f"model.in_channels={10**6}")


# tracebacks


@case("nan checkpoint to evaluate", 1, "holds NaN or infinite values")
def _(tmp, base):
    return evaluate(_checkpoint(tmp, base, "nan.safetensors", _scaled(np.nan)))


@case("inf checkpoint to evaluate", 1, "holds NaN or infinite values")
def _(tmp, base):
    return evaluate(_checkpoint(tmp, base, "inf.safetensors", _scaled(np.inf)))


@case("1e30 checkpoint to evaluate", 1, "outputs on the test images are NaN or infinite")
def _(tmp, base):
    return evaluate(_checkpoint(tmp, base, "huge.safetensors", _scaled(1e30)))


@case("nan checkpoint as oracle", 1, "holds NaN or infinite values")
def _(tmp, base):
    return edit(tmp, base, "--oracle", _checkpoint(tmp, base, "o.safetensors", _scaled(np.nan)))


@case("1e30 checkpoint as oracle", 1, "outputs on the test images are NaN or infinite")
def _(tmp, base):
    return edit(tmp, base, "--oracle", _checkpoint(tmp, base, "o.safetensors", _scaled(1e30)))


for _key in ("update.scale=.nan", "update.scale=.inf", "update.grid_max=.inf"):
    case(_key, 1, f"{_key.split('=')[0]}: must be a finite number")(
        lambda tmp, base, key=_key: edit(tmp, base, key)
    )


@case("seed=-1", 1, "seed: must be in 0..4294967295, got -1")
def _(tmp, base):
    return edit(tmp, base, "seed=-1")


@case("seed=2**64", 1, "seed: 18446744073709551616 is out of range")
def _(tmp, base):
    return edit(tmp, base, f"seed={2**64}")


@case("npz labels as strings", 1, "y_train has dtype <U1")
def _(tmp, base):
    path = _npz(tmp, y_train=np.array([str(k % 10) for k in range(20)]))
    return evaluate(base, "data.dataset=tensors", f"data.path={path}")


@case("npz labels as uint64", 1, "y_test holds the label 18446744073709551615")
def _(tmp, base):
    path = _npz(tmp, y_test=np.array([*range(9), 2**64 - 1], dtype=np.uint64))
    return evaluate(base, "data.dataset=tensors", f"data.path={path}")


@case("poison json 40,000 deep", 1, "deep.json: JSON nested too deeply")
def _(tmp, base):
    listing = _write(tmp, "deep.json", "[" * 40_000 + "]" * 40_000)  # within the size bound
    return edit(
        tmp,
        base,
        f"removal.poison_indices={listing}",
        config=DIGITS_BACKDOOR,
        command="recover-backdoor",
    )


@case("poison json 5000-digit integer", 1, "big.json: cannot read the JSON")
def _(tmp, base):
    listing = _write(tmp, "big.json", "[1" + "0" * 5000 + "]")
    return edit(
        tmp,
        base,
        f"removal.poison_indices={listing}",
        config=DIGITS_BACKDOOR,
        command="recover-backdoor",
    )


@case("blend image header 30000x30000", 1, "huge.png: the blend image is larger than")
def _(tmp, base):
    image = png_claiming(tmp / "huge.png", 30000, 30000)
    return evaluate(
        base, "data.poison.trigger=blend", f"data.poison.image={image}", config=DIGITS_BACKDOOR
    )


@case("model.safetensors is a folder, --force", 1, "model.safetensors: not an output gif")
def _(tmp, base):
    _outputs_with(tmp, {"model.safetensors": "folder"})
    return edit(tmp, base, "--force")


@case("report.json is a folder", 1, "already exists; pass --force")
def _(tmp, base):
    _outputs_with(tmp, {"report.json": "folder"})
    return edit(tmp, base)


@case("mask.safetensors is a folder, --force", 1, "mask.safetensors: not an output gif")
def _(tmp, base):
    _outputs_with(tmp, {"mask.safetensors": "folder"})
    return edit(tmp, base, "--force")


# late or missing validation


@case("bad oracle", 1, "o.safetensors: checkpoint does not fit model.arch")
def _(tmp, base):
    oracle = _checkpoint(tmp, base, "o.safetensors", lambda s: s.pop("classifier.bias"))
    return edit(tmp, base, "--oracle", oracle)


@case("train.lr=.nan", 1, "train.lr: must be a finite number, got nan")
def _(tmp, base):
    return ["train", DIGITS, "train.lr=.nan", "-o", tmp / "m.safetensors"]


@case("train.lr=1.0e+10 diverges", 1, "train.lr: training diverged")
def _(tmp, base):
    return ["train", DIGITS, "train.lr=1.0e+10", "train.epochs=1", "-o", tmp / "m.safetensors"]


@case("influence.tol=.nan", 1, "influence.tol: must be a finite number")
def _(tmp, base):
    return edit(tmp, base, "influence.tol=.nan")


@case("int checkpoint", 1, "is int64 but the model's is float32")
def _(tmp, base):
    ints = _checkpoint(
        tmp, base, "int.safetensors", lambda s: s.update({k: v.long() for k, v in s.items()})
    )
    return evaluate(ints)


@case("bool checkpoint", 1, "is bool but the model's is float32")
def _(tmp, base):
    bools = _checkpoint(
        tmp, base, "bool.safetensors", lambda s: s.update({k: v > 0 for k, v in s.items()})
    )
    return evaluate(bools)


@case("dangling link among the outputs", 1, "already exists; pass --force")
def _(tmp, base):
    _outputs_with(tmp, {"report.json": "link"})
    return edit(tmp, base)


@case("dangling link at the train output", 1, "m.safetensors: already exists; pass --force")
def _(tmp, base):
    (tmp / "m.safetensors").symlink_to(tmp / "nowhere")
    return ["train", DIGITS, "-o", tmp / "m.safetensors"]


@case("output.dir is a link", 1, "output.dir is a symbolic link")
def _(tmp, base):
    (tmp / "real").mkdir()
    (tmp / "out").symlink_to(tmp / "real", target_is_directory=True)
    return edit(tmp, base, "--force")


@case("train output is a folder", 1, "m.safetensors: is a folder")
def _(tmp, base):
    (tmp / "m.safetensors").mkdir()
    return ["train", DIGITS, "-o", tmp / "m.safetensors", "--force"]


@case("update.scale=1.0e+300", 1, "update.scale: the edited parameters overflow")
def _(tmp, base):
    return edit(tmp, base, "update.scale=1.0e+300")


@case("update.scale=1.0e+20", 1, "update.scale: the edited model's outputs on the test images")
def _(tmp, base):
    return edit(tmp, base, "update.scale=1.0e+20")


@case("evaluate: no training sample of the class", 1, "removal.classes: class 3 has no samples")
def _(tmp, base):
    path = _npz(tmp, y_train=np.array([4 if k % 10 == 3 else k % 10 for k in range(20)]))
    return evaluate(base, "data.dataset=tensors", f"data.path={path}", "--json")


@case("all-false mask", 1, "none.safetensors: the mask selects no parameter")
def _(tmp, base):
    from gifcli.selection import save_mask

    model = build_model(ModelConfig(), in_channels=1, image_size=(8, 8))
    mask = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    save_mask(tmp / "none.safetensors", mask)
    return edit(tmp, base, "--mask", tmp / "none.safetensors")


# config numbers: every key has a range, checked before torch is imported, naming the override

for _override, _message in [
    ("train.momentum=-1", "train.momentum: must be in [0, 1], got -1"),
    ("train.weight_decay=-1", "train.weight_decay: must be in [0, 1], got -1"),
    ("influence.damping=1.0e+200", "influence.damping: must be in [0, 1e10], got 1e+200"),
    (f"influence.batch_size={2**63 - 1}", "influence.batch_size: must be in 1..1000000000, got"),
    ("influence.damping_points=100000000", "influence.damping_points: must be in 1..64, got"),
    (
        f"removal.synthetic_samples={2**63 - 1}",
        "removal.synthetic_samples: must be in 1..1000000000",
    ),
    ("data.std=[1.0e-300]", "data.std[0]: must be in [1e-6, 1e6], got 1e-300"),
    ("selection.ratio=0.1 selection.ratio=2", "(from the override 'selection.ratio=2')"),
]:
    case(_override, 1, _message)(
        lambda tmp, base, overrides=_override.split(): edit(
            tmp, base, "influence.damping=auto", *overrides
        )
    )


@case("removal.random.seed=-1", 1, "removal.random.seed: must be in 0..4294967295, got -1")
def _(tmp, base):
    return edit(
        tmp, base, "removal.random.seed=-1", config=DIGITS_SAMPLES, command="remove-samples"
    )


@case("train.momentum=-1 (train)", 1, "train.momentum: must be in [0, 1], got -1")
def _(tmp, base):
    return ["train", DIGITS, "train.momentum=-1", "-o", tmp / "m.safetensors"]


@case("--class 11 after removal.classes=[3]", 1, "(from the override 'removal.classes=[11]')")
def _(tmp, base):
    return edit(tmp, base, "removal.classes=[3]", "--class", "11")


@case("a list of 300,000 classes is echoed cut short", 1, "removal.classes=[3, 3, 3")
def _(tmp, base):
    return edit(tmp, base, "removal.classes=[" + "3, " * 300_000 + "3]")


@case("override without =", 2, "override 'seed': expected KEY=VALUE")
def _(tmp, base):
    return evaluate(base, "seed")


SLOW_CASES = {"a list of 300,000 classes is echoed cut short"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow if n in SLOW_CASES else ()) for n in CASES],
    ids=list(CASES),
)
def test_a_hostile_input_is_one_clear_message_and_writes_nothing(tmp_path, base, name):
    make, code, message = CASES[name]
    shutil.copy(base, tmp_path / "base.safetensors")
    base = tmp_path / "base.safetensors"
    args = make(tmp_path, base)
    before = tree(tmp_path)
    started = time.perf_counter()
    result = invoke(*args)
    output = result.output
    assert result.exit_code == code, output
    assert message in output, output
    assert output.startswith("error:"), output
    assert all(line.startswith("  - ") for line in output.strip().splitlines()[1:]), output
    assert "Traceback" not in output and "internal error" not in output, output
    assert tree(tmp_path) == before, "nothing written, no input changed"
    assert time.perf_counter() - started < 30, "refused before the expensive steps"
    assert len(output) < 2000, "values are echoed cut short"


def test_the_oracle_is_checked_before_the_edit(tmp_path, base, monkeypatch):
    def no_edit(*args, **kwargs):
        raise AssertionError("the edit ran before the oracle was checked")

    monkeypatch.setattr("gifcli.runs.edit", no_edit)
    oracle = _checkpoint(tmp_path, base, "o.safetensors", _scaled(np.inf))
    result = invoke(*edit(tmp_path, base, "--oracle", oracle))
    assert result.exit_code == 1, result.output
    assert "o.safetensors: tensor 'features.0.weight' holds NaN or infinite" in result.output


def test_an_unforeseen_exception_is_one_line_and_gif_debug_shows_it(base, monkeypatch):
    def broken(**kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr("gifcli.runs.run_evaluate", broken)  # imported by the command as it runs
    result = invoke(*evaluate(base))
    assert result.exit_code == 1
    assert result.output == (
        "error: internal error (ZeroDivisionError): division by zero second line; rerun with "
        "GIF_DEBUG=1 for the traceback\n"
    )
    debug = invoke(*evaluate(base), env={"GIF_DEBUG": "1"})
    assert isinstance(debug.exception, ZeroDivisionError)


def test_a_library_warning_is_one_plain_note(base, monkeypatch):
    import warnings

    from gifcli.errors import GifError

    def warns(**kwargs):
        warnings.warn(
            "The given NumPy array is not writable,\n and so on", UserWarning, stacklevel=1
        )
        raise GifError("stopped here")

    monkeypatch.setattr("gifcli.runs.run_evaluate", warns)
    result = invoke(*evaluate(base))
    assert result.output == (
        "note: UserWarning: The given NumPy array is not writable, and so on\nerror: stopped here\n"
    )


def test_a_lost_torchrun_peer_is_named_not_an_internal_error(monkeypatch):
    from gifcli.cli.failures import unexpected_error_line

    monkeypatch.setenv("WORLD_SIZE", "2")
    closed = RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:4242. This is")
    assert unexpected_error_line(closed) == (
        "another rank stopped (Connection closed by peer); its own message says why"
    )
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert unexpected_error_line(closed).startswith("internal error (RuntimeError)")


def test_ctrl_c_during_start_up_is_one_line():
    code = (
        "import os, signal, gifcli.cli\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "import time; time.sleep(10)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert done.returncode == 130
    assert done.stderr == "interrupted: during start-up; nothing was written\n"
    import gifcli.cli.main  # noqa: F401  (every command imported: Ctrl-C is Python's again)

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIF_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="200", **extra)
    return env


# ------------------------------------------------------------- interrupted, killed, full

NEW = ["selection.ratio=0.1", "--force"]
"""The second edit: another selection, so that its model differs from the first's."""


def published(out: Path) -> str:
    """The sha256 of the model of a complete output set in ``out``; fails on a mixed set."""
    names = {"model.safetensors", "mask.safetensors", "report.json", "report.md", "config.yaml"}
    assert names <= set(os.listdir(out)) <= names | {"sweep.png"}, os.listdir(out)
    report = json.loads((out / "report.json").read_text())
    model = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert report["checkpoint"]["output_sha256"] == model, "report and model of one set"
    return model


def beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.fixture(scope="module")
def old_set(tmp_path_factory, base) -> Path:
    """A published output set of the fast edit."""
    out = tmp_path_factory.mktemp("old") / "out"
    result = invoke(*edit_into(out, base))
    assert result.exit_code == 0, result.output
    return out


def paused(*args, stage: str) -> subprocess.Popen:
    """``gif ARGS`` in its own process, stopped at ``stage`` of the write phase."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "paused_gif.py"), stage, *map(str, args)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:
        if f"paused at {stage}" in line:
            return process
    process.wait()
    pytest.fail(f"gif stopped (exit {process.returncode}) before the stage {stage}")


KILLS = [
    (signal.SIGINT, "wrote:model.safetensors", "old"),
    (signal.SIGINT, "staged", "old"),
    (signal.SIGINT, "moved-old", "new"),
    (signal.SIGINT, "swapped", "new"),
    (signal.SIGTERM, "staged", "old"),
    (signal.SIGKILL, "wrote:model.safetensors", "old"),
    (signal.SIGKILL, "staged", "old"),
    (signal.SIGKILL, "moved-old", "missing"),
    (signal.SIGKILL, "swapped", "new"),
]


@pytest.mark.slow  # a process started and stopped per case
@pytest.mark.parametrize(
    ("signum", "stage", "left"),
    KILLS,
    ids=[f"{signal.Signals(k[0]).name}-{k[1]}" for k in KILLS],
)
def test_an_interrupted_or_killed_edit_leaves_the_old_or_the_new_set(
    tmp_path, base, old_set, signum, stage, left
):
    out = tmp_path / "out"
    shutil.copytree(old_set, out)
    old = published(out)
    process = paused(*edit_into(out, base, *NEW), stage=stage)
    process.send_signal(signum)
    rest = process.stderr.read()
    process.wait(timeout=60)
    assert "Traceback" not in rest
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
        if left == "missing":  # the two-rename publish killed between its renames
            assert not out.exists() and any(".out.gif-old-" in n for n in beside(out))
        else:
            assert (published(out) == old) == (left == "old")
        # the next run cleans up (and puts a moved-aside set back), then refuses to overwrite
        again = subprocess.run(
            [sys.executable, "-m", "gifcli", *map(str, edit_into(out, base))],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 1 and "already exists" in again.stderr, again.stderr
        assert "note: took over" in again.stderr
        assert (published(out) == old) == (left in ("old", "missing"))
    else:
        assert process.returncode == 128 + signum
        written = "the outputs were already written" if left == "new" else "nothing was written"
        assert f"interrupted: {written}" in rest, rest
        assert (published(out) == old) == (left == "old")
    assert beside(out) == [], "no staging, moved-aside set or lock is left"


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_fails_at_once(tmp_path, base):
    out = tmp_path / "out"
    first = paused(*edit_into(out, base), stage="staged")
    try:
        started = time.perf_counter()
        second = invoke(*edit_into(out, base))
        assert time.perf_counter() - started < 5
        assert second.exit_code == 1
        assert f"output.dir {out} is in use by another gif run (pid {first.pid})" in second.output
        assert f"{out}.lock is locked" in second.output
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    assert first.returncode == 130
    assert not out.exists() and beside(out) == []


def test_the_same_command_twice_writes_the_same_bytes(tmp_path, base):
    out = tmp_path / "out"
    previous = os.umask(0o027)
    try:
        assert invoke(*edit_into(out, base)).exit_code == 0
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o750
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in out.iterdir())
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert invoke(*edit_into(out, base, "--force")).exit_code == 0
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    assert first.keys() == second.keys()
    for name in sorted(first.keys() - {"report.json", "report.md"}):
        assert first[name] == second[name], name

    def without_timing(report: bytes) -> dict:
        report = json.loads(report)
        budget = report.pop("cost")["budget"]  # measured seconds and rates differ; the plan not
        del report["solver"]["seconds"]
        return {**report, "budget": budget}

    assert without_timing(first["report.json"]) == without_timing(second["report.json"])

    def without_time(markdown: bytes) -> list[str]:
        return [line for line in markdown.decode().splitlines() if not line.startswith("- cost:")]

    assert without_time(first["report.md"]) == without_time(second["report.md"])


def _can_mount_tmpfs(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", f"mount -t tmpfs tmpfs {folder}"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.parametrize(
    "size",
    ["200k", pytest.param("1700k", marks=pytest.mark.slow)],
    ids=["model does not fit", "mask does not"],
)
def test_a_full_disk_is_named_and_nothing_is_left_on_it(tmp_path, base, size):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (unshare --mount --map-root-user)")
    gif = " ".join([sys.executable, "-m", "gifcli", *map(str, edit_into(disk / "out", base))])
    script = f"mount -t tmpfs -o size={size} tmpfs {disk} && {gif}; echo rc=$?; ls -A {disk}"
    done = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stderr == f"error: no space left on device in {disk / 'out'}; nothing was written\n"
    assert done.stdout == "rc=1\n", "the disk is left empty"


@pytest.mark.slow
def test_a_mount_point_as_output_dir_is_refused_before_any_work(tmp_path, base):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (unshare --mount --map-root-user)")
    gif = " ".join([sys.executable, "-m", "gifcli", *map(str, edit_into(disk, base))])
    script = f"mount -t tmpfs -o size=1700k tmpfs {disk} && {gif}; echo rc=$?; ls -A {disk}"
    done = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stderr.startswith(f"error: {disk}: output.dir is a mount point;"), done.stderr
    assert done.stdout == "rc=1\n"
    assert beside(disk) == []


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_set(tmp_path, base):
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (unshare --mount --map-root-user)")
    gif = " ".join([sys.executable, "-m", "gifcli", *map(str, edit_into(disk / "out", base))])
    script = (
        f"mount -t tmpfs -o size=3000k tmpfs {disk} && {gif} --quiet && {gif} {' '.join(NEW)}; "
        f"echo rc=$?; cp -a {disk / 'out'} {kept}; ls -A {disk}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = disk / "out"
    assert done.stderr == (
        f"error: no space left on device in {out}; nothing was written; the outputs already "
        f"in {out} are unchanged\n"
    )
    assert done.stdout == "rc=1\nout\n"
    published(kept)


# ------------------------------------------------------ inputs: regular files, bounded memory


def gif(*args, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    """``gif ARGS`` in its own process, killed after ``timeout`` seconds (a hang fails)."""
    return subprocess.run(
        [sys.executable, "-m", "gifcli", *map(str, args)],
        env=_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(done: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert done.returncode == code, done.stderr
    assert done.stderr.startswith("error:") and fragment in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


FIFOS = {
    "--mask": lambda tmp, base: edit(tmp, base, "--mask", _fifo(tmp / "m.safetensors")),
    "evaluate -c": lambda tmp, base: evaluate(_fifo(tmp / "c.safetensors")),
    "--oracle": lambda tmp, base: edit(tmp, base, "--oracle", _fifo(tmp / "o.safetensors")),
    "config": lambda tmp, base: ["evaluate", _fifo(tmp / "c.yaml"), "-c", base],
    "removal.indices": lambda tmp, base: edit(
        tmp,
        base,
        f"removal.indices={_fifo(tmp / 'i.txt')}",
        "removal.random=null",
        config=DIGITS_SAMPLES,
        command="remove-samples",
    ),
    "a file of a tensors folder": lambda tmp, base: evaluate(
        base, "data.dataset=tensors", f"data.path={_tensors_folder_with_fifo(tmp)}"
    ),
}


def _tensors_folder_with_fifo(tmp: Path) -> Path:
    folder = tmp / "arrays"
    folder.mkdir()
    with np.load(_npz(tmp)) as arrays:
        for key in ("x_train", "y_train", "x_test"):
            np.save(folder / f"{key}.npy", arrays[key])
    _fifo(folder / "y_test.npy")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("where", list(FIFOS), ids=list(FIFOS))
def test_a_fifo_is_refused_at_once_wherever_a_file_is_read(tmp_path, base, where):
    args = FIFOS[where](tmp_path, base)
    before = tree(tmp_path)
    done = gif(*args, timeout=60)
    one_line_error(done, 1, "is a named pipe (FIFO), not a regular file")
    assert tree(tmp_path) == before, "nothing written, no lock left"


# ------------------------------------------------------------------ outputs: locks and inputs


def _previous_set(tmp: Path, base: Path) -> Path:
    """An output folder holding a copy of ``base`` as its model, as an earlier edit would."""
    out = tmp / "out"
    out.mkdir()
    shutil.copy(base, out / "model.safetensors")
    return out


INSIDE = {
    "checkpoint": lambda tmp, out: [f"checkpoint={out / 'model.safetensors'}"],
    "--oracle": lambda tmp, out: ["--oracle", out / "model.safetensors"],
    "--mask": lambda tmp, out: ["--mask", out / "model.safetensors"],
    "data.path": lambda tmp, out: ["data.dataset=tensors", f"data.path={_npz(out)}"],
}


@pytest.mark.parametrize("what", list(INSIDE), ids=list(INSIDE))
def test_an_input_inside_the_output_folder_is_refused_before_any_work(tmp_path, base, what):
    out = _previous_set(tmp_path, base)
    extra = INSIDE[what](tmp_path, out)
    before = tree(tmp_path)
    result = invoke(*edit(tmp_path, base, *extra, "--force"))
    assert result.exit_code == 1, result.output
    assert f"is inside output.dir {out}, which the run replaces as a whole" in result.output
    assert tree(tmp_path) == before, "the input is unchanged"


@pytest.mark.parametrize(
    ("output", "command"),
    [
        ("b", lambda out, base: edit_into(out, base)),
        ("b.safetensors", lambda out, base: ["train", DIGITS, "train.epochs=1", "-o", out]),
    ],
    ids=["edit", "train"],
)
def test_a_lock_path_that_is_a_link_is_refused_and_never_followed(tmp_path, base, output, command):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / f"{output}.lock").symlink_to(victim)
    result = invoke(*command(tmp_path / output, base))
    assert result.exit_code == 1, result.output
    assert f"{tmp_path / output}.lock: the lock file is a symbolic link" in result.output
    assert victim.read_text() == "precious\n"


@pytest.fixture
def locked_folder(tmp_path):
    """``tmp/g``, held by another run: its ``g.lock`` flock-ed, with that run's pid inside."""
    import fcntl

    (tmp_path / "g").mkdir()
    fd = os.open(tmp_path / "g.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242\n")
    yield tmp_path / "g"
    os.close(fd)


@pytest.mark.parametrize(
    "command",
    [
        lambda g, base: ["select-params", DIGITS, f"checkpoint={base}", "-o", g / "m.safetensors"],
        lambda g, base: ["train", DIGITS, "train.epochs=1", "-o", g / "model.safetensors"],
        lambda g, base: edit_into(g / "sub", base),
    ],
    ids=["select-params -o", "train -o", "nested output folder"],
)
def test_a_writer_inside_a_locked_output_folder_is_refused_at_once(locked_folder, base, command):
    before = tree(locked_folder.parent)
    started = time.perf_counter()
    result = invoke(*command(locked_folder, base), "--force")
    assert time.perf_counter() - started < 30
    assert result.exit_code == 1, result.output
    assert f"inside output.dir {locked_folder}, which another gif run (pid 4242)" in result.output
    assert tree(locked_folder.parent) == before


@pytest.mark.slow
def test_the_current_folder_as_output_dir_is_resolved(tmp_path, base):
    here = tmp_path / "here"
    here.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "gifcli", *map(str, edit_into(Path("."), base)), "--quiet"],
        cwd=here,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    published(here)
    assert sorted(os.listdir(tmp_path)) == ["here"], "no lock or staging folder is left"


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        pytest.param(
            "removal: {classes: [" + "3, " * 600_000 + "3]}",
            "1,800,023 characters, more than the 1,048,576",
            marks=pytest.mark.slow,
        ),
        ("removal: {classes: [3", "malformed YAML: did not find expected ',' or ']'"),
    ],
    ids=["larger than a config", "malformed YAML"],
)
def test_a_recorded_config_that_cannot_be_a_config_is_ignored_with_a_note(
    tmp_path, base, config, reason
):
    checkpoint = tmp_path / "edited.safetensors"
    save_checkpoint(
        checkpoint, _state(base, lambda s: None), {"task": "remove-class", "config": config}
    )
    done = gif(*evaluate(checkpoint), timeout=120)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stderr.split())
    assert f"note: {checkpoint}: the config in its metadata is ignored ({reason}" in said, said


def test_evaluate_json_holds_null_never_nan(monkeypatch, base):
    from gifcli.outputs import json_text

    assert json.loads(json_text({"a": float("nan"), "b": [float("inf"), 1.0]})) == {
        "a": None,
        "b": [None, 1.0],
    }


def peak_rss(*args, timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    """``gif ARGS`` in a subprocess under ``prlimit`` (16 GiB of address space: a blow-up
    fails fast instead of swapping), and its peak resident memory in MiB."""
    measure = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], stderr=subprocess.PIPE, text=True)\n"
        "sys.stderr.write(done.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
        "sys.exit(done.returncode)\n"
    )
    limit = ["prlimit", f"--as={16 << 30}"] if shutil.which("prlimit") else []
    command = [sys.executable, "-m", "gifcli", *map(str, args)]
    done = subprocess.run(
        [sys.executable, "-c", measure, *limit, *command],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, float(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline_rss(base) -> float:
    """The peak memory of an ordinary ``gif evaluate`` (MiB)."""
    done, rss = peak_rss(*evaluate(base))
    assert done.returncode == 0, done.stderr
    return rss


def _npy_header(path: Path, shape: tuple, dtype=np.int64, data: bytes = b"") -> Path:
    with open(path, "wb") as handle:
        header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(data)
    return path


def _repeated_zeros(tmp: Path) -> Path:
    path = tmp / "z.txt"
    path.write_bytes(b"0\n" * (10 << 20))  # 20 MB, ten million lines
    return path


def _npz_bomb(tmp: Path) -> Path:
    """A small compressed archive whose images unpack to 400 MB, with one label too few (the
    headers alone say so)."""
    path = tmp / "bomb.npz"
    arrays = {
        "x_train": np.zeros((400_000, 1, 32, 32), dtype=np.uint8),
        "y_train": np.zeros(399_999, dtype=np.int64),
        "x_test": np.zeros((10, 1, 32, 32), dtype=np.uint8),
        "y_test": np.zeros(10, dtype=np.int64),
    }
    np.savez_compressed(path, **arrays)
    return path


def _npz_claiming(tmp: Path) -> Path:
    """A 1 KB deflated archive whose x_train header declares 4e9 x 1 x 8 x 8 images."""
    import zipfile

    path = tmp / "claims.npz"
    header = tmp / "x.npy"
    _npy_header(header, (4_000_000_000, 1, 8, 8), np.uint8, b"\0" * 64)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(header, "x_train.npy")
        with np.load(_npz(tmp)) as small:
            for key in ("y_train", "x_test", "y_test"):
                with archive.open(f"{key}.npy", "w") as member:
                    np.lib.format.write_array(member, small[key])
    return path


MEMORY = {
    "10M lines of index 0": (
        lambda tmp, base: edit(
            tmp,
            base,
            f"removal.indices={_repeated_zeros(tmp)}",
            "removal.random=null",
            config=DIGITS_SAMPLES,
            command="remove-samples",
        ),
        "z.txt: line 2: index 0 is repeated (first at line 1)",
    ),
    ".npy header of 1e11 indices": (
        lambda tmp, base: edit(
            tmp,
            base,
            f"removal.indices={_npy_header(tmp / 'i.npy', (10**11,))}",
            "removal.random=null",
            config=DIGITS_SAMPLES,
            command="remove-samples",
        ),
        "i.npy: the header declares (100000000000,) int64 values",
    ),
    ".npz header of 4e9 images": (
        lambda tmp, base: evaluate(base, "data.dataset=tensors", f"data.path={_npz_claiming(tmp)}"),
        "claims.npz: cannot read the .npz file (x_train.npy: the header declares",
    ),
    ".npz of 400 MB zeros, a label short": (
        lambda tmp, base: evaluate(base, "data.dataset=tensors", f"data.path={_npz_bomb(tmp)}"),
        "bomb.npz: y_train has shape 399999; store one integer label per image (400000)",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MEMORY), ids=list(MEMORY))
def test_a_huge_or_lying_input_fails_at_once_in_flat_memory(tmp_path, base, baseline_rss, name):
    make, message = MEMORY[name]
    args = make(tmp_path, base)
    done, rss = peak_rss(*args, timeout=180)
    one_line_error(done, 1, message)
    assert rss < baseline_rss + 150, f"{rss:.0f} MiB, an evaluate takes {baseline_rss:.0f}"
