"""Shared fixtures: base checkpoints trained once per test session on scikit-learn's digits."""

import json
import os
import signal
import struct
import zlib
from pathlib import Path

import pytest
from filelock import FileLock
from typer.testing import CliRunner

from gifcli.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"
DIGITS_BACKDOOR = ROOT / "configs" / "digits-backdoor.yaml"
DIGITS_SAMPLES = ROOT / "configs" / "digits-samples.yaml"
MLP = ["model.arch=mlp", "model.kwargs={hidden: 8}"]


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread per worker of a parallel run (two workers with a thread per core each
    would oversubscribe the cores), also in the commands the tests start."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def rates_cache_of_the_session(tmp_path_factory) -> None:
    """The commands keep measured cost rates in the user's cache folder: the suite (and every
    command it starts) keeps them in a folder of its own."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session", autouse=True)
def interruptible() -> None:
    """Ctrl-C is tested by sending SIGINT; a suite started in the background of a
    non-interactive shell inherits SIGINT ignored (and so would every child it starts), so the
    default handler is put back for the session."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def train_checkpoint(
    config_path: Path, output: Path, *, retrain: bool = False, overrides: tuple[str, ...] = ()
) -> Path:
    """Train through the CLI (`gif train CONFIG --json`), as a user would: the tests of
    `gif train` read what it printed (``printed_report``) instead of training again."""
    args = [str(config_path), *overrides, "-o", str(output), "--json"]
    result = CliRunner().invoke(app, ["train", *args, *(["--retrain"] if retrain else [])])
    assert result.exit_code == 0, result.output
    _printed(output).write_text(result.stdout)
    return output


def printed_report(checkpoint: Path) -> dict:
    """What `gif train --json` printed when ``train_checkpoint`` trained ``checkpoint``."""
    return json.loads(_printed(checkpoint).read_text())


def _printed(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.printed.json")


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid PNG header that claims ``width`` x ``height`` grey pixels, in 70 bytes (its
    pixel data is one empty row: reading the header is cheap, decoding it is not)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def trained_once(
    factory: pytest.TempPathFactory,
    name: str,
    config_path: Path,
    *,
    retrain: bool = False,
    overrides: tuple[str, ...] = (),
) -> Path:
    """A session checkpoint trained once per test run: the workers of a parallel run
    (pytest-xdist) share the folder above their own, and the first to take the lock trains."""
    root = factory.getbasetemp()
    folder = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "trained"
    folder.mkdir(exist_ok=True)
    output = folder / name / f"{name}.safetensors"
    with FileLock(folder / f"{name}.fixture-lock"):  # not DIR.lock: gif's own lock name
        if not _printed(output).exists():
            output.parent.mkdir(exist_ok=True)
            train_checkpoint(config_path, output, retrain=retrain, overrides=overrides)
    return output


@pytest.fixture(scope="session")
def digits_base(tmp_path_factory) -> Path:
    """TinyNet trained on digits with configs/digits.yaml (about 99% test accuracy)."""
    return trained_once(tmp_path_factory, "base", DIGITS)


@pytest.fixture(scope="session")
def digits_oracle(tmp_path_factory) -> Path:
    """The retrain oracle of configs/digits.yaml: trained without class 3."""
    return trained_once(tmp_path_factory, "oracle", DIGITS, retrain=True)


@pytest.fixture(scope="session")
def samples_oracle(tmp_path_factory) -> Path:
    """The retrain oracle of configs/digits-samples.yaml: trained without a random 5%. (Its
    base model is ``digits_base``: the two configs train alike.)"""
    return trained_once(tmp_path_factory, "samples-oracle", DIGITS_SAMPLES, retrain=True)


@pytest.fixture(scope="session")
def tiny_mlp(tmp_path_factory) -> Path:
    """A 682-parameter MLP on digits: small enough for the dense exact solver, fast to edit."""
    return trained_once(tmp_path_factory, "mlp", DIGITS, overrides=tuple(MLP))


@pytest.fixture(scope="session")
def backdoor_base(tmp_path_factory) -> Path:
    """TinyNet trained on the poisoned digits of configs/digits-backdoor.yaml."""
    return trained_once(tmp_path_factory, "backdoor", DIGITS_BACKDOOR)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "120", "NO_COLOR": "1"})
