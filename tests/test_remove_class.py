"""``gif remove-class`` end to end on scikit-learn's digits."""

import json

import pytest
from safetensors.torch import load_file

from gifcli.checkpoint import sha256_file
from gifcli.cli.main import app
from gifcli.records import FIDELITY_KEYS
from gifcli.report import OUTPUT_FILES
from gifcli.tasks import RemoveClass
from tests.conftest import DIGITS

REPORT_KEYS = {
    "task",
    "method",
    "selection",
    "params",
    "solver",
    "update",
    "metrics",
    "cost",
    "checkpoint",
}


def invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def removal(tmp_path_factory, digits_base, digits_oracle):
    """The default config (GIF, 5% top-outputs, LSQR, validation-searched step) on digits."""
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("remove-class") / "out"
    input_sha = sha256_file(digits_base)
    result = invoke(
        CliRunner(),
        "remove-class",
        DIGITS,
        f"checkpoint={digits_base}",
        f"output.dir={out}",
        "--oracle",
        digits_oracle,
        "--json",
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out, input_sha


@pytest.mark.slow
def test_the_model_forgets_the_class_and_keeps_its_utility(removal):
    report, _, _ = removal
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert before["forget_acc_test"] >= 90
    assert after["forget_acc_test"] <= 5
    assert after["retain_acc_test"] >= before["retain_acc_test"] - 3
    assert after["mia_efficacy"] > before["mia_efficacy"]


@pytest.mark.slow
def test_report_has_every_key_and_the_oracle_gap(removal):
    report, out, input_sha = removal
    assert set(report) >= REPORT_KEYS
    assert {"total", "changed", "fraction"} <= set(report["params"])
    assert {"name", "iterations", "hvps", "relative_residual", "converged", "seconds"} <= set(
        report["solver"]
    )
    assert {"scale", "norm", "sweep"} <= set(report["update"])
    assert len(report["update"]["sweep"]) >= 40
    metrics = report["metrics"]
    assert set(metrics) == {"before", "after", "oracle", "gap", "train_samples", "salun"}
    for key in (
        "forget_acc_test",
        "retain_acc_test",
        "forget_acc_train",
        "retain_acc_train",
        "f1",
        "mia_efficacy",
        "per_class_acc_test",
    ):
        assert key in metrics["after"] and key in metrics["oracle"]
    assert metrics["gap"]["forget_acc_test"] == pytest.approx(
        abs(metrics["after"]["forget_acc_test"] - metrics["oracle"]["forget_acc_test"])
    )
    assert "mean" in metrics["gap"]
    assert report["checkpoint"]["input_sha256"] == input_sha
    assert report["checkpoint"]["output_sha256"] == sha256_file(out / "model.safetensors")
    assert report["params"]["fraction"] <= 0.05
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["metrics"]["after"] == report["metrics"]["after"]


@pytest.mark.slow
def test_fidelity_to_the_oracle_and_the_salun_protocol_are_reported(removal):
    report, out, _ = removal
    metrics = report["metrics"]
    for group in ("before", "after", "oracle", "gap"):
        assert set(FIDELITY_KEYS) <= set(metrics[group]), group
    oracle = metrics["oracle"]  # the retrained model against itself
    assert oracle["kl_oracle_test"] == 0 and oracle["kl_oracle_removed"] == 0
    assert oracle["agree_oracle_test"] == 100 and oracle["agree_oracle_removed"] == 100
    before, after = metrics["before"], metrics["after"]
    assert after["kl_oracle_removed"] < before["kl_oracle_removed"], "it moved toward the oracle"
    assert after["agree_oracle_removed"] > before["agree_oracle_removed"]
    assert metrics["gap"]["kl_oracle_test"] == after["kl_oracle_test"]
    salun = metrics["salun"]
    for group in ("before", "after", "oracle"):
        assert salun[group] == {
            "ua": 100 - metrics[group]["forget_acc_train"],
            "ra": metrics[group]["retain_acc_train"],
            "ta": metrics[group]["retain_acc_test"],
            "mia_efficacy": metrics[group]["mia_efficacy"],
        }
    gaps = [metrics["gap"][k] for k in RemoveClass.salun_sources]
    assert salun["gap"]["mean"] == pytest.approx(sum(gaps) / 4)
    text = (out / "report.md").read_text()
    assert "| kl_oracle_removed |" in text and "## SalUn protocol" in text
    assert "| average gap |" in text


@pytest.mark.slow
def test_outputs_are_complete_and_only_masked_parameters_change(removal, digits_base):
    _, out, input_sha = removal
    for name in OUTPUT_FILES.values():
        assert (out / name).is_file(), name
    assert sha256_file(digits_base) == input_sha, "the input checkpoint is never modified"
    before, after = load_file(str(digits_base)), load_file(str(out / "model.safetensors"))
    mask = load_file(str(out / "mask.safetensors"))
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        fixed = ~mask[name] if name in mask else slice(None)  # buffers are never targets
        assert after[name][fixed].numpy().tobytes() == tensor[fixed].numpy().tobytes(), name
        if name in mask and not mask[name].any():
            assert after[name].numpy().tobytes() == tensor.numpy().tobytes(), name
    assert "forget_acc_test" in (out / "report.md").read_text()


@pytest.mark.slow
def test_existing_outputs_need_force(runner, removal, digits_base):
    _, out, _ = removal
    stamp = (out / "report.json").stat().st_mtime_ns
    result = invoke(
        runner, "remove-class", DIGITS, f"checkpoint={digits_base}", f"output.dir={out}"
    )
    assert result.exit_code == 1
    assert "--force" in result.output
    assert (out / "report.json").stat().st_mtime_ns == stamp


FAST = [
    "model.arch=mlp",
    "model.kwargs={hidden: 8}",
    "influence.hessian_samples=256",
    "influence.max_iter=5",
    "update.grid_points=8",
]


METHOD_SOLVER = [(method, "lsqr") for method in ("gif", "fif", "pif", "if", "sif", "first-order")]
METHOD_SOLVER += [("gif", solver) for solver in ("cg", "neumann", "exact")]


@pytest.mark.parametrize("method,solver", METHOD_SOLVER)
def test_every_method_and_solver_runs_through_the_command(
    runner, tmp_path, tiny_mlp, method, solver
):
    out = tmp_path / "out"
    result = invoke(
        runner,
        "remove-class",
        DIGITS,
        *FAST,
        f"checkpoint={tiny_mlp}",
        f"influence.method={method}",
        f"influence.solver={solver}",
        f"output.dir={out}",
        "--class",
        "1",
        "--class",
        "7",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == method
    assert report["params"]["changed"] > 0
    if method in ("if", "sif"):
        assert report["params"]["fraction"] > 0.5
    else:
        assert report["params"]["fraction"] <= 0.06
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("solver", ["lsqr", "cg"])
def test_relative_damping_reports_the_absolute_lambda_it_used(runner, tmp_path, tiny_mlp, solver):
    result = invoke(
        runner,
        "remove-class",
        DIGITS,
        *FAST,
        f"checkpoint={tiny_mlp}",
        f"influence.solver={solver}",
        "influence.damping=0.05",
        "influence.damping_relative=true",
        f"output.dir={tmp_path / 'out'}",
        "--json",
    )
    assert result.exit_code == 0, result.output
    solve = json.loads(result.stdout)["solver"]
    assert solve["sigma_max"] > 0 and "σ_max" in solve["message"]
    assert solve["damping"] == pytest.approx(0.05 * solve["sigma_max"])


def test_saved_mask_is_reused_and_a_misfit_mask_is_an_error(
    runner, tmp_path, tiny_mlp, digits_base
):
    mask = tmp_path / "mask.safetensors"
    result = invoke(runner, "select-params", DIGITS, *FAST, f"checkpoint={tiny_mlp}", "-o", mask)
    assert result.exit_code == 0, result.output
    result = invoke(
        runner,
        "remove-class",
        DIGITS,
        *FAST,
        f"checkpoint={tiny_mlp}",
        f"output.dir={tmp_path / 'a'}",
        "--mask",
        mask,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["selection"]["mask"] == str(mask)
    assert load_file(str(tmp_path / "a" / "mask.safetensors")).keys() == load_file(str(mask)).keys()
    result = invoke(
        runner,
        "remove-class",
        DIGITS,
        f"checkpoint={digits_base}",
        f"output.dir={tmp_path / 'b'}",
        "--mask",
        mask,
    )
    assert result.exit_code == 1
    assert "does not fit the model" in result.output
    assert not (tmp_path / "b").exists()


def test_numeric_scale_skips_the_search(runner, tmp_path, tiny_mlp):
    result = invoke(
        runner,
        "remove-class",
        DIGITS,
        *FAST,
        f"checkpoint={tiny_mlp}",
        "update.scale=1.0",
        "data.val_fraction=0",
        f"output.dir={tmp_path}",
        "--json",
    )
    assert result.exit_code == 0, result.output
    update = json.loads(result.stdout)["update"]
    assert update["scale"] == 1.0 and update["sweep"] == []
    assert not (tmp_path / "sweep.png").exists()


def test_auto_scale_without_validation_split_is_a_clear_error(runner, tmp_path, tiny_mlp):
    result = invoke(
        runner,
        "remove-class",
        DIGITS,
        *FAST,
        f"checkpoint={tiny_mlp}",
        "data.val_fraction=0",
        f"output.dir={tmp_path / 'x'}",
    )
    assert result.exit_code == 1
    assert "data.val_fraction" in result.output


def test_hvp_cache_budget_changes_speed_not_the_update(runner, tmp_path, tiny_mlp):
    norms = []
    for budget in (0, 1024):
        result = invoke(
            runner,
            "remove-class",
            DIGITS,
            *FAST,
            f"checkpoint={tiny_mlp}",
            "update.scale=1.0",
            f"influence.cache_mb={budget}",
            f"output.dir={tmp_path / str(budget)}",
            "--json",
        )
        assert result.exit_code == 0, result.output
        norms.append(json.loads(result.stdout)["update"]["norm"])
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
