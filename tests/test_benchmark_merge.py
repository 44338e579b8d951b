"""``--merge`` of the task benchmarks: rerun rows replace stored ones only on the same models."""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("benchmark_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_common"] = module
    spec.loader.exec_module(module)
    return module


def _run(metrics: float) -> dict:
    return {"metrics": {"f1": metrics}, "seconds": 1.0}


def _results(seed_metrics: dict, methods: dict, before: float = 99.0) -> dict:
    return {
        "command": "old",
        "methods": list(methods),
        "seeds": list(seed_metrics),
        "machine": {"cpus": 2},
        "settings": {"solver": "lsqr", "parameters": 10},
        "per_seed": [
            {
                "seed": seed,
                "before": {"f1": before},
                "oracle_metrics": {"f1": 98.0},
                "methods": {m: _run(v + seed) for m, v in methods.items()},
                "table1": {"random": {"0.05": _run(1.0)}},
            }
            for seed in seed_metrics
        ],
    }


def test_merge_replaces_only_the_rerun_rows_and_records_the_rerun(common):
    stored = _results({0: None, 1: None}, {"gif": 90.0, "sif": 10.0})
    rerun = _results({0: None, 1: None}, {"sif": 80.0})
    rerun["per_seed"][0]["table1"] = {}  # --selections none
    rerun["per_seed"][1]["table1"] = {}
    rerun["command"] = "new"
    merged = common.merge(copy.deepcopy(stored), rerun)
    for seed in (0, 1):
        methods = merged["per_seed"][seed]["methods"]
        assert methods["sif"]["metrics"]["f1"] == 80.0 + seed
        assert methods["gif"] == stored["per_seed"][seed]["methods"]["gif"]
        assert merged["per_seed"][seed]["table1"] == stored["per_seed"][seed]["table1"]
    assert merged["methods"] == ["gif", "sif"]
    assert merged["command"] == "old" and merged["reruns"][0]["command"] == "new"


def test_merge_refuses_other_base_models_or_settings(common):
    stored = _results({0: None}, {"gif": 90.0, "sif": 10.0})
    with pytest.raises(SystemExit, match="before metrics differ"):
        common.merge(copy.deepcopy(stored), _results({0: None}, {"sif": 80.0}, before=98.5))
    other = _results({0: None}, {"sif": 80.0})
    other["settings"]["solver"] = "cg"
    with pytest.raises(SystemExit, match="settings differ"):
        common.merge(copy.deepcopy(stored), other)
    with pytest.raises(SystemExit, match="seed 3 is not in the stored results"):
        common.merge(copy.deepcopy(stored), _results({3: None}, {"sif": 80.0}))


def _fidelity(kl: float, agree: float) -> dict:
    return {
        "kl_oracle_test": kl,
        "kl_oracle_removed": 2 * kl,
        "agree_oracle_test": agree,
        "agree_oracle_removed": agree - 10,
    }


def test_fidelity_verdict_pairs_the_corrected_step_with_first_order(common):
    """Per seed: gif-corrected's KL is below first-order's by 0.01 and 0.03 (mean 0.02, std
    0.014: closer); its agreement is 1 and 3 points lower (farther), paired over seeds."""
    runs = {
        "gif-corrected": [_fidelity(0.02, 96.0), _fidelity(0.01, 95.0)],
        "first-order": [_fidelity(0.03, 97.0), _fidelity(0.04, 98.0)],
    }
    text = common.fidelity_verdict(runs.__getitem__, list(runs))
    assert "KL test: closest `gif-corrected` (0.015 ± 0.0071)" in text
    assert "`gif-corrected` closer to retraining than `first-order` (-0.02 ± 0.014 paired)" in text
    assert "agree test: closest `first-order` (97.5 ± 0.7)" in text
    assert "`gif-corrected` farther from retraining than `first-order` (-2 ± 1.4 paired)" in text
    without = {"gif": [{"f1": 1.0}]}
    assert common.fidelity_verdict(without.__getitem__, ["gif"]) == ""
