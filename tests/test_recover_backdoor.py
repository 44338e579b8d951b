"""``gif recover-backdoor`` end to end on the shipped digits backdoor scenario."""

import json

import pytest

from gifcli.cli.main import app
from gifcli.config import load_config
from gifcli.data import load_dataset
from tests.conftest import DIGITS_BACKDOOR, train_checkpoint


def invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


def recover(runner, checkpoint, out, *extra):
    result = invoke(
        runner,
        "recover-backdoor",
        DIGITS_BACKDOOR,
        f"checkpoint={checkpoint}",
        f"output.dir={out}",
        *extra,
        "--json",
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_repaired(report):
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert before["asr_test"] >= 90, "the shipped scenario's backdoor must be learnt"
    assert after["asr_test"] <= before["asr_test"] - 70
    assert after["clean_acc_test"] >= before["clean_acc_test"] - 3
    assert after["robust_acc_test"] > before["robust_acc_test"] + 50


@pytest.fixture(scope="module")
def backdoor_oracle(tmp_path_factory):
    return train_checkpoint(
        DIGITS_BACKDOOR, tmp_path_factory.mktemp("bd-oracle") / "o.safetensors", retrain=True
    )


@pytest.mark.slow
def test_known_poisoned_samples_repair_the_backdoor(
    runner, tmp_path, backdoor_base, backdoor_oracle
):
    report = recover(runner, backdoor_base, tmp_path / "out", "--oracle", backdoor_oracle)
    assert_repaired(report)
    metrics = report["metrics"]
    for key in (
        "clean_acc_test",
        "asr_test",
        "robust_acc_test",
        "relabel_acc_train",
        "corrupt_acc_train",
        "clean_acc_train",
        "f1",
    ):
        assert key in metrics["after"] and key in metrics["gap"]
    assert metrics["oracle"]["asr_test"] <= 20, "the oracle never learnt the backdoor"
    assert metrics["after"]["corrupt_acc_train"] < metrics["before"]["corrupt_acc_train"]
    assert report["removal"]["samples"] == len(
        load_dataset(load_config(DIGITS_BACKDOOR).data, seed=0).poison.indices
    )
    assert (tmp_path / "out" / "sweep.png").exists()


@pytest.mark.slow
def test_a_known_trigger_alone_repairs_the_backdoor(runner, tmp_path, backdoor_base):
    report = recover(runner, backdoor_base, tmp_path / "out", "removal.synthetic_samples=200")
    assert report["removal"]["samples"] == 200
    assert "known trigger" in report["removal"]["description"]
    assert_repaired(report)


def test_poison_index_file_with_true_labels(runner, tmp_path, backdoor_base):
    """Indices count samples of the full training set (before the validation split)."""
    data = load_dataset(load_config(DIGITS_BACKDOOR).data, seed=0)
    original = data.train_source[data.poison.indices]
    listing = tmp_path / "poisoned.txt"
    listing.write_text(
        "# index true-label\n"
        + "".join(
            f"{i} {y}\n"
            for i, y in zip(original.tolist(), data.poison.true_labels.tolist(), strict=True)
        )
    )
    report = recover(
        runner,
        backdoor_base,
        tmp_path / "out",
        f"removal.poison_indices={listing}",
        "update.grid_points=8",
        "influence.max_iter=5",
    )
    assert report["removal"]["samples"] == len(data.poison.indices)
    assert report["metrics"]["after"]["asr_test"] < report["metrics"]["before"]["asr_test"]


def test_unknown_poisoned_samples_are_a_clear_error(runner, tmp_path, backdoor_base):
    listing = tmp_path / "bad.txt"
    listing.write_text("99999\n")
    result = invoke(
        runner,
        "recover-backdoor",
        DIGITS_BACKDOOR,
        f"checkpoint={backdoor_base}",
        f"removal.poison_indices={listing}",
        f"output.dir={tmp_path / 'out'}",
    )
    assert result.exit_code == 1
    assert "bad.txt" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
