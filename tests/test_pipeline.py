"""End to end: `dvc repro` of the whole pipeline in a temporary copy of the project, with tiny settings, against
a real Ray cluster and the embedded MLflow store; then the registered model is loaded by its alias."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def project(pipeline_project) -> dict:
    return pipeline_project


def _client(work: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{work / 'mlruns.db'}")


def test_every_stage_ran_and_wrote_its_outputs(project):
    work, out = project["dir"], project["first"].stdout
    for stage in ("prepare@fractals", "prepare@digits", "pretrain", "tune", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    fractals = json.loads((work / "data/prepared/fractals/manifest.json").read_text())
    assert fractals["counts"]["train"]["total"] == 10 * 16 and fractals["rejected"] == []
    assert json.loads((work / "metrics/prepare/fractals.json").read_text())["images"]["val"] == 20
    manifest = json.loads((work / "data/prepared/digits/manifest.json").read_text())
    assert manifest["image_shape"] == [16, 16, 3]
    assert sum(manifest["counts"][s]["total"] for s in ("train", "val", "test")) == 1797
    eval_metrics = json.loads((work / "metrics/eval.json").read_text())
    assert eval_metrics["test_images"] == manifest["counts"]["test"]["total"]
    assert eval_metrics["test_acc"] > 0.5  # chance is 0.1; two epochs on digits reach far more
    lines = (work / "plots/confusion.csv").read_text().splitlines()
    assert lines[0] == "actual,predicted" and len(lines) == 1 + eval_metrics["test_images"]


def test_registered_model_loads_by_alias_and_predicts(project):
    import mlflow
    import torch

    work = project["dir"]
    record = json.loads((work / "registry/registered.json").read_text())
    assert record["alias"] == "champion" and record["name"] == "resnet-digits"
    assert record["model_uri"] == "models:/resnet-digits@champion"
    client = _client(work)
    assert client.get_model_version_by_alias("resnet-digits", "champion").version == record["version"]
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns.db'}")
    model = mlflow.pytorch.load_model(record["model_uri"])
    images = torch.rand(5, 3, 16, 16)
    logits = model(images)
    assert tuple(logits.shape) == (5, 10)
    assert torch.isfinite(logits).all()


def test_mlflow_has_runs_curves_and_nested_trials(project):
    work = project["dir"]
    client = _client(work)
    experiment = client.get_experiment_by_name("resnet-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("pipeline.stage"), []).append(run)
    pretrain = by_stage["pretrain"][0]
    assert pretrain.info.status == "FINISHED"
    assert pretrain.data.params["pretrain.model"] == "resnet20"
    assert pretrain.data.params["pretrain.loader"] == "ray_data"
    assert pretrain.data.params["pretrain.dataset"] == "fractals"
    curve = client.get_metric_history(pretrain.info.run_id, "val_acc")
    assert [m.step for m in curve] == [1, 2]  # one point per epoch, logged once Ray Train registered it

    tune_parent = next(r for r in by_stage["tune"] if "mlflow.parentRunId" not in r.data.tags)
    trials = [r for r in by_stage["tune"] if r.data.tags.get("mlflow.parentRunId") == tune_parent.info.run_id]
    sweep = (work / "plots/sweep.csv").read_text().splitlines()
    assert len(trials) == len(sweep) - 1 == project["params"]["tune"]["num_samples"]
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert client.get_metric_history(trial.info.run_id, "val_acc")  # per-epoch curve


# What only Ray's internals print: the worker/controller log prefixes, its checkpoint bookkeeping, Tune's
# tables, and the controller's timeouts on a busy machine; and MLflow's registry chatter (the register stage
# says what happened in a line of its own). None of it belongs in a stage's output.
FRAMEWORK_NOISE = (
    "(RayTrainWorker",
    "(TrainController",
    "(raylet",
    "(pid=",
    "Reporting training result",
    "Checkpoint successfully created",
    "Setting up process group",
    "Trial status",
    "Configuration for experiment",
    "View detailed results",
    "╭",
    "GetTimeoutError",
    "Traceback",
    "Token authentication",
    "INFO worker.py",
    "Creating initial MLflow database tables",
    "Successfully registered model",
    "already exists. Creating a new version",
    "Created version",
    "Failed to resolve installed pip version",
    "Downloading artifacts",
)


def test_the_output_says_what_happened_not_what_ray_did(project):
    out = project["first"].stdout + project["first"].stderr
    noise = [line for line in out.splitlines() if any(marker in line for marker in FRAMEWORK_NOISE)]
    assert noise == []
    lines = out.splitlines()
    epochs = [line.split(":")[0] for line in lines if line.startswith("pretrain epoch")]
    assert epochs == ["pretrain epoch 1/2", "pretrain epoch 2/2"]  # one line per epoch, once each
    trials = [line for line in lines if re.match(r"tune: trial \S+ epoch ", line)]
    epoch_line = r"tune: trial \S+ epoch [12]/2: val_loss \d+\.\d{4}( \(best \d+\.\d{4}\): stopped by ASHA)?"
    assert len(trials) >= 2 and all(re.fullmatch(epoch_line, line) for line in trials), trials
    assert any(line.startswith("tune: 2/2 trials done; best: 1. ") for line in lines)
    best = [line for line in lines if line.startswith("tune: best trial ")]
    draw = r"\w+=[^,{}()]+"
    assert len(best) == 1 and re.fullmatch(
        rf"tune: best trial \S+ epoch \d+ \(({draw}, )*{draw}\) → \S+", best[0]
    ), best
    assert not re.search(r"\d\.\d{5}", best[0]), best  # drawn floats to 3 significant digits
    assert any(line.startswith("evaluate: test accuracy") for line in lines)
    assert any(line.startswith("register: resnet-digits version") for line in lines)


def test_the_sweep_plot_draws_columns_of_the_sweep_table(project):
    """`dvc plots show` of plots/sweep.csv: its axes are columns the tune stage wrote (best_<tune.metric>)."""
    work = project["dir"]
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--json", "plots/sweep.csv"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    (plot,) = json.loads(shown.stdout)["data"]["plots/sweep.csv"]
    encoding, rows = plot["content"]["encoding"], plot["content"]["data"]["values"]
    axes = (encoding["x"]["field"], encoding["y"]["field"])
    assert axes == ("epochs_reported", f"best_{project['params']['tune'].get('metric', 'val_loss')}")
    assert len(rows) == project["params"]["tune"]["num_samples"]
    assert all(float(row[axes[0]]) >= 1 and float(row[axes[1]]) >= 0 for row in rows), rows


def test_second_repro_changes_nothing(project):
    work = project["dir"]
    registered = (work / "registry/registered.json").read_bytes()
    second = project["repro"]()
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date." in second.stdout
    assert (work / "registry/registered.json").read_bytes() == registered


def test_dvc_push_and_pull_through_s3_restore_identical_data(project, s3_server):
    """The DVC remote on a real S3 server: push while the server restarts, check every object it holds, wipe the
    cache and every cached output, pull, compare."""
    import hashlib
    import threading
    import time
    import uuid

    work = project["dir"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_server.env()
    remote = f"s3://dvc/{uuid.uuid4().hex[:10]}"

    def dvc(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    def digests() -> dict[str, str]:
        return {
            str(path.relative_to(work)): hashlib.sha256(path.read_bytes()).hexdigest()
            for top in ("data/prepared", "models")
            for path in sorted((work / top).rglob("*"))
            if path.is_file() and path.name != ".gitignore"
        }

    dvc("remote", "add", "-d", "store", remote)
    dvc("remote", "modify", "store", "endpointurl", s3_server.endpoint)  # keys come from the environment
    before = digests()
    assert any(name.endswith(".parquet") for name in before) and "models/tune/model.pt" in before
    # The S3 server restarts as the push begins (stopped, started again on the same ports 2 s later): the
    # push's first requests meet no server, and are retried until it answers.
    s3_server.stop()
    comeback = threading.Thread(target=lambda: (time.sleep(2), s3_server.start(same_ports=True)))
    comeback.start()
    try:
        dvc("push")
    finally:
        comeback.join()
    assert s3_server.process is not None, "the S3 server did not come back"
    # Every cached file is in the remote, whole: each object's content hashes to the MD5 in its key.
    from resnet.data import s3

    bucket, prefix = s3.split_s3_uri(remote)
    with pytest.MonkeyPatch.context() as aws:
        for name, value in s3_server.env().items():
            aws.setenv(name, value)
        s3.s3_client.cache_clear()
        pushed = {}
        for key, _ in s3.list_objects(remote):
            digest = "".join(key.removeprefix(f"{prefix}/files/md5/").removesuffix(".dir").split("/"))
            pushed[digest] = hashlib.md5(s3.read_object(f"s3://{bucket}/{key}")).hexdigest()
    s3.s3_client.cache_clear()
    assert all(digest == md5 for digest, md5 in pushed.items()), pushed
    workspace = {hashlib.md5((work / name).read_bytes()).hexdigest() for name in before}
    assert workspace <= set(pushed), workspace - set(pushed)
    assert "Cache and remote 'store' are in sync." in dvc("status", "--cloud")
    for top in ("data/prepared", "models"):  # the outputs, not the .gitignore files DVC keeps beside them
        for output in (work / top).iterdir():
            if output.is_dir():
                shutil.rmtree(output)
    shutil.rmtree(work / ".dvc" / "cache")
    assert digests() == {}
    dvc("pull")
    assert digests() == before
    assert "Data and pipelines are up to date." in dvc("status")
