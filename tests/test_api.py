"""The library face: ``gifcli.edit`` on an in-memory model and tensors, equal to the CLI."""

import os

import pytest
import torch
from safetensors.torch import load_file

import gifcli
from gifcli.checkpoint import load_into
from gifcli.cli.main import app
from gifcli.config import load_config
from gifcli.data import load_dataset
from gifcli.errors import GifError
from gifcli.models import build_model
from tests.conftest import DIGITS

FAST = [
    "influence.hessian_samples=128",
    "influence.max_iter=4",
    "update.grid_points=8",
]


def in_memory(checkpoint):
    """The digits config's model and splits, as a user holding them in memory would."""
    config = load_config(DIGITS, FAST)
    splits = load_dataset(config.data, seed=config.seed)
    model = build_model(config.model, in_channels=1, image_size=splits.image_size)
    load_into(model, checkpoint)
    data = gifcli.DataSplits.from_tensors(
        train=(splits.train.x.clone(), splits.train.y.clone()),
        val=(splits.val.x.clone(), splits.val.y.clone()),
        test=(splits.test.x.clone(), splits.test.y.clone()),
        num_classes=10,
        mean=splits.mean,
        std=splits.std,
    )
    return config, model, data


def test_edit_in_memory_writes_nothing_and_equals_the_cli(
    tmp_path, monkeypatch, runner, digits_base
):
    config, model, data = in_memory(digits_base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.chdir(tmp_path)
    result = gifcli.edit(
        model, gifcli.RemoveClass(classes=[3]), data, gifcli.Settings.from_config(config)
    )
    assert os.listdir(tmp_path) == []  # no file written
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy edited
    assert (
        result.report.metrics.after["forget_acc_test"]
        < result.report.metrics.before["forget_acc_test"]
    )

    out = tmp_path / "cli"
    cli = runner.invoke(
        app,
        ["remove-class", str(DIGITS), *FAST, f"checkpoint={digits_base}", f"output.dir={out}"],
    )
    assert cli.exit_code == 0, cli.output
    written = load_file(str(out / "model.safetensors"))
    edited = result.model.state_dict()
    assert written.keys() == edited.keys()
    for name, tensor in written.items():
        assert torch.equal(tensor, edited[name]), name  # bit-identical on CPU


def test_write_outputs_of_an_in_memory_edit(tmp_path, digits_base):
    config, model, data = in_memory(digits_base)
    settings = gifcli.Settings.from_config(config)
    result = gifcli.edit(model, gifcli.RemoveClass(classes=[3]), data, settings)
    report = gifcli.write_outputs(result, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [
            "model.safetensors",
            "mask.safetensors",
            "report.json",
            "report.md",
            "config.yaml",
            "sweep.png",
        ]
    )
    assert report["checkpoint"]["input"] is None and report["checkpoint"]["output_sha256"]
    with pytest.raises(GifError, match="already exists"):
        gifcli.write_outputs(result, tmp_path / "out")


def test_library_errors_name_the_setting(digits_base):
    config, model, data = in_memory(digits_base)
    settings = gifcli.Settings.from_config(config)
    settings.influence.damping = -1.0
    with pytest.raises(GifError, match="influence.damping"):
        gifcli.edit(model, gifcli.RemoveClass(classes=[3]), data, settings)


def test_from_tensors_holds_out_a_stratified_validation_split():
    x = torch.randn(100, 1, 4, 4)
    y = torch.arange(100) % 4
    data = gifcli.DataSplits.from_tensors(train=(x, y), test=(x[:8], y[:8]), val_fraction=0.2)
    assert len(data.val) == 20 and len(data.train) == 80
    assert torch.bincount(data.val.y).tolist() == [5, 5, 5, 5]
    with pytest.raises(GifError, match="labels must be integers"):
        gifcli.DataSplits.from_tensors(train=(x, y.float()), test=(x, y))


def test_import_is_lazy():
    import subprocess
    import sys

    code = "import gifcli, sys; d = dir(gifcli); print('torch' in sys.modules, 'edit' in d)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False True"  # dir() lists the lazy exports, unimported


def test_damping_auto_chooses_lambda_and_step_on_validation(digits_base):
    config, model, data = in_memory(digits_base)
    settings = gifcli.Settings.from_config(config)
    settings.influence.damping = "auto"
    settings.influence.damping_points = 3
    result = gifcli.edit(model, gifcli.RemoveClass(classes=[3]), data, settings)
    solver, sweep = result.report.solver, result.report.update.sweep
    assert solver.damping_chosen_by == "validation" and solver.sigma_max > 0
    assert len({point["damping"] for point in sweep}) == 3
    best = max(point["objective"] for point in sweep)
    chosen = [p for p in sweep if p["damping"] == solver.damping and p["scale"] == result.scale]
    assert chosen and chosen[0]["objective"] == best
    assert solver.damping_relative == pytest.approx(solver.damping / solver.sigma_max)


def test_a_selection_that_selects_nothing_names_the_setting(digits_base):
    config, model, data = in_memory(digits_base)
    settings = gifcli.Settings.from_config(config)
    settings.selection.ratio = 1e-9
    with pytest.raises(GifError, match=r"^selection\.ratio: .* selects no parameter"):
        gifcli.edit(model, gifcli.RemoveClass(classes=[3]), data, settings)


@pytest.mark.slow
def test_an_oracle_adds_fidelity_and_the_salun_gap_to_the_report(digits_base, digits_oracle):
    config, model, data = in_memory(digits_base)
    _, oracle, _ = in_memory(digits_oracle)
    task = gifcli.RemoveClass(classes=[3])
    result = gifcli.edit(model, task, data, gifcli.Settings.from_config(config), oracle=oracle)
    metrics = result.report.metrics
    assert metrics.oracle["kl_oracle_test"] == 0 and metrics.oracle["agree_oracle_test"] == 100
    assert metrics.after["kl_oracle_test"] < metrics.before["kl_oracle_test"]
    assert 0 <= metrics.after["agree_oracle_removed"] <= 100
    assert set(metrics.salun) == {"before", "after", "oracle", "gap"}
    assert metrics.salun["after"]["ua"] == 100 - metrics.after["forget_acc_train"]
    itself = task.evaluate(oracle, data, device=torch.device("cpu"), seed=0, oracle=oracle)
    assert (itself["kl_oracle_removed"], itself["agree_oracle_removed"]) == (0.0, 100.0)


def test_settings_check_gradient_samples_as_the_config_does():
    from gifcli.pipeline import Settings

    assert Settings(gradient_samples=None).problems() == []
    assert Settings(gradient_samples=0).problems() == [
        "removal.gradient_samples: must be in 1..1000000000, got 0"
    ]
