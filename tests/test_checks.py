"""``--check`` gates: the parser and evaluator on hand-written reports, then through the CLI
(exit 2 on a malformed check before any work, 3 on a failed check with the outputs written)."""

import json
import math

import pytest

from gifcli.checks import (
    NUMBER,
    OPEN,
    CheckError,
    Leaf,
    ListOf,
    edit_report_schema,
    evaluate_checks,
    evaluate_report_schema,
    parse_check,
    validate_checks,
)
from gifcli.cli.main import app
from gifcli.records import format_value
from gifcli.report import checks_markdown
from gifcli.tasks import RecoverBackdoor, RemoveClass, RemoveSamples
from tests.conftest import DIGITS

EDIT_REPORT = {
    "task": "remove-class",
    "method": "gif",
    "params": {"total": 1000, "changed": 40, "fraction": 0.04},
    "solver": {
        "name": "lsqr",
        "iterations": 20,
        "converged": True,
        "relative_residual": 0.01,
        "residual_history": [1.0, 0.1, 0.01],
    },
    "update": {"scale": 2.5, "relative_norm": None, "sweep": [{"scale": 0.1, "objective": 50.0}]},
    "metrics": {
        "before": {
            "forget_acc_test": 99.0,
            "retain_acc_test": 98.0,
            "f1": 1.0,
            "per_class_acc_test": [97.0, 99.0, 98.0, 99.0],
        },
        "after": {
            "forget_acc_test": 0.5,
            "retain_acc_test": 97.5,
            "f1": 98.7,
            "per_class_acc_test": [96.0, 98.0, 97.0, 0.0],
        },
        "oracle": {"forget_acc_test": 0.0, "retain_acc_test": 98.5, "f1": 99.2},
        "gap": {"forget_acc_test": 0.5, "retain_acc_test": 1.0, "f1": 0.5, "mean": 0.6667},
    },
}
EVALUATE_REPORT = {
    "task": "remove-class",
    "checkpoint": "m.safetensors",
    "sha256": "ab",
    "metrics": {"acc_test": 96.5, "per_class_acc_test": [95.0, 98.0]},
}


def check(text, report=EDIT_REPORT):
    [result] = evaluate_checks([parse_check(text)], report)
    assert "error" not in result, result
    return result


# -- operators, arithmetic, literals ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, passed",
    [
        ("after.f1 < 99", True),
        ("after.f1 < 98.7", False),
        ("after.f1 <= 98.7", True),
        ("after.f1 <= 98", False),
        ("after.f1 > 98", True),
        ("after.f1 > 98.7", False),
        ("after.f1 >= 98.7", True),
        ("after.f1 >= 99", False),
        ("params.changed == 40", True),
        ("params.changed == 41", False),
        ("params.changed != 41", True),
        ("params.changed != 40", False),
    ],
)
def test_each_operator(text, passed):
    assert check(text)["passed"] is passed


def test_result_holds_both_sides_and_the_expression_as_written():
    assert check("after.retain_acc_test>=before.retain_acc_test-1") == {
        "expression": "after.retain_acc_test>=before.retain_acc_test-1",
        "left": 97.5,
        "right": 97.0,
        "passed": True,
    }


@pytest.mark.parametrize(
    "text, left, right",
    [
        ("after.f1 - before.f1 >= 90", 97.7, 90),
        ("params.changed + 10 - 5 == 45", 45, 45),
        ("-params.changed < -39", -40, -39),
        ("params.fraction <= 5e-2", 0.04, 0.05),
        ("params.fraction<=.05", 0.04, 0.05),
        ("  gap.mean   <=   2  ", 0.6667, 2),
    ],
)
def test_arithmetic_and_number_forms(text, left, right):
    result = check(text)
    assert result["left"] == pytest.approx(left) and result["right"] == pytest.approx(right)
    assert result["passed"]


def test_booleans_compare_with_equality():
    assert check("solver.converged==true")["passed"]
    assert check("solver.converged!=false")["passed"]
    assert not check("solver.converged==false")["passed"]
    assert check("solver.converged==true")["left"] is True


# -- path forms ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("after.forget_acc_test<=1", 0.5),  # metrics shorthand
        ("before.forget_acc_test<=100", 99.0),
        ("oracle.retain_acc_test<=100", 98.5),
        ("gap.mean<=2", 0.6667),
        ("metrics.after.forget_acc_test<=1", 0.5),  # the full path
        ("params.fraction<=0.05", 0.04),  # from the root
        ("update.scale<=10", 2.5),
        ("after.per_class_acc_test.3<=1", 0.0),  # a list index
        ("solver.residual_history.2<=1", 0.01),
        ("update.sweep.0.objective<=100", 50.0),
    ],
)
def test_edit_report_paths(text, value):
    assert check(text)["left"] == value


@pytest.mark.parametrize(
    "text", ["acc_test>=90", "metrics.acc_test>=90", "per_class_acc_test.1>=90"]
)
def test_evaluate_report_paths(text):
    assert check(text, EVALUATE_REPORT)["passed"]


# -- malformed checks: usage errors that name the expression -------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty check"),
        ("after.f1", "expected a comparison"),
        ("after.f1 <=", "expected a number, true, false or a report path at the end"),
        ("after.f1 = 1", "compare with '=='"),
        ("after.f1 =< 1", "compare with '=='"),
        ("after.f1 <== 1", "unexpected '='"),
        ("1 < after.f1 < 2", "expected the end of the check, found '<' at column 14"),
        ("after.f1 <= 1 2", "found '2'"),
        ("after..f1 <= 1", "unexpected '.' at column 6"),
        ("after.f1 <= 1%", "unexpected '%'"),
        ("len(after) > 1", "unexpected '('"),
        ("__import__('os') == 1", "unexpected '('"),
        ("after.f1 * 2 <= 1", "unexpected '*'"),
        ("true <= false", "booleans compare only with == or !="),
        ("true + 1 == 2", "booleans take no arithmetic"),
        ("-true == false", "cannot be negated"),
        ("1 == true", "compares a boolean with a number"),
    ],
)
def test_malformed_checks_are_rejected(text, message):
    with pytest.raises(CheckError) as error:
        parse_check(text)
    assert message in str(error.value)
    assert repr(text) in str(error.value)


# -- paths checked against the report's structure before a run -----------------------------------


def validate(text, schema=None):
    schema = schema or edit_report_schema(RemoveClass.metric_keys, oracle=False)
    validate_checks([parse_check(text)], schema)


@pytest.mark.parametrize(
    "text",
    [
        "after.forget_acc_test<=1",
        "after.retain_acc_test>=before.retain_acc_test-1",
        "params.fraction<=0.05",
        "solver.converged==true",
        "update.scale<=10",
        "after.per_class_acc_test.3<=1",
        "update.sweep.4.objective>0",
        "cost.seconds.solve<60",
        "metrics.before.mia_efficacy<=10",
    ],
)
def test_known_paths_pass_validation(text):
    validate(text)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "after.forget_acc<=1",
            "unknown report path 'metrics.after.forget_acc': metrics.after has "
            "no 'forget_acc'; it has forget_acc_test",
        ),
        (
            "parms.fraction<=1",
            "unknown report path 'parms.fraction': neither the report nor its metrics have 'parms'",
        ),
        ("gap.mean<=2", "(oracle and gap need --oracle)"),
        (
            "after.per_class_acc_test<=1",
            "is a list; add an index, e.g. metrics.after.per_class_acc_test.0",
        ),
        ("after<=1", "is a group of values; add one of forget_acc_test"),
        ("task==1", "'task' is text"),
        ("params.fraction.x<=1", "params.fraction is a single value"),
        ("solver.converged>=1", "booleans compare only with == or !="),
        ("solver.converged==1", "compares a boolean with a number"),
        ("after.asr_test<=5", "metrics.after has no 'asr_test'"),
    ],
)
def test_unknown_paths_and_kinds_fail_validation(text, message):
    with pytest.raises(CheckError) as error:
        validate(text)
    assert message in str(error.value)
    assert repr(text) in str(error.value)


def test_schemas_follow_task_and_oracle():
    backdoor = edit_report_schema(RecoverBackdoor.metric_keys, oracle=True)
    validate("after.asr_test<=5", backdoor)
    validate("gap.mean<=2", backdoor)
    validate("oracle.robust_acc_test>=90", backdoor)
    validate("acc_test>=90", evaluate_report_schema(RemoveClass.metric_keys))
    with pytest.raises(CheckError, match="nor its metrics have 'before'"):
        validate("before.acc_test>=90", evaluate_report_schema(RemoveClass.metric_keys))


def test_fidelity_and_salun_paths_exist_where_the_report_has_them():
    with_oracle = edit_report_schema(RemoveSamples.metric_keys, oracle=True, salun=True)
    for check in (
        "after.kl_oracle_test<=before.kl_oracle_test",
        "after.agree_oracle_removed>=95",
        "gap.kl_oracle_removed<=0.1",
        "oracle.agree_oracle_test==100",
        "salun.gap.mean<=2",
        "salun.after.ua>=salun.oracle.ua-1",
        "salun.before.mia_efficacy>=0",
    ):
        validate(check, with_oracle)
    without = edit_report_schema(RemoveSamples.metric_keys, oracle=False, salun=True)
    validate("salun.after.ta>=90", without)
    for check, message in (
        ("after.kl_oracle_test<=1", "has no 'kl_oracle_test'"),
        ("salun.gap.mean<=2", "has no 'gap'"),
    ):
        with pytest.raises(CheckError, match=message):
            validate(check, without)
    backdoor = edit_report_schema(RecoverBackdoor.metric_keys, oracle=True)
    validate("after.kl_oracle_removed<=1", backdoor)
    with pytest.raises(CheckError, match="'salun'"):
        validate("salun.after.ua>=0", backdoor)
    validate("salun.ua>=0", evaluate_report_schema(RemoveClass.metric_keys, salun=True))
    with pytest.raises(CheckError, match="'salun'"):
        validate("salun.ua>=0", evaluate_report_schema(RecoverBackdoor.metric_keys))


# -- after a run: what the schema cannot know ------------------------------------------------------


def test_out_of_range_index_is_an_error_in_the_result():
    [result] = evaluate_checks([parse_check("after.per_class_acc_test.9<=1")], EDIT_REPORT)
    assert result["passed"] is False
    assert "metrics.after.per_class_acc_test has indices 0 to 3" in result["error"]


def test_missing_value_fails_the_check():
    result = check("update.relative_norm<=1")
    assert result == {
        "expression": "update.relative_norm<=1",
        "left": None,
        "right": 1,
        "passed": False,
    }


def test_nan_fails_every_comparison_but_not_equal():
    report = {"metrics": {"gap": {"mean": math.nan}}}
    assert not check("gap.mean<=2", report)["passed"]
    assert check("gap.mean!=2", report)["passed"]


def test_values_and_markdown_read_like_checks():
    assert [format_value(v) for v in (True, False, 3, 0.0401234567, None, math.nan)] == [
        "true",
        "false",
        "3",
        "0.0401235",
        "n/a",
        "nan",
    ]
    results = evaluate_checks(
        [parse_check("after.f1>=99"), parse_check("gap.mean<=2")], EDIT_REPORT
    )
    text = "\n".join(checks_markdown(results))
    assert "1 of 2 failed" in text
    assert "| `after.f1>=99` | 98.7 | 99 | FAIL |" in text
    assert "| `gap.mean<=2` | 0.6667 | 2 | pass |" in text
    assert checks_markdown([]) == []


def assert_report_matches_schema(report: dict, schema: dict, where: str = "report") -> None:
    """Every key of a real report is in the schema and every schema key in the report, with
    numbers where the schema says number (keeps ``edit_report_schema`` honest)."""
    assert set(report) == set(schema), where
    for key, node in schema.items():
        value, path = report[key], f"{where}.{key}"
        if isinstance(node, dict):
            assert_report_matches_schema(value, node, path)
        elif isinstance(node, ListOf):
            assert isinstance(value, list), path
            if node.item is NUMBER:
                assert all(isinstance(v, int | float) for v in value), path
        elif node is NUMBER:
            assert value is None or isinstance(value, int | float), path
        elif isinstance(node, Leaf) and node is not OPEN:
            assert value is None or isinstance(value, bool | str), path


# -- through the CLI -------------------------------------------------------------------------------


def run(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


FAST_EDIT = ["influence.hessian_samples=128", "influence.max_iter=5", "update.grid_points=12"]


@pytest.mark.parametrize("command", [[], ["remove-class"], ["recover-backdoor"], ["evaluate"]])
def test_help_documents_check_and_exit_codes(runner, command):
    result = run(runner, *command, "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    if command == ["evaluate"]:  # writes nothing
        assert "3 the metrics were measured (and printed), but a --check failed" in text
    else:
        assert "3 the run finished and wrote its outputs, but a --check failed" in text
    assert "<bool>" not in text  # a flag takes no value
    if command:
        assert "--check" in text and "--quiet" in text
        assert f"Usage: gif {command[0]} [OPTIONS] CONFIG [KEY=VALUE]..." in text


@pytest.mark.parametrize(
    "command",
    [
        ["remove-class", DIGITS],
        ["recover-backdoor", DIGITS],
        ["evaluate", DIGITS, "-c", "none.safetensors"],
    ],
    ids=["remove-class", "recover-backdoor", "evaluate"],
)
def test_malformed_check_exits_2_before_any_work(runner, tmp_path, command):
    result = run(
        runner,
        *command,
        "checkpoint=none.safetensors",
        f"output.dir={tmp_path}/out",
        "--check",
        "after.forget_acc_test<=1",
        "--check",
        "after.f1 =< 1",
    )
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output and "after.f1 =< 1" in result.output
    assert not (tmp_path / "out").exists()


def test_unknown_path_exits_2_before_the_run(runner, tmp_path):
    # the checkpoint does not exist: had the run started, it would have exited 1
    result = run(
        runner,
        "remove-class",
        DIGITS,
        f"checkpoint={tmp_path}/none.safetensors",
        f"output.dir={tmp_path}/out",
        "--check",
        "oracle.f1>=90",
    )
    assert result.exit_code == 2, result.output
    assert "oracle.f1" in result.output and "need --oracle" in result.output


def test_evaluate_checks_pass_fail_and_json(runner, digits_base):
    args = ["evaluate", DIGITS, "-c", digits_base]
    passed = run(
        runner,
        *args,
        "--check",
        "acc_test>=90",
        "--check",
        "per_class_acc_test.3>=80",
        "--check",
        "salun.ua<=1",
    )
    assert passed.exit_code == 0, passed.output
    assert "checks" in passed.stderr and "pass" in passed.stderr
    assert "salun.ra" in passed.stderr, "the protocol is in the table"

    failed = run(
        runner, *args, "--json", "--check", "metrics.acc_test>=90", "--check", "forget_acc_test<=1"
    )
    assert failed.exit_code == 3, failed.output
    report = json.loads(failed.stdout)
    assert report["salun"] == {
        "ua": 100 - report["metrics"]["forget_acc_train"],
        "ra": report["metrics"]["retain_acc_train"],
        "ta": report["metrics"]["retain_acc_test"],
        "mia_efficacy": report["metrics"]["mia_efficacy"],
    }
    assert [c["passed"] for c in report["checks"]] == [True, False]
    assert report["checks"][1]["expression"] == "forget_acc_test<=1"
    assert "check failed: forget_acc_test<=1" in failed.stderr


def test_evaluate_quiet_prints_only_failed_checks(runner, digits_base):
    args = ["evaluate", DIGITS, "-c", digits_base, "--quiet"]
    quiet = run(runner, *args, "--check", "acc_test>=90")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output == ""
    failed = run(runner, *args, "--check", "acc_test>=90", "--check", "acc_test>100")
    assert failed.exit_code == 3, failed.output
    assert failed.stdout == ""
    [line] = failed.stderr.strip().splitlines()
    assert line.startswith("check failed: acc_test>100 (left ") and line.endswith(", right 100)")


def test_evaluate_index_out_of_range_exits_2_naming_it(runner, digits_base):
    result = run(
        runner, "evaluate", DIGITS, "-c", digits_base, "--check", "per_class_acc_test.10>=0"
    )
    assert result.exit_code == 2, result.output
    assert "metrics.per_class_acc_test.10" in result.output
    assert "indices 0 to 9" in result.output


@pytest.mark.slow
def test_failed_check_exits_3_with_outputs_written(runner, tmp_path, digits_base):
    out = tmp_path / "out"
    result = run(
        runner,
        "remove-class",
        DIGITS,
        f"checkpoint={digits_base}",
        f"output.dir={out}",
        *FAST_EDIT,
        "--oracle",
        digits_base,
        "--check",
        "after.forget_acc_test<=100",
        "--check",
        "gap.mean>=0",
        "--check",
        "params.fraction<=0",
        "--check",
        "after.retain_acc_test>=before.retain_acc_test-100",
    )
    assert result.exit_code == 3, result.output
    for name in (
        "model.safetensors",
        "mask.safetensors",
        "report.json",
        "report.md",
        "config.yaml",
    ):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert [c["passed"] for c in report["checks"]] == [True, True, False, True]
    assert report["checks"][2]["left"] == report["params"]["fraction"]
    assert "| `params.fraction<=0` |" in (out / "report.md").read_text()
    assert "1 of 4 checks failed" in result.stderr
    assert "step search" not in result.output, "no progress bars when not a terminal"
    assert "\x1b[" not in result.output
    schema = edit_report_schema(RemoveClass.metric_keys, oracle=True, salun=True)
    assert_report_matches_schema({k: v for k, v in report.items() if k != "checks"}, schema)
