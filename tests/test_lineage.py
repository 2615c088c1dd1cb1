"""What each stage run records about its origin: redaction, DVC's digest, git state, one id per `dvc repro`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from resnet.lineage import config_params, dvc_digest, git_state, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://mlflow:s3cr3t@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("https://user:p%40ss@mlflow.example.com", "https://user:***@mlflow.example.com"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),  # a port is not a password
        ("s3://bucket/key", "s3://bucket/key"),
    ],
)
def test_redact_replaces_uri_passwords(text, expected):
    assert redact(text) == expected


def test_config_params_hold_the_whole_config_without_secrets_or_execution_settings():
    from resnet.config import load_config

    cfg = load_config("params.yaml", {"mlflow.tracking_uri": "postgresql://u:topsecret@h/db"})
    params = config_params(cfg)
    assert params["mlflow.tracking_uri"] == "postgresql://u:***@h/db"
    assert "topsecret" not in "".join(params.values())
    assert params["pretrain.lr"] == "0.1" and params["register.alpha"] == "0.05"
    assert params["datasets.digits.split.test"] == "0.15"
    assert "ray.num_workers" in params and "ray.storage_path" not in params  # an execution setting: a tag


def test_dvc_digest_reads_the_output_hash_from_dvc_lock(tmp_path):
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare@digits:\n    cmd: x\n    outs:\n"
        "    - path: data/prepared/digits\n      hash: md5\n      md5: 0123abcd.dir\n"
    )
    assert dvc_digest(tmp_path / "data/prepared/digits", tmp_path) == "0123abcd.dir"
    assert dvc_digest(tmp_path / "data/prepared/other", tmp_path) is None
    assert dvc_digest("/elsewhere/data", tmp_path) is None


def test_git_state_ignores_what_dvc_repro_rewrites(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "dvc.lock").write_text("a\n")
    (tmp_path / "train.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "init")
    monkeypatch.chdir(tmp_path)
    assert git_state()["git.dirty"] == "false" and len(git_state()["git.commit"]) == 40
    (tmp_path / "dvc.lock").write_text("b\n")  # rewritten by dvc repro itself
    assert git_state()["git.dirty"] == "false"
    (tmp_path / "train.py").write_text("x = 2\n")
    assert git_state()["git.dirty"] == "true"


def test_stages_of_one_dvc_process_share_a_pipeline_run_id(tmp_path):
    """Two children of one process named `dvc` get the same id; another `dvc` process gets another."""
    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text(
        f"#!{sys.executable}\nimport subprocess, sys\n"
        "code = 'from resnet.lineage import pipeline_run_id; print(pipeline_run_id())'\n"
        "for _ in range(2):\n    subprocess.run([sys.executable, '-c', code], check=True)\n"
    )
    fake_dvc.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "RESNET_PIPELINE_RUN_ID"}

    def ids() -> list[str]:
        return subprocess.run(
            [str(fake_dvc), "repro"], env=env, capture_output=True, text=True, check=True
        ).stdout.split()

    first, second = ids(), ids()
    assert len(first) == 2 and first[0] == first[1] and len(first[0]) == 16
    assert second[0] == second[1] != first[0]
