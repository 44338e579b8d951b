"""The report's ``cost`` block and the budget that sizes the solve (``gifcli.cost``)."""

import json

import pytest
import torch

import gifcli
from gifcli.cli.main import app
from gifcli.config import InfluenceConfig, TrainConfig, UpdateConfig, damping_of
from gifcli.cost import (
    BUDGET_LADDER,
    FORWARD_PASSES,
    HVP_PASSES,
    STEP_PASSES,
    Probe,
    Rates,
    Stages,
    cached_rates,
    cost_record,
    measure_rates,
    plan_budget,
    retrain_record,
)
from gifcli.data import TensorSplit
from gifcli.influence.estimators import estimator
from tests.conftest import DIGITS
from tests.test_api import FAST, in_memory


def plan(retrain_passes: float, **influence) -> gifcli.records.BudgetRecord:
    config = InfluenceConfig(**influence)
    return plan_budget(
        config,
        UpdateConfig(scale=1.0),  # one evaluation of the validation split
        retrain_passes=retrain_passes,
        fixed_passes=100.0,
        validation=50,
        products=lambda iterations: estimator(config.method).products(
            config.solver, iterations, config.damping_setting
        ),
    )


def solve_passes(samples: int, iterations: int, method: str = "gif") -> float:
    return (
        HVP_PASSES["ggn"]
        * samples
        * estimator(method).products("lsqr", iterations, damping_of(0.0))
    )


def test_budget_takes_the_dearest_rung_that_fits():
    """In the unit of the reports' ``retrain_ratio``: ``epochs × samples`` training steps of
    ``STEP_PASSES`` each."""
    fixed = 100.0 + FORWARD_PASSES * 50
    samples, iterations = BUDGET_LADDER[2]
    needed = fixed + solve_passes(samples, iterations)
    fits = needed / 0.1 / STEP_PASSES + 1  # training steps of a retraining that fits it
    budget = plan(fits, budget=0.1)
    assert (budget.hessian_samples, budget.max_iter) == (samples, iterations)
    assert budget.chosen_by == "budget"
    assert budget.predicted_passes == pytest.approx(needed)
    assert budget.predicted_ratio == pytest.approx(needed / (fits * STEP_PASSES))
    # a hair less and the rung below is taken
    lower = plan(fits - 2, budget=0.1)
    assert (lower.hessian_samples, lower.max_iter) == BUDGET_LADDER[1]


def test_budget_plans_the_products_of_the_estimator():
    """``sif`` makes four times the products of ``gif`` (two solves of ``H_S``, two curvature
    products each): the same budget gives it a smaller solve, and never more than allowed."""
    fixed = 100.0 + FORWARD_PASSES * 50
    samples, iterations = BUDGET_LADDER[3]
    fits = (fixed + solve_passes(samples, iterations)) / 0.1 / STEP_PASSES + 1
    gif, sif = plan(fits, budget=0.1), plan(fits, budget=0.1, method="sif")
    assert (gif.hessian_samples, gif.max_iter) == (samples, iterations)
    assert sif.hessian_samples * sif.max_iter < gif.hessian_samples * gif.max_iter
    assert sif.predicted_passes <= sif.allowed_passes
    assert sif.predicted_passes == pytest.approx(
        fixed + solve_passes(sif.hessian_samples, sif.max_iter, "sif")
    )


def test_budget_never_goes_below_the_cheapest_rung_nor_above_the_dearest():
    assert (plan(1.0).hessian_samples, plan(1.0).max_iter) == BUDGET_LADDER[0]
    assert (plan(1e12).hessian_samples, plan(1e12).max_iter) == BUDGET_LADDER[-1]


def test_numbers_in_the_config_are_honoured():
    budget = plan(1.0, hessian_samples=333, max_iter=7)
    assert (budget.hessian_samples, budget.max_iter, budget.chosen_by) == (333, 7, "config")
    assert budget.predicted_ratio > 1  # and said to cost more than retraining
    half = plan(1e12, hessian_samples=333)  # iterations still sized by the budget
    assert (half.hessian_samples, half.max_iter) == (333, BUDGET_LADDER[-1][1])


def test_the_ratio_is_the_edit_seconds_over_a_known_retraining():
    rates = Rates(gradient=1e-4, forward=2e-5, train=2e-4, hvp=3e-4)
    retrain = retrain_record(epochs=10, samples=1000, rates=rates)
    assert retrain.passes == 10_000 and retrain.seconds == pytest.approx(2.0)
    stages = Stages()
    stages.seconds = {"selection": 0.1, "solve": 0.3, "step_search": 0.1, "metrics": 5.0}
    stages.passes = {"selection": 10.0, "solve": 400.0, "metrics": 999.0}
    cost = cost_record(
        stages=stages,
        rates=rates,
        retrain=retrain,
        budget=plan(1e6),
    )
    assert cost.seconds["edit"] == pytest.approx(0.5)  # evaluation (metrics) excluded
    assert cost.seconds_ratio == pytest.approx(0.25)
    assert cost.passes["edit"] == pytest.approx(410.0)
    # in passes, a training step of a sample 2 (train / gradient): what a gate reads
    assert retrain.step_passes == pytest.approx(2.0)
    assert cost.retrain_ratio == pytest.approx(410.0 / (10_000 * 2.0))
    assert cost.forward_passes == pytest.approx(0.2) and cost.hvp_passes == pytest.approx(3.0)


def test_a_timed_stage_counts_the_samples_its_model_sees():
    model, stages = torch.nn.Linear(3, 2), Stages()
    with stages.timed("metrics", model=model, forward_passes=0.5):
        model(torch.zeros(4, 3))
        model(torch.zeros(6, 3))
    with stages.timed("removal_set"):
        model(torch.zeros(8, 3))  # not counted: no model given
    model(torch.zeros(9, 3))  # outside every stage
    assert stages.passes == {"metrics": 5.0}
    assert set(stages.seconds) == {"metrics", "removal_set"}
    assert all(seconds >= 0 for seconds in stages.seconds.values())


def test_measuring_the_rates_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = torch.nn.Sequential(  # BatchNorm: buffers a training step would move
        torch.nn.Flatten(),
        torch.nn.Linear(64, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 10),
    ).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sample = TensorSplit(torch.randn(40, 1, 8, 8), torch.arange(40) % 10)
    probe = Probe(train=TrainConfig(batch_size=16), batch_size=32, device=torch.device("cpu"))
    rates = measure_rates(model, sample, probe)
    assert rates.gradient > 0 and rates.forward > 0 and rates.train > 0 and rates.hvp > 0
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_edit_reports_its_cost(digits_base):
    config, model, data = in_memory(digits_base)
    result = gifcli.edit(
        model, gifcli.RemoveClass(classes=[3]), data, gifcli.Settings.from_config(config)
    )
    cost = result.report.to_dict()["cost"]
    stages = ("removal_set", "probe", "selection", "removal_gradient", "solve", "step_search")
    assert set(cost["seconds"]) == {*stages, "metrics", "edit"}
    assert all(cost["seconds"][k] >= 0 for k in cost["seconds"]) and cost["seconds"]["edit"] > 0
    assert cost["passes"]["solve"] > 0 and cost["passes"]["removal_gradient"] == 131
    assert cost["hvp_passes"] > 0 and cost["forward_passes"] > 0
    retrain = cost["retrain"]
    assert retrain["samples"] == len(data.train) - 131  # class 3 left out
    assert retrain["passes"] == config.train.epochs * retrain["samples"]
    counted = retrain["passes"] * retrain["step_passes"]
    assert cost["retrain_ratio"] == pytest.approx(cost["passes"]["edit"] / counted)
    assert cost["seconds_ratio"] == pytest.approx(cost["seconds"]["edit"] / retrain["seconds"])
    assert not cost["rates_cached"]  # the library measures unless given a cache
    assert (cost["budget"]["hessian_samples"], cost["budget"]["max_iter"]) == (128, 4)


def test_a_dear_edit_is_announced_and_runs(digits_base):
    """Dear against a retraining of one epoch: the small solve of ``FAST`` is announced."""
    config, model, data = in_memory(digits_base)
    heard = []
    settings = gifcli.Settings.from_config(config)
    settings.train.epochs = 1
    result = gifcli.edit(model, gifcli.RemoveClass(classes=[3]), data, settings, note=heard.append)
    dear = [note for note in heard if "predicted to cost" in note]
    assert len(dear) == 1 and "retraining" in dear[0], heard
    assert result.report.to_dict()["cost"]["budget"]["predicted_ratio"] > 1


def test_check_on_the_cost_block(tmp_path, runner, digits_base):
    out = tmp_path / "out"
    args = ["remove-class", str(DIGITS), *FAST, f"checkpoint={digits_base}", f"output.dir={out}"]
    passed = runner.invoke(app, [*args, "--json", "--check", "cost.retrain_ratio<=1000"])
    assert passed.exit_code == 0, passed.output
    report = json.loads((out / "report.json").read_text())
    assert report["checks"][0]["passed"] and report["cost"]["retrain_ratio"] > 0
    failed = runner.invoke(app, [*args, "--force", "--check", "cost.retrain_ratio<=0"])
    assert failed.exit_code == 3, failed.output
    assert "edit" in (out / "report.md").read_text() and "retraining" in failed.output


def test_budget_counts_a_curvature_product_at_its_own_cost():
    fixed = 100.0 + FORWARD_PASSES * 50
    samples, iterations = BUDGET_LADDER[3]
    retrain = (fixed + solve_passes(samples, iterations)) / 0.1 / STEP_PASSES + 1  # GGN's rung 3
    ggn = plan(retrain, budget=0.1)
    hessian = plan(retrain, budget=0.1, curvature="hessian")
    assert (ggn.hessian_samples, ggn.max_iter) == (samples, iterations)
    assert HVP_PASSES["hessian"] > HVP_PASSES["ggn"]
    assert hessian.hessian_samples < ggn.hessian_samples  # the dearer product buys less
    assert hessian.predicted_passes <= hessian.allowed_passes


def test_rates_are_measured_once_per_machine_and_model_and_the_ratio_repeats(
    tmp_path, monkeypatch, digits_base
):
    config, model, data = in_memory(digits_base)
    settings = gifcli.Settings.from_config(config)
    settings.influence.hessian_samples, settings.influence.max_iter = 128, 3
    cache = tmp_path / "gif" / "rates.json"

    def run():
        result = gifcli.edit(
            model, gifcli.RemoveClass(classes=[3]), data, settings, rates_cache=cache
        )
        return result.report.cost

    first = run()
    assert not first.rates_cached and cache.is_file()

    def no_timing(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(gifcli.cost, "measure_rates", no_timing)
    reruns = [run() for _ in range(2)]
    assert all(cost.rates_cached for cost in reruns)
    # counts times cached rates: the same figure on every rerun, whatever the load
    assert {cost.retrain_ratio for cost in [first, *reruns]} == {first.retrain_ratio}
    assert all(cost.seconds["probe"] < 0.05 * cost.seconds["edit"] for cost in reruns)


def test_a_broken_or_foreign_cache_is_measured_around(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    sample = TensorSplit(torch.randn(40, 1, 8, 8), torch.arange(40) % 10)
    probe = Probe(train=TrainConfig(batch_size=16), batch_size=32, device=torch.device("cpu"))
    cache = tmp_path / "rates.json"
    cache.write_text("{not json")
    rates, cached = cached_rates(cache, model, sample, probe)
    assert not cached and rates.gradient > 0
    assert cached_rates(cache, model, sample, probe) == (rates, True)
    wider = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12)).eval()
    assert not cached_rates(cache, wider, sample, probe)[1]  # another model: its own
    assert len(json.loads(cache.read_text())) == 2
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert not cached_rates(blocked / "rates.json", model, sample, probe)[1]  # unwritable
