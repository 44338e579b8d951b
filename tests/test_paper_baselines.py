"""The paper's baselines through ``gif``: the parameter scope of ``if``/``pif``/``sif``,
``sif`` for a backdoor, the removal-gradient subsample and the Neumann settings."""

import json

import pytest
from safetensors.torch import load_file
from torch import nn

from gifcli.cli.main import app
from tests.conftest import DIGITS, DIGITS_BACKDOOR

FAST = ["influence.hessian_samples=256", "influence.max_iter=5", "update.grid_points=8"]
MLP = ["model.arch=mlp", "model.kwargs={hidden: 8}"]
BATCHNORM_NET = "model.arch=tests.test_paper_baselines:batchnorm_net"


def batchnorm_net(in_channels: int, num_classes: int) -> nn.Module:
    """A conv net with BatchNorm on 8×8 inputs: its linear-conv scope leaves 8 parameters out."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, num_classes),
    )


def _train(config, output, *overrides):
    from gifcli.config import load_config
    from gifcli.train import run_train

    config = load_config(config, [*overrides, "train.epochs=3", f"checkpoint={output}"])
    run_train(config=config, output=output, retrain=False, force=False)
    return output


@pytest.fixture(scope="module")
def batchnorm_base(tmp_path_factory):
    return _train(DIGITS, tmp_path_factory.mktemp("bn") / "base.safetensors", BATCHNORM_NET)


@pytest.fixture(scope="module")
def mlp_base(tmp_path_factory):
    return _train(DIGITS, tmp_path_factory.mktemp("mlp") / "base.safetensors", *MLP)


@pytest.fixture(scope="module")
def backdoor_mlp(tmp_path_factory):
    return _train(DIGITS_BACKDOOR, tmp_path_factory.mktemp("bd-mlp") / "base.safetensors", *MLP)


def edit(runner, command, config, checkpoint, out, *overrides):
    result = runner.invoke(
        app,
        [command, str(config), *FAST, f"checkpoint={checkpoint}", f"output.dir={out}", *overrides]
        + ["--json"],
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("method", ["if", "pif", "sif"])
def test_linear_conv_scope_leaves_batchnorm_as_it_was(runner, tmp_path, batchnorm_base, method):
    before = load_file(batchnorm_base)
    edited = {}
    for scope in ("linear-conv", "all"):
        out = tmp_path / scope
        overrides = [BATCHNORM_NET, f"influence.method={method}", f"influence.scope={scope}"]
        if method == "pif":  # every Linear/Conv2d parameter a target, so the scope decides
            overrides.append("selection.ratio=1.0")
        edit(runner, "remove-class", DIGITS, batchnorm_base, out, *overrides, "update.scale=1.0")
        edited[scope] = load_file(out / "model.safetensors")
    for name in ("1.weight", "1.bias"):  # the BatchNorm's affine parameters
        assert edited["linear-conv"][name].equal(before[name])
    assert not edited["linear-conv"]["0.weight"].equal(before["0.weight"])
    if method != "pif":  # pif edits its targets only, and BatchNorm is never a target
        assert not edited["all"]["1.weight"].equal(before["1.weight"])
    # Holding BatchNorm fixed changes the other parameters' update too (H[s, s], not H).
    assert not edited["linear-conv"]["4.weight"].equal(edited["all"]["4.weight"])


def test_sif_for_a_backdoor_under_gauss_newton_drops_the_second_order_term(
    runner, tmp_path, backdoor_mlp
):
    reports = {
        curvature: edit(
            runner,
            "recover-backdoor",
            DIGITS_BACKDOOR,
            backdoor_mlp,
            tmp_path / curvature,
            *MLP,
            "influence.method=sif",
            f"influence.curvature={curvature}",
        )
        for curvature in ("hessian", "ggn")
    }
    assert "second-order term 0" in reports["ggn"]["solver"]["message"]
    assert "second-order term 0" not in reports["hessian"]["solver"]["message"]
    # LSQR makes 2 products per iteration and 3 more (start, final residual check). Under the
    # Hessian each H_S product costs 3 HVPs (H, and H_U of both label sets), H_U Δ₁ 2 more, and
    # a second solve follows; under GGN H_U = 0, so an H_S product is one HVP, one solve.
    hessian, ggn = reports["hessian"]["solver"], reports["ggn"]["solver"]
    assert hessian["hvps"] == 3 * (2 * hessian["iterations"] + 6) + 2
    assert ggn["hvps"] == 2 * ggn["iterations"] + 3


def test_gradient_samples_subsample_the_removal_gradient(runner, tmp_path, mlp_base):
    models, reports = {}, {}
    for name, samples in (("all", "null"), ("20", "20"), ("20-again", "20"), ("many", "100000")):
        out = tmp_path / name
        reports[name] = edit(
            runner,
            "remove-class",
            DIGITS,
            mlp_base,
            out,
            *MLP,
            "update.scale=1.0",
            f"removal.gradient_samples={samples}",
        )
        models[name] = load_file(out / "model.safetensors")
    m = reports["all"]["removal"]["samples"]
    assert reports["all"]["removal"]["gradient_samples"] == m > 20
    assert reports["20"]["removal"]["gradient_samples"] == 20
    assert reports["20"]["removal"]["samples"] == m  # m/(n - m) keeps the whole set's m
    assert reports["many"]["removal"]["gradient_samples"] == m

    def same(a, b):
        return all(models[a][k].equal(models[b][k]) for k in models[a])

    assert not same("all", "20")  # a 20-point gradient gives another update
    assert same("20", "20-again")  # seeded
    assert same("many", "all")  # a subsample at least as large as the set is the set


def test_neumann_settings_from_the_config_reach_the_solver(runner, tmp_path, mlp_base):
    report = edit(
        runner,
        "remove-class",
        DIGITS,
        mlp_base,
        tmp_path / "neumann",
        *MLP,
        "influence.solver=neumann",
        "influence.max_iter=200",
        "influence.neumann={scale: 7.0, scale_step: 3.0, absolute_tol: 1.0e-3}",
    )
    solver = report["solver"]
    assert "final scale c=7" in solver["message"] and "0 restarts" in solver["message"]
    assert solver["converged"] and solver["iterations"] < 200  # stopped by absolute_tol


def test_invalid_neumann_setting_is_one_line_naming_the_key(runner, tmp_path, mlp_base):
    result = runner.invoke(
        app,
        ["remove-class", str(DIGITS), f"checkpoint={mlp_base}", "influence.neumann.scale=-1"],
    )
    assert result.exit_code == 1
    assert "influence.neumann.scale: must be in (0, 1e12], got -1.0" in result.output
    assert "Traceback" not in result.output
