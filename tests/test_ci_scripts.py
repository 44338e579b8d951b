"""The ready-made CI scripts in scripts/ci/, run as a CI job runs them: a real shell, output to
a pipe (so plain text), a fresh base model trained, the edit gated by checks."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gifcli.checks import edit_report_schema
from gifcli.tasks import RecoverBackdoor, RemoveClass, RemoveSamples
from tests.conftest import ROOT
from tests.test_checks import assert_report_matches_schema

SCRIPTS = ROOT / "scripts" / "ci"
# Small enough for a test: a barely trained model and a short solve; the gates are what is tested.
FAST = [
    "train.epochs=1",
    "train.batch_size=128",
    "influence.hessian_samples=128",
    "influence.max_iter=5",
    "update.grid_points=12",
]


def run_script(name: str, **settings: str) -> subprocess.CompletedProcess:
    gif_bin = Path(sys.executable).parent  # the environment's `gif`
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("FORCE_COLOR", "NO_COLOR", "CONFIG")
    }
    env.update(PATH=f"{gif_bin}{os.pathsep}{env.get('PATH', '')}", **settings)
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *FAST],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def outputs_written(out: Path) -> bool:
    return all(
        (out / name).exists()
        for name in (
            "model.safetensors",
            "mask.safetensors",
            "report.json",
            "report.md",
            "config.yaml",
        )
    )


@pytest.mark.parametrize("name", ["unlearn-class.sh", "repair-backdoor.sh", "forget-samples.sh"])
def test_scripts_are_executable_bash(name):
    script = SCRIPTS / name
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize(
    "settings, colour, escapes",
    [
        ({}, False, False),  # a pipe: plain text
        ({"FORCE_COLOR": "1"}, True, True),  # the probe sees colour when forced
        ({"FORCE_COLOR": "1", "NO_COLOR": "1"}, False, True),  # NO_COLOR: bold, but no colour
    ],
    ids=["pipe", "FORCE_COLOR", "NO_COLOR"],
)
def test_log_output_is_plain_unless_forced(tmp_path, settings, colour, escapes):
    """An error message, the first thing a CI log shows (a missing config: refused before
    torch is imported, so each run takes a fraction of a second)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    gif = Path(sys.executable).parent / "gif"
    result = subprocess.run(
        [str(gif), "evaluate", str(tmp_path / "missing.yaml"), "-c", "m.safetensors"],
        env={**env, **settings},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "config file not found" in result.stderr
    assert ("\x1b[" in result.stderr) is escapes
    assert bool(re.search(r"\x1b\[[0-9;]*3[0-9]m", result.stderr)) is colour


@pytest.mark.slow
def test_unlearn_class_trains_gates_and_keeps_artefacts(tmp_path):
    base, oracle, out = (
        tmp_path / "base.safetensors",
        tmp_path / "oracle.safetensors",
        tmp_path / "out",
    )
    settings = {"BASE": str(base), "ORACLE": str(oracle), "OUT_DIR": str(out), "CLASS": "5"}

    lenient = run_script(
        "unlearn-class.sh",
        **settings,
        MAX_FORGET_ACC="100",
        MAX_RETAIN_DROP="100",
        MAX_PARAMS_FRACTION="1",
        MAX_ORACLE_GAP="100",
    )
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    assert base.exists() and oracle.exists() and outputs_written(out)
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == RemoveClass.name and report["removal"]["description"] == "classes [5]"
    assert [c["expression"] for c in report["checks"]] == [
        "after.forget_acc_test<=100",
        "after.retain_acc_test>=before.retain_acc_test-100",
        "params.fraction<=1",
        "gap.mean<=100",
    ]
    assert all(c["passed"] for c in report["checks"])
    assert f"artefacts: {out}" in lenient.stdout
    assert "\x1b[" not in lenient.stdout + lenient.stderr, "plain text when not a terminal"
    assert_report_matches_schema(
        {k: v for k, v in report.items() if k != "checks"},
        edit_report_schema(RemoveClass.metric_keys, oracle=True, salun=True),
    )

    base_bytes = base.read_bytes()
    strict = run_script("unlearn-class.sh", **settings, MAX_FORGET_ACC="-1")
    assert strict.returncode == 3, strict.stdout + strict.stderr
    assert "reusing base checkpoint" in strict.stdout and base.read_bytes() == base_bytes
    assert outputs_written(out)
    report = json.loads((out / "report.json").read_text())
    assert [c["passed"] for c in report["checks"]][0] is False
    assert "FAIL" in strict.stderr and "checks failed" in strict.stderr


@pytest.mark.slow
def test_repair_backdoor_trains_gates_and_keeps_artefacts(tmp_path):
    base, out = tmp_path / "base.safetensors", tmp_path / "out"
    result = run_script(
        "repair-backdoor.sh",
        BASE=str(base),
        OUT_DIR=str(out),
        MAX_ASR="100",
        MAX_CLEAN_DROP="100",
        MAX_PARAMS_FRACTION="1",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert base.exists() and outputs_written(out)
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == RecoverBackdoor.name
    assert [c["expression"] for c in report["checks"]] == [
        "after.asr_test<=100",
        "after.clean_acc_test>=before.clean_acc_test-100",
        "params.fraction<=1",
    ]
    assert all(c["passed"] for c in report["checks"])
    assert "## Checks" in (out / "report.md").read_text()
    assert "\x1b[" not in result.stdout + result.stderr
    assert_report_matches_schema(
        {k: v for k, v in report.items() if k != "checks"},
        edit_report_schema(RecoverBackdoor.metric_keys, oracle=False),
    )


@pytest.mark.slow
def test_forget_samples_trains_gates_against_the_oracle_and_keeps_artefacts(tmp_path):
    base, oracle, out = (
        tmp_path / "base.safetensors",
        tmp_path / "oracle.safetensors",
        tmp_path / "out",
    )
    indices = tmp_path / "deletion request.txt"  # a path with a space, as users name them
    indices.write_text("".join(f"{i}\n" for i in range(0, 400, 8)))
    settings = {"BASE": str(base), "ORACLE": str(oracle), "OUT_DIR": str(out)}

    lenient = run_script(
        "forget-samples.sh",
        **settings,
        INDICES=str(indices),
        MAX_TEST_DROP="100",
        MAX_RETAIN_DROP="100",
        MAX_PARAMS_FRACTION="1",
        MAX_FORGET_GAP="100",
        MAX_ORACLE_GAP="100",
    )
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    assert base.exists() and oracle.exists() and outputs_written(out)
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == RemoveSamples.name
    assert report["removal"]["description"].startswith(f"{report['removal']['samples']} training")
    assert f"listed in {indices}" in report["removal"]["description"]
    oracle_report = json.loads(oracle.with_suffix(".report.json").read_text())
    removal = report["removal"]
    assert oracle_report["train_samples"] == removal["train_samples"] - removal["samples"]
    assert [c["expression"] for c in report["checks"]] == [
        "after.acc_test>=before.acc_test-100",
        "after.retain_acc_train>=before.retain_acc_train-100",
        "params.fraction<=1",
        "gap.forget_acc_train<=100",
        "gap.mean<=100",
    ]
    assert all(c["passed"] for c in report["checks"])
    assert f"artefacts: {out}" in lenient.stdout
    assert "\x1b[" not in lenient.stdout + lenient.stderr
    assert_report_matches_schema(
        {k: v for k, v in report.items() if k != "checks"},
        edit_report_schema(RemoveSamples.metric_keys, oracle=True, salun=True),
    )

    # without INDICES the config's removal set (a random 5%), so an oracle of its own
    settings["ORACLE"] = str(tmp_path / "oracle-random.safetensors")
    strict = run_script("forget-samples.sh", **settings, MAX_FORGET_GAP="-1")
    assert strict.returncode == 3, strict.stdout + strict.stderr
    assert "reusing base checkpoint" in strict.stdout
    report = json.loads((out / "report.json").read_text())
    assert "random 5%" in report["removal"]["description"]
    assert [c["passed"] for c in report["checks"]][3] is False
    assert "FAIL" in strict.stderr and "checks failed" in strict.stderr
