"""`resnet-pipeline submit` / `repro-job` without a cluster: what they refuse, what they hand back
(tests/test_submit.py runs them on the local stack)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import yaml

from resnet.errors import PipelineError
from resnet.jobs import (
    REMOTE_NAME,
    edit_params,
    fetch_handback,
    handback_files,
    main,
    push_stage_runs,
    submission_digest,
    upload_handback,
)

LOCK = {
    "schema": "2.0",
    "stages": {
        "prepare@digits": {"outs": [{"path": "data/prepared/digits", "md5": "a.dir"}]},
        "tune": {
            "outs": [
                {"path": "models/tune", "md5": "b.dir"},
                {"path": "metrics/tune.json", "md5": "c"},
                {"path": "plots/sweep.csv", "md5": "d"},
            ]
        },
        "register": {"outs": [{"path": "registry/registered.json", "md5": "e"}]},
    },
}


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("RESNET_DVC_REMOTE", "RESNET_RAY_STORAGE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("pretrain: {epochs: 2}\n")
    return tmp_path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_submit_without_a_remote_says_how_to_name_one(checkout, capsys):
    assert main(["--address", "http://127.0.0.1:1"]) == 2
    assert _one_error_line(capsys) == (
        "resnet-pipeline submit: error: no DVC remote: give --remote s3://BUCKET/PREFIX or set RESNET_DVC_REMOTE"
    )


@pytest.mark.parametrize("remote", ["/local/dir", "s3://", "gs://bucket/x"])
def test_a_remote_that_is_not_an_s3_prefix_is_refused(checkout, capsys, remote):
    assert main(["--remote", remote, "--address", "http://127.0.0.1:1"]) == 2
    assert _one_error_line(capsys).endswith(f"--remote {remote}: expected an S3 prefix, s3://BUCKET/PREFIX")


def test_a_bad_override_is_refused_here_before_anything_is_shipped(checkout, capsys):
    assert (
        main(["--remote", "s3://dvc/store", "--address", "http://127.0.0.1:1", "-S", "pretrain.epochs=0"])
        == 2
    )
    assert "pretrain.epochs" in _one_error_line(capsys)


def test_the_address_must_be_the_job_api(checkout, capsys):
    assert main(["--remote", "s3://dvc/store", "--address", "127.0.0.1:6379"]) == 2
    assert _one_error_line(capsys) == (
        "resnet-pipeline submit: error: --address 127.0.0.1:6379: expected the Ray job API, http://HEAD:8265 "
        "(or set RAY_ADDRESS)"
    )


def test_an_unreachable_cluster_is_one_line(checkout, capsys):
    from localservers import free_ports

    address = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert main(["--remote", "s3://dvc/store", "--address", address]) == 2
    assert _one_error_line(capsys).startswith(
        f"resnet-pipeline submit: error: cannot reach the Ray job API at {address}: "
    )


def test_outside_a_pipeline_checkout_submit_names_the_missing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--remote", "s3://dvc/store", "--address", "http://127.0.0.1:1"]) == 2
    assert _one_error_line(capsys).endswith(
        f"{tmp_path}/dvc.yaml: no such file; run submit from the pipeline's checkout"
    )


def test_the_handback_is_the_lock_file_and_every_file_output(tmp_path):
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    for path in ("metrics/tune.json", "plots/sweep.csv", "registry/registered.json", "models/tune/model.pt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(path)
    (tmp_path / "data/prepared/digits").mkdir(parents=True)
    assert handback_files(tmp_path) == [
        "dvc.lock",
        "metrics/tune.json",
        "plots/sweep.csv",
        "registry/registered.json",
    ]


def test_a_jobs_params_change_keeps_the_files_comments_and_is_validated(tmp_path):
    """What `-S` hands back must stay the user's file: comments and order kept, only the value changed."""
    path = tmp_path / "params.yaml"
    path.write_text("# the pipeline\npretrain:\n  epochs: 2   # short\n  lr: 0.1\n")
    text = edit_params(path, [("pretrain.epochs", 3), ("ray.storage_path", "s3://ray/runs")])
    assert (
        text
        == path.read_text()
        == (
            "# the pipeline\npretrain:\n  epochs: 3   # short\n  lr: 0.1\nray:\n  storage_path: s3://ray/runs\n"
        )
    )
    with pytest.raises(PipelineError, match="pretrain.epochs"):
        edit_params(path, [("pretrain.epochs", 0)])


@pytest.mark.integration
def test_a_tampered_handback_file_writes_nothing(s3_env, tmp_path):
    """Every file's sha256 is checked before any is written into the checkout."""
    from resnet.data.s3 import upload_file

    job = tmp_path / "job"
    (job / "metrics").mkdir(parents=True)
    (job / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {}}))
    (job / "metrics/eval.json").write_text(json.dumps({"test_acc": 0.9}))
    uri = "s3://dvc/test-jobs/job-1"
    assert upload_handback(job, uri, extra=["metrics/eval.json"]) == ["dvc.lock", "metrics/eval.json"]

    good = tmp_path / "good"
    assert fetch_handback(uri, good) == ["dvc.lock", "metrics/eval.json"]
    assert (good / "metrics/eval.json").read_bytes() == (job / "metrics/eval.json").read_bytes()

    (job / "metrics/eval.json").write_text(json.dumps({"test_acc": 1.0}))
    upload_file(job / "metrics/eval.json", f"{uri}/files/metrics/eval.json")  # not what handback.json says
    bad = tmp_path / "bad"
    with pytest.raises(PipelineError, match="sha256 differs"):
        fetch_handback(uri, bad)
    assert not bad.exists()
    recorded = json.loads((job / ".dvc/tmp/handback.json").read_text())["files"]["metrics/eval.json"]
    assert recorded == hashlib.sha256(json.dumps({"test_acc": 0.9}).encode()).hexdigest()


def test_an_override_without_a_value_is_refused_in_one_line(checkout, capsys):
    assert (
        main(["--remote", "s3://dvc/store", "--address", "http://127.0.0.1:1", "-S", "pretrain.epochs"]) == 2
    )
    assert _one_error_line(capsys) == (
        "resnet-pipeline submit: error: -S pretrain.epochs: expected KEY=VALUE (e.g. pretrain.epochs=2)"
    )


def test_the_submission_digest_is_what_was_submitted_not_what_running_there_added(tmp_path):
    source = tmp_path / "job"
    (source / "resnet").mkdir(parents=True)
    (source / "resnet/a.py").write_text("x = 1\n")
    (source / "params.yaml").write_text("pretrain: {epochs: 2}\n")
    first = submission_digest(source)
    (source / "resnet/__pycache__").mkdir()
    (source / "resnet/__pycache__/a.cpython-312.pyc").write_bytes(b"\0\1")
    (source / ".dvc/tmp").mkdir(parents=True)
    (source / ".dvc/tmp/lock").write_text("1")
    assert submission_digest(source) == first  # a stopped job's re-submission: the same pipeline run id
    assert submission_digest(source, ["pretrain.epochs=3"]) != first
    (source / "params.yaml").write_text("pretrain: {epochs: 3}\n")
    assert submission_digest(source) != first


def _dvc(root, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, check=True
    )
    return done.stdout + done.stderr


def test_a_stage_pushed_with_its_run_is_restored_elsewhere_metrics_file_and_all(tmp_path):
    """What a re-submitted job does with the stages a stopped one finished: `dvc repro --pull` finds their
    runs in the remote and checks out their outputs instead of running them, also an uncached metrics file
    (`dvc push --run-cache` alone leaves that file out of the remote, and the stage runs again)."""
    stage = {
        "cmd": "python -c \"import pathlib; pathlib.Path('out.txt').write_text(pathlib.Path('in.txt')"
        ".read_text() * 2); pathlib.Path('m.json').write_text('{\\\"m\\\": 1}')\"",
        "deps": ["in.txt"],
        "outs": ["out.txt"],
        "metrics": [{"m.json": {"cache": False}}],
    }
    remote = tmp_path / "remote"
    for name in ("first", "second"):
        root = tmp_path / name
        root.mkdir()
        (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"double": stage}}))
        (root / "in.txt").write_text("hi\n")
        _dvc(root, "init", "--no-scm", "-q")
        _dvc(root, "remote", "add", "--local", "-d", REMOTE_NAME, str(remote))
    assert "Running stage 'double'" in _dvc(tmp_path / "first", "repro")
    push_stage_runs(tmp_path / "first")
    restored = _dvc(tmp_path / "second", "repro", "--pull")
    assert "Stage 'double' is cached - skipping run, checking out outputs" in restored
    assert "Running stage" not in restored
    for name in ("out.txt", "m.json", "dvc.lock"):
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
