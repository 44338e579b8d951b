"""What a new user meets first: shipped configs, explained outputs, hints that name real
commands, and `gif evaluate` scoring what a checkpoint was edited for."""

import json

import pytest
import yaml

from gifcli.cli.main import app
from gifcli.config import load_config
from gifcli.data import load_dataset, read_poison_indices, to_split_positions
from gifcli.shipped import shipped_configs
from tests.conftest import DIGITS, DIGITS_BACKDOOR, printed_report

FAST = ["influence.hessian_samples=128", "influence.max_iter=4", "update.grid_points=8"]


def invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


def test_configs_lists_every_shipped_config(runner):
    result = invoke(runner, "configs", "--json")
    assert result.exit_code == 0, result.output
    names = {entry["name"] for entry in json.loads(result.stdout)}
    assert names == {config.name for config in shipped_configs()} >= {"digits", "digits-backdoor"}


def test_init_copies_a_config_and_refuses_to_overwrite(runner, tmp_path):
    target = tmp_path / "mine.yaml"
    assert invoke(runner, "init", "digits", "-o", target).exit_code == 0
    assert yaml.safe_load(target.read_text()) == yaml.safe_load(DIGITS.read_text())
    again = invoke(runner, "init", "digits", "-o", target)
    assert again.exit_code == 1 and "--force" in again.output
    unknown = invoke(runner, "init", "digit")
    assert unknown.exit_code == 1 and "did you mean 'digits'" in unknown.output


def test_an_override_typo_is_reported_as_the_override(runner):
    result = invoke(runner, "remove-class", DIGITS, "selection.ratoi=0.1")
    assert result.exit_code == 1
    assert "command-line overrides" in result.output
    assert "from the override 'selection.ratoi=0.1'" in result.output
    assert "did you mean selection.ratio" in result.output


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["evaluate", DIGITS, "-c", "missing.safetensors"], "written by `gif train` or by an edit"),
        (
            ["remove-class", DIGITS, "checkpoint=missing.safetensors"],
            f"gif train {DIGITS} -o missing.safetensors",
        ),
    ],
)
def test_missing_checkpoints_get_a_hint_with_the_real_command(runner, tmp_path, args, hint):
    result = invoke(runner, *args, *(["-o", tmp_path / "out"] if args[0] != "evaluate" else []))
    assert result.exit_code == 1
    assert hint in result.output.replace("\n", "")


def test_a_missing_oracle_names_the_retrain_command(runner, tmp_path, digits_base):
    result = invoke(
        runner,
        "remove-class",
        DIGITS,
        f"checkpoint={digits_base}",
        "--oracle",
        tmp_path / "oracle.safetensors",
        "-o",
        tmp_path / "out",
    )
    assert result.exit_code == 1
    assert "--retrain -o" in result.output.replace("\n", "")
    assert not (tmp_path / "out").exists()


def test_retrain_shows_the_task_metrics(digits_oracle):
    """`gif train configs/digits.yaml --retrain --json -o ...`, as the session fixture ran it."""
    report = printed_report(digits_oracle)
    assert report["task"] == "retrain"
    assert report["task_metrics"]["forget_acc_test"] == 0.0
    assert report["task_metrics"]["retain_acc_test"] > report["acc_test"]


def test_training_a_poisoned_config_lists_its_poisoned_samples(backdoor_base):
    listing = backdoor_base.with_suffix("").with_suffix(".poisoned.txt")
    config = load_config(DIGITS_BACKDOOR)
    data = load_dataset(config.data, seed=config.seed)
    indices, labels = read_poison_indices(listing, len(data.train) + len(data.val))
    positions = to_split_positions(indices, data.train_source)
    order = data.poison.indices.argsort()
    assert sorted(positions.tolist()) == sorted(data.poison.indices.tolist())
    by_position = dict(zip(positions.tolist(), labels.tolist(), strict=True))
    assert [by_position[p] for p in data.poison.indices[order].tolist()] == (
        data.poison.true_labels[order].tolist()
    )


def test_terminal_explains_the_solve_and_the_changed_parameters(runner, tmp_path, digits_base):
    result = invoke(
        runner, "remove-class", DIGITS, *FAST, f"checkpoint={digits_base}", "-o", tmp_path / "e"
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "iteration-limit (stopped at influence.max_iter; the limit regularises" in text
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    params, targets = report["params"], report["selection"]["targets"]
    assert f"{params['changed']:,} of {targets:,} target parameters changed" in text
    assert ("keep their value" in text) == (params["changed"] < targets)
    assert report["solver"]["status"] == "iteration-limit" and report["solver"]["ok"] is True
    assert report["solver"]["converged"] is False


def test_evaluate_scores_the_removal_set_the_checkpoint_was_edited_for(
    runner, tmp_path, digits_base
):
    out = tmp_path / "edit"
    edit = invoke(
        runner,
        "remove-class",
        DIGITS,
        *FAST,
        f"checkpoint={digits_base}",
        "--class",
        3,
        "--class",
        5,
        "-o",
        out,
        "--json",
    )
    assert edit.exit_code == 0, edit.output
    after = json.loads(edit.stdout)["metrics"]["after"]
    model = out / "model.safetensors"
    scored = invoke(runner, "evaluate", DIGITS, "-c", model, "--json")
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout)
    assert report["removal"] == "classes [3, 5]" and report["notes"]
    assert report["metrics"]["forget_acc_test"] == after["forget_acc_test"]
    given = json.loads(
        invoke(runner, "evaluate", DIGITS, "-c", model, "removal.classes=[3]", "--json").stdout
    )
    assert given["removal"] == "classes [3]" and "command line" in given["notes"][0]


def test_a_config_of_another_task_is_refused_before_any_work(runner, tmp_path):
    result = invoke(
        runner,
        "remove-class",
        DIGITS_BACKDOOR,
        "-o",
        tmp_path / "out",
        "--check",
        "after.forget_acc_test<=100",
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "describes a recover-backdoor task" in lines[0]
    assert "gif recover-backdoor" in lines[0]
    assert not (tmp_path / "out").exists()
