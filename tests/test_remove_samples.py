"""``gif remove-samples``: the removal set (files, random draws), its objective, the command
end to end on scikit-learn's digits, judged against the retrain oracle."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import gifcli
from gifcli.checkpoint import load_into, sha256_file
from gifcli.cli.main import app
from gifcli.config import build_config, load_config
from gifcli.data import DataSplits, load_dataset
from gifcli.errors import GifError
from gifcli.models import build_model
from gifcli.records import FIDELITY_KEYS
from gifcli.report import OUTPUT_FILES
from gifcli.tasks import RemoveClass, RemoveSamples, check_task, described_task
from gifcli.train import run_train
from tests.conftest import DIGITS, DIGITS_BACKDOOR, DIGITS_SAMPLES, MLP

CPU = torch.device("cpu")
FAST = [*MLP, "influence.hessian_samples=256", "influence.max_iter=5", "update.grid_points=8"]


def invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


def digits_splits(*overrides: str) -> DataSplits:
    config = load_config(DIGITS_SAMPLES, list(overrides))
    return load_dataset(config.data, seed=config.seed)


# ------------------------------------------------------------------------------ the removal set


def test_a_random_removal_set_is_seeded_sized_and_distinct():
    a = RemoveSamples.at_random(1294, 0.05, seed=0)
    assert len(a.forget) == 65 and len(set(a.forget.tolist())) == 65
    assert torch.equal(a.forget, RemoveSamples.at_random(1294, 0.05, seed=0).forget)
    assert not torch.equal(a.forget, RemoveSamples.at_random(1294, 0.05, seed=1).forget)
    assert len(RemoveSamples.at_random(10, 0.01, seed=0).forget) == 1  # never empty
    assert a.description == "65 training samples: random 5% of the training split (seed 0)"


def test_a_config_with_a_removal_set_describes_remove_samples(tmp_path):
    listing = tmp_path / "forget.txt"
    assert described_task(load_config(DIGITS_SAMPLES)) is RemoveSamples
    assert described_task(load_config(DIGITS, [f"removal.indices={listing}"])) is RemoveSamples
    # an explicit removal set on poisoned data is a deletion request, not a backdoor repair
    assert described_task(load_config(DIGITS_BACKDOOR, ["removal.random={}"])) is RemoveSamples
    assert described_task(load_config(DIGITS)) is RemoveClass
    with pytest.raises(GifError, match="describes a remove-samples task .removal.indices or"):
        check_task(load_config(DIGITS_SAMPLES), RemoveClass.name)


@pytest.mark.parametrize(
    ("removal", "message"),
    [
        (
            {"indices": "a.txt", "random": {"fraction": 0.1}},
            "removal.indices, removal.random: give one removal set",
        ),
        ({"random": {"fraction": 1.0}}, r"removal.random.fraction: must be in \(0, 1\), got 1.0"),
        ({"random": {"fraction": 0}}, r"removal.random.fraction: must be in \(0, 1\)"),
        (
            {"indices": "a.txt", "poison_indices": "b.txt"},
            "removal.poison_indices: a remove-samples",
        ),
        ({"objective": "kss"}, "removal.objective: 'kss' is not one of ks, mean-gap; did you mean"),
        ({"tolerance": -1}, r"removal.tolerance: must be in \[0, 100\], got -1"),
    ],
)
def test_removal_set_keys_are_validated(removal, message):
    with pytest.raises(GifError, match=message):
        build_config({"removal": removal})


def listed_config(listing, *overrides):
    return load_config(
        DIGITS_SAMPLES, [f"removal.indices={listing}", "removal.random=null", *overrides]
    )


def test_listed_samples_of_the_validation_split_are_moved_to_training_and_removed(tmp_path):
    data = digits_splits()
    trained, held_out = data.train_source[[5, 0, 40]], data.val_source[[3, 1]]
    listing = tmp_path / "forget.txt"
    listing.write_text("".join(f"{i}\n" for i in [*trained.tolist(), *held_out.tolist()]))
    config = listed_config(listing)
    moved = RemoveSamples.data_for(config, data)
    task = RemoveSamples.from_config(config, moved)
    n = len(data.train)
    assert task.forget.tolist() == [0, 5, 40, n, n + 1]  # every listed sample, none dropped
    assert task.description == f"5 training samples: listed in {listing}"
    assert moved.validation.endswith(
        "2 of the listed samples were in it: they are taken out of it and removed with the others"
    )
    assert len(moved.val) == len(data.val) - 2 and len(moved.train) == n + 2
    assert torch.equal(moved.train.x[n:], data.val.x[[1, 3]])
    assert not any(torch.equal(data.val.x[i], v) for i in (1, 3) for v in moved.val.x)
    retrain = task.retrain_split(moved)
    kept = [i for i in range(n) if i not in (0, 5, 40)]
    assert torch.equal(retrain.x, data.train.x[kept])
    with pytest.raises(GifError, match="2 listed samples are in the validation split; load"):
        RemoveSamples.from_config(config, data)  # without data_for


def test_a_listing_of_validation_samples_only_is_removed_whole(tmp_path):
    data = digits_splits()
    listing = tmp_path / "forget.json"
    listing.write_text(json.dumps(data.val_source[:4].tolist()))
    config = listed_config(listing)
    moved = RemoveSamples.data_for(config, data)
    assert len(RemoveSamples.from_config(config, moved).forget) == 4
    assert len(moved.val) == len(data.val) - 4


def test_positions_are_checked_against_the_training_split():
    with pytest.raises(GifError, match="forget: a position is repeated"):
        RemoveSamples(forget=[3, 3])
    with pytest.raises(GifError, match="forget: no training sample"):
        RemoveSamples(forget=[])
    with pytest.raises(GifError, match="forget: position 5000 is out of range 0..1293"):
        RemoveSamples(forget=[3, 5000]).retrain_split(digits_splits())
    with pytest.raises(GifError, match="forget: position -2 is out of range"):
        RemoveSamples(forget=[-2, 3]).retrain_split(digits_splits())


# ------------------------------------------------------------------------------ the objective


def test_ks_match_counts_only_the_distance_a_5_percent_test_would_notice():
    task = RemoveSamples(forget=[0], objective="ks")
    same = torch.linspace(0, 1, 50, dtype=torch.float64)
    match, parts = task.match(same, same.flip(0), accuracy_gap=0.0)
    assert match == 100 and parts["ks_val"] == 0
    near = same + 0.1  # KS 0.1, below the 5% bound for 50 and 50 samples (0.272)
    assert task.match(near, same, accuracy_gap=0.0)[0] == 100
    apart = same + 2  # KS 1
    bound = 1.3581 * math.sqrt(100 / 2500)
    assert task.match(apart, same, accuracy_gap=0.0)[0] == pytest.approx(100 * bound, abs=1e-3)


def test_mean_gap_match_averages_the_accuracy_and_confidence_gaps():
    task = RemoveSamples(forget=[0], objective="mean-gap")
    forget_loss = -torch.log(torch.tensor([0.9, 0.8], dtype=torch.float64))
    val_loss = -torch.log(torch.tensor([0.6], dtype=torch.float64))
    match, parts = task.match(forget_loss, val_loss, accuracy_gap=10.0)
    assert parts["confidence_gap_val"] == pytest.approx(25.0)
    assert match == pytest.approx(100 - (10 + 25) / 2)


class Lookup(nn.Module):
    """Logits ``scale · x`` of one-hot inputs: right with ``scale > 0``, wrong with ``< 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, x):
        return self.scale * x.flatten(1)


def test_steps_that_cost_validation_accuracy_rank_below_every_other():
    labels = torch.arange(40) % 4
    x = nn.functional.one_hot(labels, 4).float().view(40, 1, 2, 2)
    data = DataSplits.from_tensors(train=(x, labels), test=(x, labels), val=(x[:8], labels[:8]))
    model = Lookup()
    task = RemoveSamples(forget=[0, 1, 2, 3], tolerance=1.0)
    objective = task.removal_set(data, device=CPU, model=model).objective
    value, parts = objective(model)
    assert parts["acc_val"] == 100 and value == parts["match_val"] >= 0
    with torch.no_grad():
        model.scale.fill_(-4.0)  # every validation sample wrong: 100 points lost
    value, parts = objective(model)
    assert parts["acc_val"] == 0
    assert value == pytest.approx(parts["match_val"] - 100 - (100 - 1.0 - 0))
    assert value < 0


# ------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def removal(tmp_path_factory, digits_base, samples_oracle):
    """configs/digits-samples.yaml (GIF, 5% top-outputs, a random 5% forgotten) end to end."""
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("remove-samples") / "out"
    input_sha = sha256_file(digits_base)
    result = invoke(
        CliRunner(),
        "remove-samples",
        DIGITS_SAMPLES,
        f"checkpoint={digits_base}",
        f"output.dir={out}",
        "--oracle",
        samples_oracle,
        "--json",
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out, input_sha


@pytest.mark.slow
def test_random_removal_writes_every_output_and_changes_only_masked_parameters(
    removal, digits_base
):
    report, out, input_sha = removal
    for name in OUTPUT_FILES.values():  # no step search, so no plot of one
        assert (out / name).is_file() == (name != OUTPUT_FILES["plot"]), name
    assert sha256_file(digits_base) == input_sha, "the input checkpoint is never modified"
    before, after = load_file(str(digits_base)), load_file(str(out / "model.safetensors"))
    mask = load_file(str(out / "mask.safetensors"))
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        fixed = ~mask[name] if name in mask else slice(None)
        assert after[name][fixed].numpy().tobytes() == tensor[fixed].numpy().tobytes(), name
    assert report["params"]["fraction"] <= 0.05
    assert report["checkpoint"]["output_sha256"] == sha256_file(out / "model.safetensors")
    assert "forget_acc_train" in (out / "report.md").read_text()


@pytest.mark.slow
def test_random_removal_is_judged_against_the_oracle(removal):
    report, _, _ = removal
    assert report["task"] == RemoveSamples.name
    assert report["removal"]["samples"] == 65 and report["removal"]["train_samples"] == 1294
    metrics = report["metrics"]
    for group in ("before", "after", "oracle"):
        expected = {*RemoveSamples.metric_keys, *FIDELITY_KEYS, "per_class_acc_test"}
        assert expected == set(metrics[group])
    assert metrics["oracle"]["kl_oracle_removed"] == 0
    assert metrics["oracle"]["agree_oracle_removed"] == 100
    assert metrics["salun"]["after"]["ua"] == 100 - metrics["after"]["forget_acc_train"]
    assert metrics["salun"]["oracle"]["ta"] == metrics["oracle"]["acc_test"]
    for key in RemoveSamples.metric_keys:
        assert metrics["gap"][key] == pytest.approx(
            abs(metrics["after"][key] - metrics["oracle"][key])
        )
    before, after, oracle = (metrics[k]["forget_acc_train"] for k in ("before", "after", "oracle"))
    assert abs(after - oracle) <= abs(before - oracle), "forget accuracy moves towards the oracle's"
    assert metrics["after"]["acc_test"] >= metrics["before"]["acc_test"] - 1
    # the task's rule: the influence step, no search
    assert (report["update"]["scale"], report["update"]["chosen_by"]) == (1.0, "task")
    assert report["update"]["sweep"] == [] and report["update"]["norm"] > 0


@pytest.mark.parametrize("suffix", [".txt", ".npy", ".json"])
def test_indices_file_in_each_format_replaces_the_config_removal_set(
    runner, tmp_path, tiny_mlp, suffix
):
    data = digits_splits()
    chosen = data.train_source[torch.arange(0, 300, 10)].tolist() + [int(data.val_source[0])]
    listing = tmp_path / f"forget{suffix}"
    if suffix == ".txt":
        listing.write_text("# deletion request\n" + "".join(f"{i}\n" for i in chosen))
    elif suffix == ".npy":
        np.save(listing, np.array(chosen))
    else:
        listing.write_text(json.dumps(chosen))
    result = invoke(
        runner,
        "remove-samples",
        DIGITS_SAMPLES,
        *FAST,
        f"checkpoint={tiny_mlp}",
        f"output.dir={tmp_path / 'out'}",
        "--indices",
        listing,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["removal"]["samples"] == 31  # the one the validation split held included
    assert report["removal"]["description"] == f"31 training samples: listed in {listing}"
    assert "1 of the listed samples were in it" in report["removal"]["validation"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("12\n99999\n", "line 2: index 99999 is out of range 0..1437"),
        ("12\n40\n12\n", "line 3: index 12 is repeated (first at line 1)"),
        ("12\n3.5\n", "line 2: '3.5' is not an integer index"),
        ("12\n40 1\n", "line 2: expected one index per line, got '40 1'"),
        ("", "lists no indices; give at least one training index"),
    ],
    ids=["out-of-range", "duplicate", "non-integer", "two-columns", "empty"],
)
def test_a_bad_indices_file_exits_1_naming_the_file_and_line(runner, tmp_path, text, message):
    listing = tmp_path / "forget.txt"
    listing.write_text(text)
    out = tmp_path / "out"
    result = invoke(
        runner,
        "remove-samples",
        DIGITS_SAMPLES,
        f"checkpoint={tmp_path / 'never-read.safetensors'}",  # refused before the model loads
        f"output.dir={out}",
        "--indices",
        listing,
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"error: {listing}: {message}" in " ".join(result.output.split())
    assert not out.exists()


def test_a_missing_indices_file_and_a_class_config_are_refused(runner, tmp_path):
    out = f"output.dir={tmp_path / 'out'}"
    result = invoke(runner, "remove-samples", DIGITS_SAMPLES, out, "--indices", tmp_path / "no.txt")
    assert result.exit_code == 1
    assert "no.txt: removal.indices not found" in result.output
    result = invoke(runner, "remove-samples", DIGITS, out)
    assert result.exit_code == 1
    assert "describes a remove-class task" in result.output
    assert "gif remove-class" in result.output


def test_retrain_trains_the_oracle_without_the_samples(tmp_path):
    out = tmp_path / "oracle.safetensors"
    config = load_config(DIGITS_SAMPLES, ["train.epochs=1", f"checkpoint={out}", *MLP])
    report = run_train(config=config, output=out, retrain=True, force=False)
    assert report["oracle_for"] == RemoveSamples.name
    assert report["train_samples"] == 1294 - 65


def test_a_given_step_needs_no_validation_split(runner, tmp_path, tiny_mlp):
    result = invoke(
        runner,
        "remove-samples",
        DIGITS_SAMPLES,
        *FAST,
        f"checkpoint={tiny_mlp}",
        "data.val_fraction=0",
        "update.scale=1.0",
        f"output.dir={tmp_path}",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["update"]["sweep"] == []
    result = invoke(
        runner,
        "remove-samples",
        DIGITS_SAMPLES,
        *FAST,
        f"checkpoint={tiny_mlp}",
        "data.val_fraction=0",
        "update.scale=auto",
        f"output.dir={tmp_path / 'auto'}",
    )
    assert result.exit_code == 1 and "data.val_fraction" in result.output


def test_evaluate_and_the_library_use_the_task(runner, tiny_mlp):
    result = invoke(runner, "evaluate", DIGITS_SAMPLES, *MLP, "--checkpoint", tiny_mlp, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task"] == RemoveSamples.name
    assert set(report["metrics"]) == {*RemoveSamples.metric_keys, "per_class_acc_test"}

    config = load_config(DIGITS_SAMPLES, [*FAST, "update.scale=auto"])
    data = load_dataset(config.data, seed=config.seed)
    model = build_model(config.model, in_channels=1, image_size=data.image_size)
    load_into(model, tiny_mlp)
    task = gifcli.RemoveSamples(forget=torch.arange(0, 1294, 20), objective="mean-gap")
    result = gifcli.edit(model, task, data, gifcli.Settings.from_config(config))
    assert result.report.task == RemoveSamples.name and result.report.removal.samples == 65
    assert "confidence_gap_val" in result.sweep[0].metrics


def test_evaluate_scores_a_remove_samples_edit_on_its_recorded_listing(runner, tmp_path, tiny_mlp):
    listing = tmp_path / "forget.txt"
    listing.write_text("".join(f"{i}\n" for i in range(0, 400, 8)))
    out = tmp_path / "edit"
    args = [*FAST, f"checkpoint={tiny_mlp}", "--indices", listing, "-o", out, "--json"]
    edit = invoke(runner, "remove-samples", DIGITS_SAMPLES, *args)
    assert edit.exit_code == 0, edit.output
    after = json.loads(edit.stdout)["metrics"]["after"]
    model = out / "model.safetensors"
    # a remove-class config: the checkpoint's own task and listing are scored, with a note
    scored = invoke(runner, "evaluate", DIGITS, *MLP, "-c", model, "--json")
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout)
    assert report["task"] == RemoveSamples.name
    assert report["removal"] == f"50 training samples: listed in {listing}"
    assert report["metrics"]["forget_acc_train"] == after["forget_acc_train"]
    (note,) = report["notes"]
    assert note.startswith(f"scored as remove-samples on the removal set {model} records")
    assert "not as the config's remove-class task" in note
    gated = invoke(runner, "evaluate", DIGITS, *MLP, "-c", model, "--check", "acc_test>=0")
    assert gated.exit_code == 0, gated.output  # checks validated against the scored task
    listing.write_text("".join(f"{i}\n" for i in range(0, 400, 9)))
    changed = invoke(runner, "evaluate", DIGITS, *MLP, "-c", model)
    assert changed.exit_code == 1
    assert f"{listing}: changed since {model} was edited to forget" in changed.output
    listing.unlink()
    missing = invoke(runner, "evaluate", DIGITS_SAMPLES, *MLP, "-c", model)
    assert missing.exit_code == 1 and "is missing; restore it" in missing.output
