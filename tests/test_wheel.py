"""The product as users install it: the wheel (built by infra/install-wheel.sh, the container image's install
command) in a fresh virtualenv outside the repository runs the CLI and a real stage there."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

PARAMS = """\
datasets:
  fractals:
    source: fractals
    image_size: 16
    split: {val: 0.2, test: 0.2}
    fractals: {num_classes: 3, per_class: 10, points: 200}
pretrain: {dataset: fractals}
finetune: {dataset: fractals}
"""

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtualenv outside the repository with the project installed from its wheel."""
    venv = tmp_path_factory.mktemp("wheel") / "venv"
    done = subprocess.run(
        [str(REPO / "infra/install-wheel.sh"), str(venv)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(f"into {venv}")
    return venv


def test_the_wheel_holds_the_library_and_no_repository_code(tmp_path):
    subprocess.run(["uv", "build", "--wheel", "--quiet", "--out-dir", str(tmp_path), str(REPO)], check=True)
    (wheel,) = tmp_path.glob("resnet_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "resnet/stages/tune.py" in names and "resnet/cli.py" in names
    assert not [n for n in names if n.startswith(("pipelines/", "tests/", "benchmarks/"))]


def test_the_installed_cli_runs_a_stage_outside_the_repository(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "params.yaml").write_text(PARAMS)
    cli = installed / "bin" / "resnet-pipeline"
    env = {"PATH": f"{installed / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "RESNET_PROGRESS": "0"}

    shown = subprocess.run(
        [str(cli), "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert "stages, in order:" in shown.stdout and "  submit" in shown.stdout

    done = subprocess.run(
        [str(cli), "prepare"], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((work / "metrics/prepare/fractals.json").read_text())
    assert metrics["images"] == {"train": 18, "val": 6, "test": 6} and metrics["classes"] == 3
    # The same bytes as the library of this checkout makes from the same params
    from resnet.config import parse_config
    from resnet.data.prepare import prepare_dataset

    cfg = parse_config(yaml.safe_load(PARAMS), "params.yaml")
    here = prepare_dataset("fractals", cfg.datasets["fractals"], tmp_path / "here")
    assert metrics["content_hash"] == here["content_hash"]
    # The library ran from the virtualenv, not from the repository
    where = subprocess.run(
        [str(installed / "bin/python"), "-c", "import resnet; print(resnet.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(installed))
