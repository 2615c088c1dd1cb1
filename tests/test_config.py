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
    DatasetConfig,
    LogUniform,
    TuneConfig,
    load_config,
    parse_config,
    searchable_section,
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
    assert set(cfg.datasets) == set(raw["datasets"]) == {"fractals", "digits"}
    for name, dataset in raw["datasets"].items():
        assert cfg.dataset(name).source == dataset["source"]
        assert cfg.dataset(name).image_size == dataset["image_size"]
        assert cfg.dataset(name).split.val == dataset["split"]["val"]
    assert cfg.pretrain.dataset == raw["pretrain"]["dataset"] == "fractals"
    assert cfg.finetune.dataset == raw["finetune"]["dataset"] == "digits"
    assert cfg.pretrain.model == raw["pretrain"]["model"]
    assert cfg.pretrain.epochs == raw["pretrain"]["epochs"]
    assert cfg.pretrain.lr == raw["pretrain"]["lr"]
    assert cfg.finetune.strategy == raw["finetune"]["strategy"]
    assert cfg.tune.metric == raw["tune"]["metric"]
    assert set(cfg.tune.search_space) == set(raw["tune"]["search_space"])
    assert cfg.register.model_name == raw["register"]["model_name"]
    # ...and every value written in the file survives validation unchanged.
    _assert_subset(raw, cfg.model_dump(mode="json"))  # (JSON: tuples as YAML lists)


def test_params_yaml_is_the_schema_defaults_written_out(repo_root):
    """One source of truth: every key the project's params.yaml sets has its schema default as value (the file
    documents the defaults; a default changed in one place and not the other fails here), so a run without a
    params file, or with a key left out, gets what params.yaml says."""
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert parse_config(raw) == Config()


def test_default_config_validates_and_round_trips():
    cfg = Config()
    assert cfg.pretrain.model == "resnet20"
    assert cfg.pretrain.epochs == 6
    assert cfg.finetune.lr == 0.02
    assert cfg.datasets == {
        "fractals": DatasetConfig(source="fractals", split={"val": 0.1, "test": 0.1}),
        "digits": DatasetConfig(source="digits"),
    }
    assert cfg.pretrain.dataset == "fractals" and cfg.finetune.dataset == "digits"
    digits = cfg.dataset("digits")
    assert (digits.image_size, digits.resize, digits.min_size, digits.max_rejected) == (
        32,
        "center_crop",
        8,
        0.05,
    )
    assert (digits.split.val, digits.split.test, digits.seed, digits.shard_size) == (0.15, 0.15, 0, 10_000)
    assert digits.path is None
    assert cfg.pretrain.loader == "memory" and cfg.finetune.loader == "memory"
    assert cfg.ray.data_cpus_per_worker == 0.25
    assert (cfg.augment.policy, cfg.augment.random_erasing, cfg.augment.mixup_alpha) == ("none", 0.0, 0.0)
    assert (cfg.augment.randaugment_num_ops, cfg.augment.randaugment_magnitude) == (2, 9)
    assert set(cfg.tune.search_space) == {
        "lr",
        "strategy",
        "lp_epochs",
        "lr_decay",
        "weight_decay",
        "label_smoothing",
        "mixup_alpha",
        "batch_size",
    }
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
    message, path = _config_error(
        tmp_path, {"datasets": {"digits": {"source": "digits", "split": {"train": 0.7}}}}
    )
    assert message == f"{path}: datasets.digits.split.train: unknown key"


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
        (
            {"datasets": {"digits": {"source": "digits", "split": {"val": 0.7}}}},
            "datasets.digits.split.val",
            "0.7",
        ),
        ({"datasets": {"digits": {"source": "digits", "image_size": 4}}}, "datasets.digits.image_size", "4"),
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


def test_search_space_key_must_be_a_finetune_or_augment_field(tmp_path):
    raw = {"tune": {"search_space": {"learning_rate": {"distribution": "choice", "values": [0.1]}}}}
    message, _ = _config_error(tmp_path, raw)
    assert "tune.search_space" in message
    assert "learning_rate" in message
    for field in ("lr", "strategy", "lp_epochs", "lr_decay", "mixup_alpha", "batch_size"):
        assert field in message


def test_search_space_draws_into_augment_too(tmp_path):
    space = {"mixup_alpha": {"distribution": "choice", "values": [0.0, 0.2]}}
    cfg = load_config(_write(tmp_path, {"tune": {"search_space": space}}))
    assert searchable_section("mixup_alpha") == "augment"
    assert searchable_section("lr_decay") == "finetune"
    assert searchable_section("model") == "finetune" and searchable_section("nope") is None
    assert cfg.tune.search_space["mixup_alpha"].values == [0.0, 0.2]


def test_search_space_integer_field_needs_an_integer_distribution(tmp_path):
    space = {"lp_epochs": {"distribution": "uniform", "low": 1, "high": 3}}
    message, _ = _config_error(tmp_path, {"tune": {"search_space": space}})
    assert message.endswith(
        "tune.search_space.lp_epochs: an integer field: expected randint or choice, got uniform"
    )


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        # a range end outside the field's own bounds
        (
            {"lr": {"distribution": "loguniform", "low": 0.01, "high": 20}},
            "tune.search_space: the draw lr=20.0 makes finetune.lr invalid: Input should be less than or equal to 10",
        ),
        # a value the field does not take
        (
            {"strategy": {"distribution": "choice", "values": ["full", "everything"]}},
            "tune.search_space: the draw strategy='everything' makes finetune.strategy invalid",
        ),
        # a combination: lp_ft needs lp_epochs < epochs
        (
            {
                "strategy": {"distribution": "choice", "values": ["full", "lp_ft"]},
                "lp_epochs": {"distribution": "randint", "low": 1, "high": 5},
            },
            "tune.search_space: the draw lp_epochs=4, strategy='lp_ft' makes finetune.lp_epochs invalid: "
            "lp_ft needs 1 <= lp_epochs < epochs (4), got 4",
        ),
        # a batch smaller than the workers of a trial
        (
            {"batch_size": {"distribution": "choice", "values": [1, 32]}},
            "tune.search_space: the draw batch_size=1 makes finetune.batch_size invalid: must be a multiple of "
            "the workers per trial × finetune.accumulate_steps (1 × 2 = 2)",
        ),
        # an augment field's bounds
        (
            {"mixup_alpha": {"distribution": "uniform", "low": -1, "high": 0.2}},
            "tune.search_space: the draw mixup_alpha=-1.0 makes augment.mixup_alpha invalid",
        ),
    ],
)
def test_search_space_every_corner_must_make_a_valid_config(tmp_path, space, expected):
    raw = {"finetune": {"epochs": 4, "accumulate_steps": 2}, "tune": {"search_space": space}}
    message, _ = _config_error(tmp_path, raw)
    assert expected in message


def test_search_space_batch_rule_uses_workers_per_trial(tmp_path):
    space = {"batch_size": {"distribution": "choice", "values": [2, 32]}}
    raw = {"ray": {"num_workers": 4}, "tune": {"workers_per_trial": 2, "search_space": space}}
    cfg = load_config(_write(tmp_path, raw))
    assert cfg.workers_per_trial == 2
    raw["tune"]["workers_per_trial"] = None  # then ray.num_workers (4) > 2
    message, _ = _config_error(tmp_path, raw)
    assert message.endswith(
        "tune.search_space: the draw batch_size=2 makes finetune.batch_size invalid: must be a multiple of the "
        "workers per trial × finetune.accumulate_steps (4 × 1 = 4), so that every worker's micro-batch is the "
        "same size, got 2"
    )


@pytest.mark.parametrize(
    ("finetune", "key", "fragment"),
    [
        ({"strategy": "lp_ft", "lp_epochs": 0}, "finetune.lp_epochs", "lp_ft needs 1 <= lp_epochs < epochs"),
        ({"strategy": "gradual", "lp_epochs": 4}, "finetune.lp_epochs", "gradual needs lp_epochs < epochs"),
        (
            {"schedule": "onecycle", "backbone_warmup_epochs": 1},
            "finetune.backbone_warmup_epochs",
            "onecycle has its own warmup",
        ),
        ({"pretrained": "none"}, "finetune.model", "required with pretrained: none"),
        ({"model": "resnet7"}, "finetune.model", "unknown model 'resnet7'"),
        ({"lr_decay": 0}, "finetune.lr_decay", "greater than 0"),
        ({"pretrained": "torchvision:resnet50.IMAGENET9"}, "finetune.pretrained", "IMAGENET9"),
    ],
)
def test_finetune_strategy_errors_name_the_key(tmp_path, finetune, key, fragment):
    message, _ = _config_error(tmp_path, {"finetune": {"epochs": 4} | finetune})
    assert f": {key}: " in message and fragment in message


def test_asha_grace_period_within_the_trial_length(tmp_path):
    message, _ = _config_error(tmp_path, {"finetune": {"epochs": 3}, "tune": {"asha": {"grace_period": 5}}})
    assert message.endswith(
        "tune.asha.grace_period: must be at most the trial length, finetune.epochs (3), got 5"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"finetune": {"epochs": 6}, "tune": {"asha": {"max_epochs": 4}}},
            "tune.asha.max_epochs: is the epoch at which a trial ends: must be null or finetune.epochs (6), got 4",
        ),
        (
            {"finetune": {"epochs": 6}, "tune": {"asha": {"max_epochs": 9}}},
            "tune.asha.max_epochs: is the epoch at which a trial ends: must be null or finetune.epochs (6), got 9",
        ),
        (
            {
                "tune": {
                    "asha": {"max_epochs": 6},
                    "search_space": {"epochs": {"distribution": "choice", "values": [4, 8]}},
                }
            },
            "tune.asha.max_epochs: is the epoch at which a trial ends: must be null or the largest epochs "
            "tune.search_space draws (8), got 6",
        ),
    ],
)
def test_asha_max_epochs_that_disagrees_with_the_trial_length_is_refused(tmp_path, raw, expected):
    raw["tune"].setdefault("search_space", {})
    message, _ = _config_error(tmp_path, raw)
    assert message.endswith(expected)
    raw["tune"]["asha"]["max_epochs"] = None
    assert load_config(_write(tmp_path, raw)) is not None


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("pretrained", "every trial starts from the weights the driver loads once; run one sweep per source"),
        (
            "model",
            "every trial starts from the weights the driver loads once; run one sweep per architecture",
        ),
        ("dataset", "every trial trains on the data the driver loads once; run one sweep per dataset"),
    ],
)
def test_search_space_refuses_keys_a_trial_could_not_use(tmp_path, key, reason):
    space = {key: {"distribution": "choice", "values": ["a", "b"]}}
    message, _ = _config_error(tmp_path, {"tune": {"search_space": space}})
    assert message.endswith(f"tune.search_space.{key}: cannot be swept: {reason}")


def test_a_drawn_loader_meets_the_whole_config_rules(tmp_path):
    """ray_data needs ray.data_cpus_per_worker < ray.cpus_per_worker: a rule of the whole config, checked for
    every draw too (it used to be skipped for drawn values)."""
    space = {"loader": {"distribution": "choice", "values": ["memory", "ray_data"]}}
    raw = {"ray": {"cpus_per_worker": 0.5, "data_cpus_per_worker": 0.5}, "tune": {"search_space": space}}
    message, _ = _config_error(tmp_path, raw)
    assert message.endswith(
        "tune.search_space: the draw loader='ray_data' makes ray.data_cpus_per_worker invalid: must be less "
        "than ray.cpus_per_worker (0.5) with a ray_data loader, got 0.5"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"pretrain": {"batch_size": 33}},
            "pretrain.batch_size: must be a multiple of ray.num_workers × pretrain.accumulate_steps (2 × 1 = 2), "
            "so that every worker's micro-batch is the same size, got 33",
        ),
        (
            {"pretrain": {"batch_size": 32, "accumulate_steps": 3}},
            "pretrain.batch_size: must be a multiple of ray.num_workers × pretrain.accumulate_steps (2 × 3 = 6), "
            "so that every worker's micro-batch is the same size, got 32",
        ),
        (
            {"finetune": {"batch_size": 30}, "tune": {"workers_per_trial": 4, "search_space": {}}},
            "finetune.batch_size: must be a multiple of the workers per trial × finetune.accumulate_steps "
            "(4 × 1 = 4), so that every worker's micro-batch is the same size, got 30",
        ),
    ],
)
def test_a_batch_that_does_not_split_evenly_is_refused_not_shrunk(tmp_path, raw, expected):
    message, _ = _config_error(tmp_path, raw)
    assert message.endswith(expected)


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
    cfg = load_config(path, overrides={"pretrain.epochs": 3, "tune.metric": "val_loss"})
    assert cfg.pretrain.epochs == 3
    assert cfg.pretrain.lr == 0.2  # untouched keys of the same section survive
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
    assert TuneConfig().mode == "min"  # the default metric is val_loss


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


# ---------------------------------------------------------------- datasets


TWO_DATASETS = {"fractals": {"source": "fractals"}, "digits": {"source": "digits"}}


def _datasets(**extra: Any) -> dict[str, Any]:
    """A params mapping whose datasets are the two the stages default to, plus `extra`."""
    return {"datasets": TWO_DATASETS | extra}


def test_overrides_reach_into_datasets_and_can_add_one(tmp_path):
    path = _write(tmp_path, _datasets())
    cfg = load_config(path, overrides={"datasets.digits.split.val": 0.2, "datasets.digits.shard_size": 500})
    assert cfg.dataset("digits").split.val == 0.2
    assert cfg.dataset("digits").split.test == 0.15  # untouched keys of the same dataset survive
    assert cfg.dataset("digits").shard_size == 500
    assert cfg.dataset("fractals") == DatasetConfig(source="fractals")
    added = load_config(
        path,
        overrides={"datasets.flowers.source": "imagefolder", "datasets.flowers.path": "s3://data/flowers"},
    )
    assert sorted(added.datasets) == ["digits", "flowers", "fractals"]
    assert added.dataset("flowers").path == "s3://data/flowers"
    message, path = _config_error(tmp_path, _datasets(), {"datasets.flowers.source": "imagefolder"})
    assert (
        message
        == f"{path}: datasets.flowers.path: required for source imagefolder (a directory or s3://bucket/prefix)"
    )


def test_the_old_data_section_is_an_unknown_key(tmp_path):
    message, path = _config_error(tmp_path, {"data": {"image_size": 16}})
    assert message == f"{path}: data: unknown key"


@pytest.mark.parametrize("name", ["digits", "cifar-10", "my_set", "0day", "a"])
def test_dataset_names_that_are_directory_and_stage_names(tmp_path, name):
    cfg = load_config(_write(tmp_path, _datasets(**{name: {"source": "digits"}})))
    assert cfg.dataset(name).source == "digits"


@pytest.mark.parametrize("name", ["Bad Name", "Digits", "-x", "_x", "a/b", "a.b", "ü", ""])
def test_dataset_name_must_be_lower_case_letters_digits_dash_underscore(tmp_path, name):
    message, path = _config_error(tmp_path, _datasets(**{name: {"source": "digits"}}))
    assert message == (
        f"{path}: datasets: dataset name {name!r}: expected a lower-case letter or digit, then lower-case "
        "letters, digits, - or _ (it names a directory and a DVC stage)"
    )


def test_dataset_name_with_a_trailing_newline_is_refused(tmp_path):
    message, _ = _config_error(tmp_path, _datasets(**{"digits\n": {"source": "digits"}}))
    assert "dataset name 'digits\\n'" in message


def test_at_least_one_dataset(tmp_path):
    message, path = _config_error(tmp_path, {"datasets": {}})
    assert message == f"{path}: datasets: expected at least one dataset"


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_stage_dataset_must_be_a_key_of_datasets(tmp_path, stage):
    message, path = _config_error(tmp_path, {stage: {"dataset": "imagenet"}})
    assert (
        message
        == f"{path}: {stage}.dataset: no dataset 'imagenet' in datasets (expected one of digits, fractals)"
    )
    cfg = load_config(
        _write(tmp_path, _datasets(imagenet={"source": "cifar100"}) | {stage: {"dataset": "imagenet"}})
    )
    assert getattr(cfg, stage).dataset == "imagenet"


def test_datasets_replace_the_defaults_so_the_stage_datasets_must_follow(tmp_path):
    message, path = _config_error(tmp_path, {"datasets": {"mine": {"source": "digits"}}})
    assert message == f"{path}: pretrain.dataset: no dataset 'fractals' in datasets (expected one of mine)"
    raw = {
        "datasets": {"mine": {"source": "digits"}},
        "pretrain": {"dataset": "mine"},
        "finetune": {"dataset": "mine"},
    }
    assert list(load_config(_write(tmp_path, raw)).datasets) == ["mine"]


def test_dataset_source_is_required_and_one_of_the_known(tmp_path):
    message, path = _config_error(tmp_path, _datasets(extra={"image_size": 16}))
    assert message == f"{path}: datasets.extra.source: Field required"
    message, path = _config_error(tmp_path, _datasets(extra={"source": "mnist"}))
    assert message == (
        f"{path}: datasets.extra.source: Input should be 'digits', 'fractals', 'cifar10', 'cifar100' or "
        "'imagefolder' (got 'mnist')"
    )


def test_imagefolder_requires_a_path(tmp_path):
    message, path = _config_error(tmp_path, _datasets(flowers={"source": "imagefolder"}))
    assert (
        message
        == f"{path}: datasets.flowers.path: required for source imagefolder (a directory or s3://bucket/prefix)"
    )
    message, path = _config_error(tmp_path, _datasets(flowers={"source": "imagefolder", "path": ""}))
    assert message.startswith(f"{path}: datasets.flowers.path: required for source imagefolder")


@pytest.mark.parametrize("source", ["digits", "fractals"])
def test_path_on_a_source_that_reads_no_files_is_an_error(tmp_path, source):
    message, path = _config_error(tmp_path, _datasets(mine={"source": source, "path": "data/raw"}))
    assert message == (
        f"{path}: datasets.mine.path: source {source} reads no files; path is for cifar10, cifar100, imagefolder"
    )


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("resize", "fit", "Input should be 'stretch', 'center_crop' or 'pad' (got 'fit')"),
        ("max_rejected", 1.5, "Input should be less than or equal to 1 (got 1.5)"),
        ("max_rejected", -0.1, "Input should be greater than or equal to 0 (got -0.1)"),
        ("shard_size", 0, "Input should be greater than or equal to 1 (got 0)"),
        ("shard_size", True, "expected a number, got a boolean (true)"),
        ("min_size", 0, "Input should be greater than or equal to 1 (got 0)"),
        ("image_size", 513, "Input should be less than or equal to 512 (got 513)"),
        ("seed", -1, "Input should be greater than or equal to 0 (got -1)"),
    ],
)
def test_dataset_fields_are_validated(tmp_path, field, value, expected):
    message, path = _config_error(tmp_path, _datasets(mine={"source": "digits", field: value}))
    assert message == f"{path}: datasets.mine.{field}: {expected}"


def test_dataset_that_is_not_a_mapping(tmp_path):
    message, path = _config_error(tmp_path, {"datasets": ["digits"]})
    assert message == f"{path}: datasets: Input should be a valid dictionary (got ['digits'])"


def test_config_dataset_names_the_known_datasets():
    cfg = Config()
    assert cfg.dataset("digits") is cfg.datasets["digits"]
    with pytest.raises(ConfigError) as info:
        cfg.dataset("nope")
    assert str(info.value) == "no dataset 'nope' in datasets (expected one of digits, fractals)"


def test_source_options_are_the_selected_sources_settings():
    assert DatasetConfig(source="digits").source_options() == {}
    fractals = DatasetConfig(source="fractals", fractals={"num_classes": 5, "per_class": 10})
    assert fractals.source_options() == {
        "num_classes": 5,
        "per_class": 10,
        "seed": 0,
        "points": 1500,
        "jitter": 0.1,
    }
    folder = DatasetConfig(source="imagefolder", path="s3://b/p", resize="pad", min_size=16)
    assert folder.source_options() == {"path": "s3://b/p", "resize": "pad", "min_size": 16}
    assert DatasetConfig(source="cifar10").source_options() == {"path": None}
    assert DatasetConfig(source="cifar100", path="c.tar.gz").source_options() == {"path": "c.tar.gz"}


# ---------------------------------------------------------------- loaders, Ray Data, augmentation


@pytest.mark.parametrize("section", ["pretrain", "finetune"])
def test_loader_is_memory_or_ray_data(tmp_path, section):
    assert (
        getattr(load_config(_write(tmp_path, {section: {"loader": "ray_data"}})), section).loader
        == "ray_data"
    )
    message, path = _config_error(tmp_path, {section: {"loader": "disk"}})
    assert message == f"{path}: {section}.loader: Input should be 'memory' or 'ray_data' (got 'disk')"


def test_data_cpus_per_worker_must_be_below_cpus_per_worker_with_a_ray_data_loader(tmp_path):
    streaming = {"pretrain": {"loader": "ray_data"}}
    message, path = _config_error(tmp_path, streaming | {"ray": {"data_cpus_per_worker": 1}})
    assert message == (
        f"{path}: ray.data_cpus_per_worker: must be less than ray.cpus_per_worker (1.0) with a ray_data loader, "
        "got 1.0"
    )
    streaming = {"finetune": {"loader": "ray_data"}}
    message, path = _config_error(
        tmp_path, streaming | {"ray": {"cpus_per_worker": 2, "data_cpus_per_worker": 2.5}}
    )
    assert message.endswith(
        "ray.data_cpus_per_worker: must be less than ray.cpus_per_worker (2.0) with a ray_data loader, got 2.5"
    )
    message, path = _config_error(tmp_path, {"ray": {"data_cpus_per_worker": 0}})
    assert message == f"{path}: ray.data_cpus_per_worker: Input should be greater than 0 (got 0)"
    # With the memory loader the share is unused, so a small worker is fine.
    assert load_config(_write(tmp_path, {"ray": {"cpus_per_worker": 0.25}})).ray.cpus_per_worker == 0.25
    cfg = load_config(_write(tmp_path, {"ray": {"cpus_per_worker": 2, "data_cpus_per_worker": 1.5}}))
    assert cfg.ray.data_cpus_per_worker == 1.5


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (
            "policy",
            "autoaugment",
            "Input should be 'none', 'trivialaugment' or 'randaugment' (got 'autoaugment')",
        ),
        ("randaugment_num_ops", 0, "Input should be greater than or equal to 1 (got 0)"),
        ("randaugment_magnitude", 31, "Input should be less than or equal to 30 (got 31)"),
        ("random_erasing", 1.5, "Input should be less than or equal to 1 (got 1.5)"),
        ("mixup_alpha", -1, "Input should be greater than or equal to 0 (got -1)"),
        ("cutmix_alpha", -0.5, "Input should be greater than or equal to 0 (got -0.5)"),
    ],
)
def test_augment_fields_are_validated(tmp_path, field, value, expected):
    message, path = _config_error(tmp_path, {"augment": {field: value}})
    assert message == f"{path}: augment.{field}: {expected}"


def test_augment_policy_settings_load(tmp_path):
    raw = {
        "augment": {
            "policy": "randaugment",
            "randaugment_num_ops": 3,
            "randaugment_magnitude": 12,
            "random_erasing": 0.25,
            "mixup_alpha": 0.2,
            "cutmix_alpha": 1.0,
        }
    }
    augment = load_config(_write(tmp_path, raw)).augment
    _assert_subset(raw["augment"], augment.model_dump())
