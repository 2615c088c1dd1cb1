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
