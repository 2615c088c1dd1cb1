"""`resnet-pipeline`: stage subcommands, their help, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from resnet.cli import STAGES, main
from resnet.data.prepare import read_shard


def test_top_level_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for stage in (*STAGES, "all"):
        assert f"  {stage} " in out


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_help_with_the_common_options(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"resnet-pipeline {stage}" in out and "--params" in out and "--set" in out


def test_version_and_unknown_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "resnet-pipeline 0.1.0" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["bake"])
    assert exit_info.value.code == 2 and "invalid choice: 'bake'" in capsys.readouterr().err


def test_bad_params_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"pretrain": {"lr": -1}}))
    assert main(["prepare", "--params", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"resnet-pipeline prepare: error: {bad}: pretrain.lr: Input should be greater than 0 (got -1)"
    ]
    assert not (tmp_path / "out").exists()


def test_invalid_override_is_rejected(tmp_path, capsys, repo_root):
    params = str(repo_root / "params.yaml")
    argv = ["prepare", "--params", params, "-S", "datasets.digits.image_size=4", "--dataset", "digits"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"resnet-pipeline prepare: error: {params}: datasets.digits.image_size: "
        "Input should be greater than or equal to 8 (got 4)"
    ]
    assert list(tmp_path.iterdir()) == []


# digits (1,797 images) with params.yaml's split (0.15, 0.15), per class: 26 or 27 val and test images each.
DIGITS_COUNTS = {"train": 1259, "val": 269, "test": 269}


def test_prepare_writes_the_dataset_with_overrides(tmp_path, repo_root, capsys, monkeypatch):
    monkeypatch.setenv("RESNET_PROGRESS", "0")
    out, metrics = tmp_path / "prepared", tmp_path / "metrics" / "digits.json"
    argv = ["prepare", "--params", str(repo_root / "params.yaml"), "--dataset", "digits"]
    argv += ["-S", "datasets.digits.image_size=16", "-S", "datasets.digits.shard_size=500"]
    assert main([*argv, "--out", str(out), "--metrics", str(metrics)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_shape"] == [16, 16, 3] and manifest["classes"] == [str(i) for i in range(10)]
    assert {s: manifest["counts"][s]["total"] for s in DIGITS_COUNTS} == DIGITS_COUNTS
    assert manifest["counts"]["val"]["per_class"] == {str(i): 26 if i == 8 else 27 for i in range(10)}
    assert sorted(manifest["files"]) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet",
        "val-00000-of-00001.parquet",
    ]
    assert [manifest["files"][f"train-0000{i}-of-00003.parquet"]["rows"] for i in range(3)] == [500, 500, 259]
    assert json.loads(metrics.read_text()) == {
        "classes": 10,
        "images": DIGITS_COUNTS,
        "rejected": 0,
        "scanned": 1797,
        "content_hash": manifest["content_hash"],
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "prepared"]
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "prepare digits: digits at 16px"
    assert lines[1] == "class   train     val    test"
    assert lines[-2] == "total    1259     269     269"
    assert lines[-1] == (f"prepare digits: 5 shards → {out}, content hash {manifest['content_hash'][:16]}…")
    assert captured.err == ""


def test_missing_model_file_is_named(tmp_path, repo_root, capsys):
    missing = tmp_path / "nothing.pt"
    argv = [
        "evaluate",
        "--params",
        str(repo_root / "params.yaml"),
        "--model",
        str(missing),
        "--data",
        str(tmp_path),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "no such model file" in err[0]


def test_console_script_is_installed(repo_root):
    script = Path(sys.executable).parent / "resnet-pipeline"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, cwd=repo_root, timeout=60
    )
    assert result.returncode == 0 and "prepare" in result.stdout
    module = subprocess.run(
        [sys.executable, "-m", "pipelines.tune", "--help"],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=60,
    )
    assert module.returncode == 0 and "--pretrained" in module.stdout


def _module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnet.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_module_entry_point_help_version_and_unknown_stage(repo_root):
    from resnet import __version__

    helped = _module("--help", cwd=repo_root)
    assert helped.returncode == 0, helped.stderr
    listed = [
        line.split()[0] for line in helped.stdout.split("stages, in order:")[1].splitlines() if line.strip()
    ]
    assert listed[: len(STAGES) + 1] == [*STAGES, "all"]
    version = _module("--version", cwd=repo_root)
    assert (version.returncode, version.stdout.strip()) == (0, f"resnet-pipeline {__version__}")
    unknown = _module("bake", cwd=repo_root)
    assert unknown.returncode == 2 and "invalid choice: 'bake'" in unknown.stderr and unknown.stdout == ""
    nothing = _module(cwd=repo_root)
    assert nothing.returncode == 2 and "required: stage" in nothing.stderr


def test_stage_help_through_the_module_entry_point(repo_root):
    result = _module("tune", "--help", cwd=repo_root)
    assert result.returncode == 0
    assert "--params" in result.stdout and "--pretrained" in result.stdout and "Ray Tune" in result.stdout


def test_console_script_runs_from_any_directory(tmp_path):
    script = Path(sys.executable).parent / "resnet-pipeline"
    assert script.is_file()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert all(stage in result.stdout for stage in STAGES)
    assert list(tmp_path.iterdir()) == []


# One dataset, named for the stages that default to other names.
ONE_DATASET = """\
datasets:
  digits: {source: digits, image_size: 16}
pretrain: {dataset: digits}
"""

# Two small datasets: digits at their native 8 px and a tiny fractal set.
TWO_DATASETS = """\
datasets:
  digits: {source: digits, image_size: 8}
  fractals:
    source: fractals
    image_size: 16
    fractals: {num_classes: 3, per_class: 10, points: 200}
"""


def test_prepare_from_a_params_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESNET_PROGRESS", "0")
    params = tmp_path / "params.yaml"
    params.write_text(ONE_DATASET)
    out = tmp_path / "prepared"
    assert main(["prepare", "--params", str(params), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_shape"] == [16, 16, 3] and manifest["source"] == "digits"
    assert sum(manifest["counts"][s]["total"] for s in ("train", "val", "test")) == 1797
    images, labels = read_shard(out / "train-00000-of-00001.parquet")
    assert images.shape == (manifest["counts"]["train"]["total"], 16, 16, 3) and len(labels) == len(images)
    captured = capsys.readouterr()
    assert captured.err == "" and "total    1259     269     269" in captured.out
    # the metrics file goes to its default, relative to the working directory
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "metrics/prepare/digits.json",
        "params.yaml",
        "prepared/manifest.json",
        "prepared/test-00000-of-00001.parquet",
        "prepared/train-00000-of-00001.parquet",
        "prepared/val-00000-of-00001.parquet",
    ]


def test_prepare_builds_every_dataset_to_its_default_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(TWO_DATASETS)
    assert main(["prepare"]) == 0
    shards = ["manifest.json", *(f"{s}-00000-of-00001.parquet" for s in ("test", "train", "val"))]
    for name in ("digits", "fractals"):
        assert sorted(p.name for p in (tmp_path / "data" / "prepared" / name).iterdir()) == shards
    assert sorted(p.name for p in (tmp_path / "metrics" / "prepare").iterdir()) == [
        "digits.json",
        "fractals.json",
    ]
    digits = json.loads((tmp_path / "metrics" / "prepare" / "digits.json").read_text())
    fractals = json.loads((tmp_path / "metrics" / "prepare" / "fractals.json").read_text())
    assert (digits["classes"], digits["images"], digits["scanned"]) == (10, DIGITS_COUNTS, 1797)
    # 10 per class at params' default split (0.15, 0.15): 2 test, 2 val, 6 train per class
    assert (fractals["classes"], fractals["images"]) == (3, {"train": 18, "val": 6, "test": 6})
    manifest = json.loads((tmp_path / "data" / "prepared" / "fractals" / "manifest.json").read_text())
    assert manifest["image_shape"] == [16, 16, 3] and manifest["content_hash"] == fractals["content_hash"]
    out = capsys.readouterr().out
    assert out.index("prepare digits: digits at 8px") < out.index("prepare fractals: fractals at 16px")
    assert "prepare fractals: 3 shards → data/prepared/fractals" in out

    # --dataset picks one; the other dataset's files are left as they were
    before = (tmp_path / "metrics" / "prepare" / "digits.json").stat().st_mtime_ns
    assert main(["prepare", "--dataset", "fractals", "-S", "datasets.fractals.seed=1"]) == 0
    again = json.loads((tmp_path / "metrics" / "prepare" / "fractals.json").read_text())
    assert again["content_hash"] != fractals["content_hash"] and again["images"] == fractals["images"]
    assert (tmp_path / "metrics" / "prepare" / "digits.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("option", ["--out", "--metrics"])
@pytest.mark.parametrize("selection", [[], ["--dataset", "digits", "--dataset", "fractals"]])
def test_out_or_metrics_with_more_than_one_dataset_is_refused(
    tmp_path, capsys, monkeypatch, option, selection
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(TWO_DATASETS)
    assert main(["prepare", *selection, option, str(tmp_path / "x")]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "resnet-pipeline prepare: error: --out and --metrics name one dataset's outputs: give exactly one --dataset"
    ]
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_unknown_dataset_is_refused_naming_the_known_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(TWO_DATASETS)
    assert main(["prepare", "--dataset", "digits", "--dataset", "flowers"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "resnet-pipeline prepare: error: --dataset flowers: no such dataset in datasets "
        "(expected one of digits, fractals)"
    ]
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


class _Stub(types.ModuleType):
    """Stands in for a module that takes seconds to import (Ray, MLflow); any attribute is a placeholder."""

    def __getattr__(self, name: str):
        return object()


@pytest.mark.parametrize(
    ("stage", "dataset"), [("pretrain", "fractals"), ("tune", "digits"), ("evaluate", "digits")]
)
def test_training_stages_read_data_prepared_of_their_dataset_by_default(
    tmp_path, capsys, monkeypatch, stage, dataset
):
    # pretrain and tune import Ray before they read the manifest: stubs keep this test fast. The manifest is
    # read first, so the stubs are never used.
    for module in (
        "ray",
        "ray.train",
        "resnet.distributed",
        "resnet.sweep",
        "resnet.tracking",
        "resnet.lineage",
    ):
        monkeypatch.setitem(sys.modules, module, _Stub(module))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "datasets:\n  fractals: {source: fractals}\n  digits: {source: digits}\n  other: {source: digits}\n"
    )
    from resnet.engine import save_model_file
    from resnet.models import build_model

    save_model_file(
        tmp_path / "m.pt",
        build_model("resnet20", 10),
        {"model_name": "resnet20", "num_classes": 10, "mean": [0.5] * 3, "std": [0.2] * 3},
    )
    argv = {"pretrain": [], "tune": ["--pretrained", "m.pt"], "evaluate": ["--model", "m.pt"]}[stage]
    assert main([stage, *argv]) == 2
    missing = Path("data") / "prepared" / dataset / "manifest.json"
    assert capsys.readouterr().err.splitlines() == [
        f"resnet-pipeline {stage}: error: {missing}: no manifest; run the prepare stage first"
    ]
    key = "pretrain.dataset" if stage == "pretrain" else "finetune.dataset"
    assert main([stage, *argv, "-S", f"{key}=other"]) == 2
    assert "data/prepared/other/manifest.json: no manifest" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("pretrain.lr=-1", "pretrain.lr"),
        ("pretrain.lrr=0.1", "pretrain.lrr"),
        ("pretrain.epochs=many", "pretrain.epochs"),
    ],
)
def test_invalid_override_is_one_line_naming_the_key(tmp_path, capsys, override, key):
    params = tmp_path / "params.yaml"
    params.write_text(ONE_DATASET)
    argv = ["prepare", "--params", str(params), "-S", override, "--out", str(tmp_path / "o")]
    assert main([*argv, "--metrics", str(tmp_path / "m.json")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert (
        len(lines) == 1
        and f"{params}: {key}: " in lines[0]
        and lines[0].startswith("resnet-pipeline prepare: error: ")
    )
    assert captured.out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_malformed_override_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "-S", "pretrain.epochs"])
    assert exit_info.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_missing_params_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["evaluate", "--params", str(missing), "--model", str(tmp_path / "m.pt")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"resnet-pipeline evaluate: error: {missing}: no such params file"
    ]


def test_all_has_its_own_help_and_validates_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["all", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "resnet-pipeline all" in out and "Run every stage in order" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["all", "--out", "x"])  # stage-specific paths are not options of `all`
    assert exit_info.value.code == 2


def test_pretrain_takes_the_weights_another_source_names_without_training(tmp_path, tiny_fractals, capsys):
    """finetune.pretrained names a file: the pretrain stage hands its weights on as models/pretrain/model.pt
    (what tune and DVC then depend on), untouched and without starting Ray."""
    import torch

    from resnet.engine import save_model_file
    from resnet.models import build_model
    from resnet.pretrained import state_dict_digest

    torch.manual_seed(3)
    source = tmp_path / "weights.pt"
    weights = build_model("resnet20", 7).state_dict()
    save_model_file(source, weights, {"model_name": "resnet20", "num_classes": 7})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"finetune": {"pretrained": str(source)}}))
    out, metrics = tmp_path / "models", tmp_path / "pretrain.json"
    argv = ["pretrain", "--params", str(params), "--data", str(tiny_fractals), "--out", str(out)]
    assert main([*argv, "--metrics", str(metrics)]) == 0
    blob = torch.load(out / "model.pt", weights_only=True)
    assert blob["meta"] == {
        "model_name": "resnet20",
        "num_classes": 7,
        "pretrained": str(source),
        "digest": state_dict_digest(weights),
        "weights_sha256": state_dict_digest(weights),  # what every load of the file checks
    }
    assert all(torch.equal(blob["model"][key], value) for key, value in weights.items())
    assert json.loads(metrics.read_text())["kind"] == "file"
    assert capsys.readouterr().out.startswith(f"pretrain: finetune.pretrained is {source}: no pretraining")


def test_pretrain_with_pretrained_none_writes_the_seeded_random_init(tmp_path, tiny_fractals):
    """`none`: the random init pretraining would start from (finetune.model, a head for the pretraining
    data's 10 classes, pretrain.seed): the same bytes every time, other bytes for another seed."""
    import torch

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"finetune": {"pretrained": "none", "model": "resnet20"}}))
    files = []
    for seed in (0, 0, 1):
        out = tmp_path / f"out{len(files)}"
        argv = ["pretrain", "--params", str(params), "--data", str(tiny_fractals), "--out", str(out)]
        assert main([*argv, "--metrics", str(tmp_path / "m.json"), "-S", f"pretrain.seed={seed}"]) == 0
        files.append((out / "model.pt").read_bytes())
    assert files[0] == files[1] != files[2]
    assert torch.load(tmp_path / "out0" / "model.pt", weights_only=True)["meta"]["num_classes"] == 10
