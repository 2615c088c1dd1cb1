"""`resnet-pipeline`: stage subcommands, their help, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from resnet.cli import STAGES, main


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
    assert main(["prepare", "--params", params, "-S", "data.image_size=4", "--out", str(tmp_path / "o")]) == 2
    assert "data.image_size: Input should be greater than or equal to 8" in capsys.readouterr().err


def test_prepare_writes_the_dataset_with_overrides(tmp_path, repo_root, capsys):
    out = tmp_path / "prepared"
    argv = [
        "prepare",
        "--params",
        str(repo_root / "params.yaml"),
        "-S",
        "data.image_size=16",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_shape"] == [16, 16, 3] and len(manifest["classes"]) == 10
    assert "1259 images" in capsys.readouterr().out


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


def test_prepare_from_a_params_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("data: {image_size: 16}\n")
    out = tmp_path / "prepared"
    assert main(["prepare", "--params", str(params), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_shape"] == [16, 16, 3] and manifest["source"] == "digits"
    assert sum(manifest["counts"][s]["total"] for s in ("train", "val", "test")) == 1797
    assert np_load_shape(out / "train_images.npy") == (manifest["counts"]["train"]["total"], 16, 16, 3)
    captured = capsys.readouterr()
    assert captured.err == "" and "10 classes" in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "prepared"]


def np_load_shape(path: Path) -> tuple[int, ...]:
    import numpy as np

    return np.load(path, mmap_mode="r").shape


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
    params.write_text("data: {image_size: 16}\n")
    assert main(["prepare", "--params", str(params), "-S", override, "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert (
        len(lines) == 1
        and f"{params}: {key}: " in lines[0]
        and lines[0].startswith("resnet-pipeline prepare: error: ")
    )
    assert captured.out == "" and not (tmp_path / "o").exists()


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
