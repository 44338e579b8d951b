from pathlib import Path

import pytest
import yaml

from gifcli.config import Config, apply_overrides, build_config, load_config, reference
from gifcli.errors import GifError

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
    assert config.update.scale == "auto"
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
def test_malformed_override_is_an_error_naming_it(tmp_path, override):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    with pytest.raises(GifError, match="override"):
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
    assert "influence.max_iter: expected an integer" in message
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
