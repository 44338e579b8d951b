"""Every command through the CLI, and the bad-input list: exit 1 with one clear message, no
traceback, nothing written; usage errors exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer

from gifcli.checkpoint import load_state_dict, read_metadata, sha256_file
from gifcli.cli.main import app
from gifcli.tasks import TASKS
from tests.conftest import DIGITS, DIGITS_BACKDOOR, ROOT, printed_report


def run(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_every_command(runner):
    result = run(runner, "--help")
    assert result.exit_code == 0, result.output
    for command in (
        "train",
        "select-params",
        "remove-class",
        "recover-backdoor",
        "remove-samples",
        "evaluate",
    ):
        assert command in result.output


def test_each_task_has_the_command_of_its_name():
    commands = typer.main.get_command(app).commands
    for task in TASKS:
        assert task.name in commands, f"no command `gif {task.name}`"


LIGHT_INVOCATIONS = """
import json, sys

import typer
from typer.testing import CliRunner

from gifcli.cli.main import app

HEAVY = ("torch", "sklearn", "matplotlib", "torchvision")
invocations = [["--help"], ["--version"], ["configs"], ["init", "digits", "-o", sys.argv[1]]]
invocations += [[name, "--help"] for name in typer.main.get_command(app).commands]
loaded = {}
for args in invocations:
    result = CliRunner().invoke(app, args, prog_name="gif")
    assert result.exit_code == 0, (args, result.output)
    loaded[" ".join(args[:2])] = [name for name in HEAVY if name in sys.modules]
print(json.dumps(loaded))
"""


def test_help_version_configs_and_init_do_not_import_torch(tmp_path):
    """In a fresh interpreter: rendering the help of gif and of every command, --version,
    `gif configs` and `gif init` import none of torch, scikit-learn, matplotlib, torchvision."""
    done = subprocess.run(
        [sys.executable, "-c", LIGHT_INVOCATIONS, str(tmp_path / "digits.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"},
    )
    loaded = json.loads(done.stdout)
    assert len(loaded) == 4 + len(typer.main.get_command(app).commands)
    assert {args: heavy for args, heavy in loaded.items() if heavy} == {}


def test_train_reaches_90_percent_on_digits(digits_base):
    """`gif train configs/digits.yaml --json -o ...`, as the session fixture ran it."""
    report = printed_report(digits_base)
    assert report["acc_test"] >= 90
    assert report["sha256"] == sha256_file(digits_base)
    metadata = read_metadata(digits_base)
    assert metadata["task"] == "train" and "removal:" in metadata["config"]
    beside = digits_base.with_suffix("")
    assert json.loads(Path(f"{beside}.report.json").read_text()) == report
    assert Path(f"{beside}.config.yaml").exists()


def test_train_refuses_to_overwrite_without_force(runner, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep")
    result = run(runner, "train", DIGITS, "train.epochs=1", "-o", out)
    assert result.exit_code == 1
    assert "already exists; pass --force" in result.output
    assert out.read_bytes() == b"keep"


def test_retrain_oracle_forgets_the_class(runner, tmp_path, digits_oracle):
    result = run(runner, "evaluate", DIGITS, "--checkpoint", digits_oracle, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["forget_acc_test"] == 0.0
    assert metrics["retain_acc_test"] >= 95


def test_evaluate_reports_class_removal_metrics(runner, digits_base):
    result = run(runner, "evaluate", DIGITS, "--checkpoint", digits_base, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    metrics = report["metrics"]
    assert report["task"] == "remove-class"
    for key in (
        "acc_test",
        "per_class_acc_test",
        "forget_acc_test",
        "retain_acc_test",
        "forget_acc_train",
        "retain_acc_train",
        "f1",
        "mia_efficacy",
    ):
        assert key in metrics
    assert len(metrics["per_class_acc_test"]) == 10
    assert metrics["acc_test"] >= 90 and metrics["forget_acc_test"] >= 90


def test_evaluate_reports_backdoor_metrics(runner, backdoor_base):
    result = run(runner, "evaluate", DIGITS_BACKDOOR, "--checkpoint", backdoor_base, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    for key in (
        "clean_acc_test",
        "asr_test",
        "robust_acc_test",
        "relabel_acc_train",
        "corrupt_acc_train",
        "clean_acc_train",
        "f1",
    ):
        assert key in metrics
    assert metrics["asr_test"] >= 90, "the shipped backdoor scenario must be learnable"


def test_evaluate_prints_a_table_on_stderr_only(runner, digits_base):
    result = run(runner, "evaluate", DIGITS, "--checkpoint", digits_base)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "forget_acc_test" in result.stderr


def test_evaluate_accepts_pt_checkpoints(runner, tmp_path, digits_base):
    pt = tmp_path / "m.pt"
    torch.save({"net": {f"module.{k}": v for k, v in load_state_dict(digits_base).items()}}, pt)
    result = run(runner, "evaluate", DIGITS, "--checkpoint", pt, "--json")
    assert result.exit_code == 0, result.output


def test_select_params_writes_a_mask_and_a_summary(runner, tmp_path, digits_base):
    out = tmp_path / "mask.safetensors"
    result = run(runner, "select-params", DIGITS, f"checkpoint={digits_base}", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert out.exists() and report["mask"] == str(out)
    assert 0.04 <= report["fraction"] <= 0.05
    first = out.read_bytes()
    table = run(runner, "select-params", DIGITS, f"checkpoint={digits_base}", "-o", out, "--force")
    assert table.exit_code == 0, table.output
    assert "features.0" in table.output and "classifier" in table.output
    assert out.read_bytes() == first, "same inputs and seed give a byte-identical mask"
    assert "selection:" in read_metadata(out)["config"]


def _corrupt(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x00" * 64)
    return path


def _misfit(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save({"net.1.weight": torch.zeros(3, 3)}, path)
    return path


BAD_INPUTS = {
    "missing config": (
        lambda tmp, ckpt: ["evaluate", tmp / "none.yaml", "-c", ckpt],
        "config file not found",
    ),
    "malformed yaml": (
        lambda tmp, ckpt: ["evaluate", _write(tmp, "x.yaml", "a: [1,"), "-c", ckpt],
        "malformed YAML",
    ),
    "unknown key": (
        lambda tmp, ckpt: ["evaluate", DIGITS, "selection.rato=0.1", "-c", ckpt],
        "did you mean selection.ratio",
    ),
    "ill-typed key": (
        lambda tmp, ckpt: ["evaluate", DIGITS, "train.epochs=many", "-c", ckpt],
        "train.epochs: expected an integer",
    ),
    "missing checkpoint": (
        lambda tmp, ckpt: ["evaluate", DIGITS, "-c", tmp / "none.safetensors"],
        "checkpoint not found",
    ),
    "corrupt checkpoint": (
        lambda tmp, ckpt: ["evaluate", DIGITS, "-c", _corrupt(tmp)],
        "not a readable safetensors file",
    ),
    "checkpoint misfit": (
        lambda tmp, ckpt: ["evaluate", DIGITS, "-c", _misfit(tmp)],
        "does not fit model.arch",
    ),
    "data set missing": (
        lambda tmp, ckpt: [
            "evaluate",
            DIGITS,
            "data.dataset=mnist",
            f"data.root={tmp / 'nodata'}",
            "-c",
            ckpt,
        ],
        "data.download",
    ),
    "class out of range": (
        lambda tmp, ckpt: ["evaluate", DIGITS, "removal.classes=[10]", "-c", ckpt],
        "removal.classes: class 10 is out of range",
    ),
    "unwritable output": (
        lambda tmp, ckpt: [
            "train",
            DIGITS,
            "train.epochs=1",
            "-o",
            _write(tmp, "file", "x") / "sub" / "m.safetensors",
        ],
        "cannot write here",
    ),
}


def _write(tmp, name, text):
    path = tmp / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_exits_1_with_one_clear_message(runner, tmp_path, digits_base, case):
    make_args, expected = BAD_INPUTS[case]
    checkpoint = sha256_file(digits_base)
    args = make_args(tmp_path, digits_base)
    created = sorted(p.name for p in tmp_path.iterdir())
    result = run(runner, *args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert expected in result.output, result.output
    assert result.output.strip().startswith("error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == created, "nothing new is written"
    assert sha256_file(digits_base) == checkpoint, "the input checkpoint is left as it was"


@pytest.mark.parametrize(
    "args",
    [
        ["train"],
        ["evaluate", str(DIGITS)],
        ["nonsense"],
        ["train", str(DIGITS), "--no-such-option"],
    ],
)
def test_usage_errors_exit_2(runner, args):
    assert run(runner, *args).exit_code == 2
