from pathlib import Path

import pytest
import yaml

from gifcli.config import (
    ALIAS_BUDGET,
    MAX_CONFIG_BYTES,
    Config,
    apply_overrides,
    build_config,
    load_config,
    reference,
    safe_yaml,
)
from gifcli.errors import GifError, UsageError

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, Config)


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"digits.yaml", "digits-backdoor.yaml", "mnist.yaml", "cifar10-resnet18.yaml"} <= names


def test_defaults_match_the_spec():
    config = build_config({})
    assert config.influence.method == "gif"
    assert config.influence.solver == "lsqr"
    assert config.selection.method == "top-outputs"
    assert config.update.scale is None  # the task's rule: auto, or 1.0 for remove-samples
    assert config.data.dataset == "digits"


def test_dotted_overrides_parse_values_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("selection: {ratio: 0.05}\n")
    config = load_config(
        path,
        [
            "selection.ratio=0.1",
            "removal.classes=[1,2]",
            "influence.solver=cg",
            "data.poison.rate=0.2",
        ],
    )
    assert config.selection.ratio == 0.1
    assert config.removal.classes == [1, 2]
    assert config.influence.solver == "cg"
    assert config.data.poison is not None and config.data.poison.rate == 0.2


def test_overrides_do_not_mutate_the_raw_mapping():
    raw = {"selection": {"ratio": 0.05}}
    apply_overrides(raw, ["selection.ratio=0.5"])
    assert raw == {"selection": {"ratio": 0.05}}


@pytest.mark.parametrize("override", ["selection.ratio", "=3", "a..b=1", "x=[1,"])
def test_malformed_override_is_a_usage_error_naming_it(tmp_path, override):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    with pytest.raises(UsageError, match="override"):
        load_config(path, [override])


def test_every_problem_is_reported_at_once_with_suggestions():
    with pytest.raises(GifError) as info:
        build_config(
            {
                "modle": {},
                "selection": {"ratio": 2.0, "methd": "random"},
                "influence": {"solver": "lsq", "max_iter": "many"},
                "removal": {"classes": [12]},
            }
        )
    message = str(info.value)
    assert "modle: unknown key; did you mean model?" in message
    assert "selection.methd: unknown key; did you mean selection.method?" in message
    assert "selection.ratio: must be in (0, 1]" in message
    assert "influence.solver: 'lsq' is not one of" in message and "did you mean 'lsqr'" in message
    assert "influence.max_iter: must be 'auto' or a positive integer, got 'many'" in message
    assert "removal.classes: class 12 is out of range" in message
    assert "6 problem(s)" in message


def test_ill_typed_values_name_the_key():
    with pytest.raises(GifError, match="train.epochs: expected an integer, got 1.5"):
        build_config({"train": {"epochs": 1.5}})
    with pytest.raises(GifError, match=r"removal.classes\[1\]: expected an integer"):
        build_config({"removal": {"classes": [1, "two"]}})
    with pytest.raises(GifError, match="data: expected a mapping"):
        build_config({"data": 3})


def test_integers_are_accepted_for_floats_but_not_booleans():
    assert build_config({"influence": {"damping": 0}}).influence.damping == 0.0
    with pytest.raises(GifError, match="influence.damping"):
        build_config({"influence": {"damping": True}})


def test_neumann_settings_reach_the_solver_only_for_neumann():
    config = build_config(
        {
            "influence": {
                "solver": "neumann",
                "neumann": {"scale": 2, "scale_step": 3, "absolute_tol": 1.0e-9},
            }
        }
    )
    assert config.influence.solver_options() == {
        "scale": 2.0,
        "scale_step": 3.0,
        "max_restarts": 1000,
        "absolute_tol": 1.0e-9,
    }
    assert build_config({"influence": {"solver": "lsqr"}}).influence.solver_options() == {}


def test_invalid_scope_neumann_and_gradient_samples_name_their_keys():
    with pytest.raises(GifError) as info:
        build_config(
            {
                "influence": {
                    "scope": "linear",
                    "neumann": {"scale": 0, "scale_step": ".inf", "max_restarts": -1},
                },
                "removal": {"gradient_samples": 0},
            }
        )
    message = str(info.value)
    assert "influence.scope: 'linear' is not one of linear-conv, all" in message
    assert "influence.neumann.scale: must be a finite number > 0, got 0.0" in message
    assert "influence.neumann.scale_step: expected a number" in message
    assert "influence.neumann.max_restarts: must be 0 or more" in message
    assert "removal.gradient_samples: must be positive or null" in message
    with pytest.raises(GifError, match="influence.neumann.absolute_tol: must be a finite"):
        build_config({"influence": {"neumann": {"absolute_tol": float("nan")}}})
    with pytest.raises(GifError, match="influence.neumann.scale_step: must be a finite"):
        build_config({"influence": {"neumann": {"scale_step": float("inf")}}})


def test_paper_scope_is_the_default():
    assert build_config({}).influence.scope == "linear-conv"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(GifError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(GifError, match=r"bad.yaml: malformed YAML at line"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(GifError, match="must be a YAML mapping"):
        load_config(scalar)


def test_trigger_name_or_mapping():
    config = build_config({"removal": {"trigger": "patch"}})
    assert config.removal.trigger.trigger == "patch"
    config = build_config({"removal": {"trigger": {"trigger": "patch", "size": 2}}})
    assert config.removal.trigger.size == 2
    with pytest.raises(GifError, match="removal.trigger.trigger"):
        build_config({"removal": {"trigger": "stars"}})


def test_resolved_config_round_trips_through_yaml():
    config = build_config({"data": {"poison": {"trigger": "patch", "target": 4}}})
    again = build_config(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_reference_documents_every_key():
    keys = {key for key, _, _ in reference()}
    assert {"influence.damping", "selection.ratio", "data.poison", "train.epochs"} <= keys
    assert all(help for _, _, help in reference())


def test_readme_config_reference_is_current():
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    missing = [key for key, _, _ in reference() if f"`{key}`" not in readme]
    assert not missing, f"README.md lacks {missing}: run scripts/config_reference.py"


def test_damping_is_no_shift_by_default_and_accepts_auto_numbers_and_relative():
    influence = build_config({}).influence
    assert (influence.damping, influence.damping_relative) == (0.0, False)
    assert (influence.damping_form, influence.gradient) == ("shift", "removal")
    assert influence.weight_decay is None  # the checkpoint's, else train.weight_decay
    assert build_config({"influence": {"damping": "auto"}}).influence.damping == "auto"
    relative = build_config({"influence": {"damping": 0.05, "damping_relative": True}})
    assert relative.influence.damping == 0.05 and relative.influence.damping_relative
    # YAML reads 1e-3 without a dot as a string; it is still a number here
    assert build_config({"influence": {"damping": "1e-3"}}).influence.damping == 1e-3
    auto = build_config({"influence": {"damping": "auto"}})
    assert build_config(yaml.safe_load(auto.to_yaml())) == auto


@pytest.mark.parametrize(
    ("influence", "message"),
    [
        ({"damping": "fast"}, "influence.damping: must be 'auto' or a number"),
        ({"damping": -1.0}, "influence.damping: must be a finite number >= 0"),
        ({"damping": float("inf")}, "influence.damping: must be a finite number"),
        ({"damping": "auto", "solver": "cg"}, "'auto' runs the lsqr regularisation path"),
        ({"damping": "auto", "method": "sif"}, "not sif"),
        ({"damping_relative": "yes"}, "influence.damping_relative: expected true/false"),
        ({"damping_points": 0}, "influence.damping_points: must be positive"),
        ({"damping_form": "lm"}, "influence.damping_form: 'lm' is not one of shift, tikhonov"),
        ({"gradient": "removed"}, "did you mean 'removal'"),
        ({"weight_decay": -1e-4}, "influence.weight_decay: must be 0 or more"),
        ({"retained_samples": 0}, "influence.retained_samples: must be positive or null"),
        ({"damping_min": 2.0}, "need 0 < damping_min <= damping_max"),
    ],
)
def test_bad_damping_settings_name_the_key(influence, message):
    with pytest.raises(GifError, match=message):
        build_config({"influence": influence})


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"update": {"scale": float("nan")}}, "update.scale: must be a finite number, got nan"),
        ({"update": {"scale": float("inf")}}, "update.scale: must be a finite number, got inf"),
        ({"update": {"scale": 0}}, "update.scale: must be positive"),
        ({"update": {"grid_max": float("inf")}}, "update.grid_max: must be a finite number"),
        ({"update": {"grid_points": 10**7}}, "update.grid_points: must be in 2..10000"),
        ({"train": {"lr": float("nan")}}, "train.lr: must be a finite number"),
        ({"influence": {"tol": float("nan")}}, "influence.tol: must be a finite number"),
        ({"influence": {"damping": 10**400}}, "influence.damping: must be a finite number"),
        ({"data": {"mean": [0.5, float("nan")]}}, r"data.mean\[1\]: must be a finite number"),
        ({"seed": -1}, "seed: must be in 0..4294967295, got -1"),
        ({"seed": 2**64}, "seed: 18446744073709551616 is out of range"),
        ({"data": {"poison": {"seed": 2**32}}}, "data.poison.seed: must be in 0..4294967295"),
        ({"model": {"num_classes": 10**12}}, "model.num_classes: must be in 2..100000"),
        ({"model": {"in_channels": 10**6}}, "model.in_channels: must be in 1..4096"),
        ({"data": {"image_size": 10**5}}, "data.image_size: must be in 1..4096"),
        ({"train": {"epochs": 10**30}}, "train.epochs: .* is out of range"),
        ({"removal": {"classes": list(range(200))}}, r"removal.classes: class 10 is out"),
    ],
)
def test_non_finite_and_out_of_range_values_are_refused_by_key(raw, message):
    with pytest.raises(GifError, match=message):
        build_config(raw)


def test_long_values_are_shown_cut_short():
    with pytest.raises(GifError) as info:
        build_config({"train": {"epochs": [1] * 10_000}})
    assert len(str(info.value)) < 200


def _alias_bomb(levels: int, fan_out: int) -> str:
    """A "billion laughs" document: each level repeats the previous one ``fan_out`` times."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * fan_out)}]"]
    for level in range(1, levels):
        repeated = ", ".join([f"*l{level - 1}"] * fan_out)
        lines.append(f"l{level}: &l{level} [{repeated}]")
    lines.append(f"removal: {{classes: *l{levels - 1}}}")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(levels=4, fan_out=20))  # 160,000 values from 1 kB
    with pytest.raises(GifError, match=f"aliases .* repeat more than {ALIAS_BUDGET:,} values"):
        load_config(path)


def test_a_nine_level_alias_bomb_costs_nothing_to_refuse():
    import time

    started = time.perf_counter()
    with pytest.raises(GifError, match="aliases"):
        safe_yaml(_alias_bomb(levels=9, fan_out=10), source="bomb")  # 10^9 values
    assert time.perf_counter() - started < 1.0


def test_aliases_within_the_budget_still_work():
    assert safe_yaml("a: &x {k: [1, 2]}\nb: *x\n", source="s") == {
        "a": {"k": [1, 2]},
        "b": {"k": [1, 2]},
    }


@pytest.mark.parametrize(
    "text,message",
    [
        ("a: &a [*a]\n", "refers to its own anchor"),
        ("a: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
        ("seed: 1" + "0" * 5000 + "\n", "a value cannot be read"),
    ],
    ids=["recursive alias", "deep nesting", "5000-digit integer"],
)
def test_hostile_yaml_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(GifError, match=message):
        load_config(path)


def test_overrides_are_read_with_the_same_budget(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    with pytest.raises(UsageError, match="refers to its own anchor"):
        load_config(path, ["removal.classes=&a [*a]"])


def test_a_config_larger_than_the_limit_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(GifError, match="a config is at most"):
        load_config(path)
