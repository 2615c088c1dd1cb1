"""Tests for resnet.config: the params.yaml schema, its one-line errors, overrides and dotted keys."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from resnet.config import (
    Config,
    ConfigError,
    FinetuneConfig,
    LogUniform,
    TuneConfig,
    load_config,
    parse_config,
    set_dotted,
)
from resnet.models import available_models

REPO_ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, raw: Any, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def _config_error(tmp_path: Path, raw: Any, overrides: dict[str, Any] | None = None) -> tuple[str, Path]:
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.startswith(f"{path}: "), message
    return message, path


def _assert_subset(raw: Any, dumped: Any, where: str = "") -> None:
    """Every key/value of the YAML mapping `raw` appears, equal, in the validated model dump."""
    if isinstance(raw, dict):
        assert isinstance(dumped, dict), where
        for key, value in raw.items():
            assert key in dumped, f"{where}.{key}"
            _assert_subset(value, dumped[key], f"{where}.{key}")
    else:
        assert dumped == raw, f"{where}: {dumped!r} != {raw!r}"


# ---------------------------------------------------------------- the repo's params.yaml and the defaults


def test_repo_params_file_loads_and_matches_its_yaml():
    path = REPO_ROOT / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.image_size == raw["data"]["image_size"]
    assert cfg.data.split.val == raw["data"]["split"]["val"]
    assert cfg.pretrain.model == raw["pretrain"]["model"]
    assert cfg.pretrain.epochs == raw["pretrain"]["epochs"]
    assert cfg.pretrain.lr == raw["pretrain"]["lr"]
    assert cfg.finetune.strategy == raw["finetune"]["strategy"]
    assert cfg.tune.metric == raw["tune"]["metric"]
    assert set(cfg.tune.search_space) == set(raw["tune"]["search_space"])
    assert cfg.register.model_name == raw["register"]["model_name"]
    # ...and every value written in the file survives validation unchanged.
    _assert_subset(raw, cfg.model_dump())


def test_default_config_validates_and_round_trips():
    cfg = Config()
    assert cfg.pretrain.model == "resnet20"
    assert cfg.pretrain.epochs == 6
    assert cfg.finetune.lr == 0.02
    assert cfg.data.split.val == 0.15 and cfg.data.split.test == 0.15
    assert cfg.tune.search_space == {}
    assert Config.model_validate(cfg.model_dump()) == cfg
    assert parse_config(None) == cfg
    assert parse_config({}) == cfg


def test_empty_params_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()


# ---------------------------------------------------------------- one-line errors naming the key and the file


def test_unknown_top_level_key(tmp_path):
    message, _ = _config_error(tmp_path, {"pretrian": {"epochs": 2}})
    assert "pretrian: unknown key" in message


def test_unknown_nested_key_is_named_dotted(tmp_path):
    message, path = _config_error(tmp_path, {"pretrain": {"lrr": 0.1}})
    assert message == f"{path}: pretrain.lrr: unknown key"


def test_unknown_deeply_nested_key(tmp_path):
    message, _ = _config_error(tmp_path, {"data": {"split": {"train": 0.7}}})
    assert "data.split.train: unknown key" in message


def test_wrong_type(tmp_path):
    message, _ = _config_error(tmp_path, {"pretrain": {"epochs": "many"}})
    assert "pretrain.epochs" in message
    assert "integer" in message
    assert "'many'" in message


@pytest.mark.parametrize(
    ("raw", "key", "got"),
    [
        ({"pretrain": {"lr": -1}}, "pretrain.lr", "-1"),
        ({"pretrain": {"epochs": 0}}, "pretrain.epochs", "0"),
        ({"data": {"split": {"val": 0.7}}}, "data.split.val", "0.7"),
        ({"data": {"image_size": 4}}, "data.image_size", "4"),
        ({"finetune": {"momentum": 1.0}}, "finetune.momentum", "1.0"),
        ({"tune": {"asha": {"reduction_factor": 1}}}, "tune.asha.reduction_factor", "1"),
    ],
)
def test_out_of_range(tmp_path, raw, key, got):
    message, _ = _config_error(tmp_path, raw)
    assert f": {key}: " in message
    assert f"(got {got})" in message


def test_several_errors_still_one_line_naming_the_first(tmp_path):
    message, _ = _config_error(tmp_path, {"pretrain": {"lr": -1, "epochs": 0}})
    assert "pretrain." in message
    assert message.endswith("(and 1 more error)")


def test_unknown_model_lists_valid_names(tmp_path):
    message, _ = _config_error(tmp_path, {"pretrain": {"model": "resnet7"}})
    assert "pretrain.model" in message
    assert "'resnet7'" in message
    for name in available_models():
        assert name in message


@pytest.mark.parametrize("section", ["pretrain", "finetune"])
def test_warmup_must_be_shorter_than_training(tmp_path, section):
    message, _ = _config_error(tmp_path, {section: {"epochs": 3, "warmup_epochs": 3}})
    assert f": {section}.warmup_epochs: must be less than epochs (3), got 3" in message
    # one fewer warmup epoch is fine
    cfg = load_config(_write(tmp_path, {section: {"epochs": 3, "warmup_epochs": 2}}))
    assert getattr(cfg, section).warmup_epochs == 2


def test_search_space_unknown_distribution(tmp_path):
    raw = {"tune": {"search_space": {"lr": {"distribution": "gauss", "low": 0.1, "high": 1}}}}
    message, _ = _config_error(tmp_path, raw)
    assert "tune.search_space.lr" in message
    assert "'gauss'" in message
    for name in ("loguniform", "uniform", "randint", "choice"):
        assert name in message


def test_search_space_loguniform_low_not_below_high(tmp_path):
    raw = {"tune": {"search_space": {"lr": {"distribution": "loguniform", "low": 0.1, "high": 0.01}}}}
    message, _ = _config_error(tmp_path, raw)
    assert "tune.search_space.lr" in message
    assert "low (0.1) must be less than high (0.01)" in message


def test_search_space_key_must_be_a_finetune_field(tmp_path):
    raw = {"tune": {"search_space": {"learning_rate": {"distribution": "choice", "values": [0.1]}}}}
    message, _ = _config_error(tmp_path, raw)
    assert "tune.search_space" in message
    assert "learning_rate" in message
    for field in FinetuneConfig.model_fields:
        assert field in message


def test_search_space_parses_distributions(tmp_path):
    raw = {
        "tune": {
            "search_space": {
                "lr": {"distribution": "loguniform", "low": 0.001, "high": 0.1},
                "strategy": {"distribution": "choice", "values": ["full", "linear_probe"]},
                "epochs": {"distribution": "randint", "low": 1, "high": 4},
            }
        }
    }
    space = load_config(_write(tmp_path, raw)).tune.search_space
    assert isinstance(space["lr"], LogUniform)
    assert (space["lr"].low, space["lr"].high) == (0.001, 0.1)
    assert space["strategy"].values == ["full", "linear_probe"]
    assert (space["epochs"].low, space["epochs"].high) == (1, 4)


def test_missing_params_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such params file"


def test_invalid_yaml(tmp_path):
    path = _write(tmp_path, "pretrain:\n  epochs: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not valid YAML")


def test_top_level_not_a_mapping(tmp_path):
    message, _ = _config_error(tmp_path, "- 1\n- 2\n")
    assert "expected a mapping of sections at the top level, got list" in message


@pytest.mark.parametrize("kind", ["directory", "not-utf8"])
def test_unreadable_params_file_is_a_config_error(tmp_path, kind):
    path = tmp_path / "params.yaml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe\x00pretrain: {}\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_boolean_is_not_an_integer(tmp_path):
    message, _ = _config_error(tmp_path, {"pretrain": {"epochs": True}})
    assert "pretrain.epochs: expected a number, got a boolean (true)" in message


# ---------------------------------------------------------------- overrides


def test_overrides_apply_and_are_validated(tmp_path):
    path = _write(tmp_path, {"pretrain": {"epochs": 5, "lr": 0.2}})
    cfg = load_config(
        path, overrides={"pretrain.epochs": 3, "data.split.val": 0.2, "tune.metric": "val_loss"}
    )
    assert cfg.pretrain.epochs == 3
    assert cfg.pretrain.lr == 0.2  # untouched keys of the same section survive
    assert cfg.data.split.val == 0.2
    assert cfg.data.split.test == 0.15
    assert cfg.tune.metric == "val_loss"
    # the file itself is not modified
    assert yaml.safe_load(path.read_text()) == {"pretrain": {"epochs": 5, "lr": 0.2}}


def test_invalid_override_is_rejected_naming_the_key(tmp_path):
    message, _ = _config_error(tmp_path, {"pretrain": {"epochs": 5}}, overrides={"pretrain.lr": -1})
    assert ": pretrain.lr: " in message


def test_unknown_override_key_is_rejected(tmp_path):
    message, _ = _config_error(tmp_path, {}, overrides={"pretrain.lrr": 0.1})
    assert "pretrain.lrr: unknown key" in message


def test_override_can_fix_a_bad_value(tmp_path):
    path = _write(tmp_path, {"pretrain": {"lr": -1}})
    assert load_config(path, overrides={"pretrain.lr": 0.3}).pretrain.lr == 0.3


def test_override_on_non_mapping_file_is_a_config_error(tmp_path):
    _config_error(tmp_path, "- 1\n- 2\n", overrides={"pretrain.epochs": 3})


# ---------------------------------------------------------------- small pieces


def test_tune_mode_follows_metric():
    assert TuneConfig(metric="val_acc").mode == "max"
    assert TuneConfig(metric="val_loss").mode == "min"
    assert TuneConfig().mode == "max"


def test_set_dotted_does_not_mutate_its_input():
    raw = {"a": {"b": 1, "c": {"d": 2}}, "e": [3]}
    before = copy.deepcopy(raw)
    out = set_dotted(raw, "a.c.d", 5)
    assert raw == before
    assert out == {"a": {"b": 1, "c": {"d": 5}}, "e": [3]}
    assert out is not raw and out["a"] is not raw["a"] and out["a"]["c"] is not raw["a"]["c"]


def test_set_dotted_creates_and_replaces_intermediate_mappings():
    assert set_dotted({}, "x.y.z", 1) == {"x": {"y": {"z": 1}}}
    assert set_dotted({"k": 1}, "k", {"v": 2}) == {"k": {"v": 2}}
    with pytest.raises(ValueError, match="cannot set x.y: x is 5, not a mapping"):
        set_dotted({"x": 5}, "x.y", 1)


def test_override_does_not_hide_a_section_that_is_not_a_mapping(tmp_path):
    message, path = _config_error(tmp_path, {"pretrain": 5}, {"pretrain.epochs": 3})
    assert message == f"{path}: cannot set pretrain.epochs: pretrain is 5, not a mapping"


def test_search_space_errors_name_keys_not_distribution_tags(tmp_path):
    space = {"lr": {"distribution": "loguniform", "low": 1, "high": 0.1}}
    message, _ = _config_error(tmp_path, {"tune": {"search_space": space}})
    assert ": tune.search_space.lr: low (1.0) must be less than high (0.1)" in message


def test_boolean_for_a_string_field_gets_the_string_message(tmp_path):
    message, _ = _config_error(tmp_path, {"ray": {"address": True}})
    assert ": ray.address: Input should be a valid string" in message


def test_sections_are_frozen():
    cfg = Config()
    with pytest.raises(Exception, match="frozen"):
        cfg.pretrain.epochs = 3  # type: ignore[misc]
