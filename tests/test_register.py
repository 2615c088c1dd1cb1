"""The registry as the system of record, on the pipeline run by `pipeline_project` (tiny params, embedded
MLflow store): lineage on every stage run, system metrics, the first version champion with its model card,
idempotent re-registration, and `champion` moving only on evidence (a worse model after
`dvc exp run -S finetune.epochs=1` is the challenger; a significantly better one takes the alias, in a project
of its own that needs no Ray cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from stagerun import own_env

pytestmark = pytest.mark.integration

NAME = "resnet-digits"


def _client(work: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{work / 'mlruns.db'}")


def _stage_runs(client) -> dict[str, list]:
    experiment = client.get_experiment_by_name("resnet-pipeline")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    by_stage: dict[str, list] = {}
    for run in runs:
        if "mlflow.parentRunId" not in run.data.tags:
            by_stage.setdefault(run.data.tags.get("pipeline.stage"), []).append(run)
    return by_stage


def _run(project: dict, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, *args],
        cwd=project["dir"],
        env=project["env"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_every_stage_run_carries_its_lineage(pipeline_project):
    work = pipeline_project["dir"]
    client = _client(work)
    by_stage = _stage_runs(client)
    first = {stage: runs[0] for stage, runs in by_stage.items()}
    assert set(first) == {"pretrain", "tune", "evaluate", "register"}
    ids = {run.data.tags["pipeline.run_id"] for run in first.values()}
    assert len(ids) == 1  # one `dvc repro`, one pipeline run id
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    digits_md5 = lock["prepare@digits"]["outs"][0]["md5"]
    fractals_md5 = lock["prepare@fractals"]["outs"][0]["md5"]
    manifest = json.loads((work / "data/prepared/digits/manifest.json").read_text())
    for stage, run in first.items():
        tags, params = run.data.tags, run.data.params
        assert tags["lib.torch"] and tags["lib.mlflow"] and tags["device"] == "cpu", stage
        assert len(tags["dvc.lock.sha256"]) == 64, stage
        assert params["finetune.dataset"] == "digits" and params["register.model_name"] == NAME, stage
        assert params["tune.num_samples"] == "2", stage
        inputs = {(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in run.inputs.dataset_inputs}
        if stage == "pretrain":
            assert tags["data.fractals.dvc_md5"] == fractals_md5 and tags["world_size"] == "2"
            assert inputs == {
                ("fractals-train", fractals_md5, "training"),
                ("fractals-val", fractals_md5, "validation"),
            }
        else:
            assert tags["data.digits.dvc_md5"] == digits_md5, stage
            assert tags["data.digits.content_hash"] == manifest["content_hash"], stage
            expected = (
                {("digits-train", digits_md5, "training"), ("digits-val", digits_md5, "validation")}
                if stage == "tune"
                else {("digits-test", digits_md5, "test")}
            )
            assert inputs == expected, stage


def test_training_runs_record_system_metrics(pipeline_project):
    client = _client(pipeline_project["dir"])
    pretrain = _stage_runs(client)["pretrain"][0]
    history = client.get_metric_history(pretrain.info.run_id, "system/cpu_utilization_percentage")
    assert history and all(0 <= m.value <= 100 for m in history)
    assert client.get_metric_history(pretrain.info.run_id, "system/system_memory_usage_megabytes")


def test_the_first_version_is_champion_with_a_model_card(pipeline_project):
    work = pipeline_project["dir"]
    record = json.loads((work / "registry/registered.json").read_text())
    assert record["registered"] and record["decision"]["promoted"]
    assert record["decision"]["reason"] == "first version: no @champion to compare with"
    client = _client(work)
    version = client.get_model_version_by_alias(NAME, "champion")
    assert int(version.version) == record["version"]
    eval_metrics = json.loads((work / "metrics/eval.json").read_text())
    assert version.tags["model.sha256"] == eval_metrics["model_sha256"] == record["model_sha256"]
    assert version.tags["run_id"] == record["run_id"] == version.run_id
    assert version.tags["data.content_hash"] == eval_metrics["data_hash"]
    card = version.description
    assert card.startswith(f"# {NAME} version {record['version']} (@champion)")
    assert f"accuracy {eval_metrics['test_acc']:.4f}" in card and eval_metrics["data_hash"] in card
    assert f"MLflow run `{record['run_id']}`" in card


def test_register_refuses_metrics_of_another_model_file(pipeline_project, tmp_path):
    work = pipeline_project["dir"]
    real = json.loads((work / "metrics/eval.json").read_text())
    other = real | {"model_sha256": "0" * 64}
    (tmp_path / "eval.json").write_text(json.dumps(other))
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.register", "--eval-metrics", str(tmp_path / "eval.json")]
        + ["--out", str(tmp_path / "registered.json")],
        cwd=work,
        env=pipeline_project["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"resnet-pipeline register: error: {tmp_path / 'eval.json'}: scores model sha256 000000000000…, but "
        f"models/tune/model.pt is {real['model_sha256'][:12]}…; "
        "run the evaluate stage on this model first"
    ]
    assert not (tmp_path / "registered.json").exists()


def test_registering_the_same_model_again_registers_nothing(pipeline_project, tmp_path):
    work = pipeline_project["dir"]
    client = _client(work)
    before = client.search_model_versions(f"name = '{NAME}'")
    done = _run(pipeline_project, "-m", "pipelines.register", "--out", str(tmp_path / "again.json"))
    record = json.loads((tmp_path / "again.json").read_text())
    assert not record["registered"] and record["alias"] == "champion"
    assert done.stdout.strip().splitlines()[-1] == (
        f"register: {NAME}: this model file is already version {record['version']}; nothing registered (@champion)"
    )
    assert len(client.search_model_versions(f"name = '{NAME}'")) == len(before)


@pytest.fixture
def bright_dark_project(tmp_path, repo_root) -> dict:
    """A project that needs no Ray cluster and no pipeline run (the test is about the registry only): the
    repository's params, a prepared two-class set (dark and bright 16 px images, 40 test images) where the
    finetune stage would put it, a ResNet-20 trained on it in this process as the tuned model, and its
    evaluation: {"dir", "env"}, as `_run` takes them."""
    import torch

    from resnet.config import AugmentConfig, PretrainConfig, load_config
    from resnet.data.loading import load_prepared
    from resnet.data.prepare import write_prepared
    from resnet.data.sources import RawDataset
    from resnet.engine import fit, save_model_file
    from resnet.models import build_model
    from resnet.stages import evaluate

    work = tmp_path / "project"
    work.mkdir()
    (work / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    cfg = load_config(work / "params.yaml")
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    images = np.where(labels[:, None, None, None] == 1, 170, 70) + rng.integers(-30, 30, (200, 16, 16, 3))
    raw = RawDataset(images.astype(np.uint8), labels, ("dark", "bright"))
    data_dir = work / "data" / "prepared" / cfg.finetune.dataset
    write_prepared(raw, data_dir, val=0.2, test=0.2, seed=0, source="bright-dark")
    data = load_prepared(data_dir, splits=("train", "val"))
    torch.manual_seed(0)
    model = fit(
        build_model("resnet20", 2),
        data,
        PretrainConfig(epochs=2, batch_size=16, lr=0.05),
        AugmentConfig(crop_padding=0),
        device=torch.device("cpu"),
    )
    meta = {
        "model_name": "resnet20",
        "num_classes": 2,
        "classes": list(data.classes),
        "image_size": 16,
        "mean": list(data.mean),
        "std": list(data.std),
        "data_hash": data.content_hash,
    }
    save_model_file(work / "models/tune/model.pt", model, meta)
    env = own_env()
    with pytest.MonkeyPatch.context() as here:
        here.chdir(work)  # the stage's default paths, and the embedded MLflow store (mlruns.db)
        for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
            here.delenv(name)
        evaluate.run(cfg)
    return {"dir": work, "env": env}


def test_a_significantly_better_model_takes_the_champion_alias(bright_dark_project, tmp_path):
    """Under another registered name: a crippled copy of the tuned model (its classifier zeroed: one class for
    every image) becomes the first champion; the tuned model, far better on the same test images, replaces it."""
    import torch

    from resnet.engine import load_model_file, save_model_file

    work = bright_dark_project["dir"]
    model, meta = load_model_file(work / "models/tune/model.pt")
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[0] = 1.0
    save_model_file(tmp_path / "bad.pt", model, meta)
    other = ["-S", "register.model_name=resnet-digits-evidence"]
    outputs = ["--confusion", str(tmp_path / "c.csv"), "--calibration", str(tmp_path / "cal.csv")]
    _run(
        bright_dark_project,
        "-m",
        "pipelines.evaluate",
        "--model",
        str(tmp_path / "bad.pt"),
        "--metrics",
        str(tmp_path / "bad.json"),
        "--figures",
        str(tmp_path / "fig"),
        *outputs,
    )
    _run(
        bright_dark_project,
        "-m",
        "pipelines.register",
        "--model",
        str(tmp_path / "bad.pt"),
        "--eval-metrics",
        str(tmp_path / "bad.json"),
        "--out",
        str(tmp_path / "bad-reg.json"),
        *other,
    )
    done = _run(
        bright_dark_project, "-m", "pipelines.register", "--out", str(tmp_path / "good-reg.json"), *other
    )
    record = json.loads((tmp_path / "good-reg.json").read_text())
    decision = record["decision"]
    assert record["alias"] == "champion" and decision["promoted"] and decision["champion_version"] == 1
    assert decision["candidate"] > decision["champion"] and decision["p_value"] < 0.05
    assert (
        done.stdout.strip()
        .splitlines()[-1]
        .startswith(
            f"register: resnet-digits-evidence version {record['version']} is now @champion: better and significant: "
            f"test_acc {decision['candidate']:.4f} vs champion {decision['champion']:.4f}"
        )
    )
    client = _client(work)
    assert (
        int(client.get_model_version_by_alias("resnet-digits-evidence", "champion").version)
        == (record["version"])
    )


def test_a_worse_model_after_dvc_exp_run_stays_challenger(pipeline_project):
    """`dvc exp run -S finetune.epochs=1 -S tune.num_samples=1`: a shorter fine-tuning of the same pretrained
    backbone. DVC re-runs tune, evaluate and register only (pretrain's inputs did not change); the new version is
    registered as the challenger with the reason, and `champion` stays where it was. Runs last: it changes the
    project's workspace."""
    work = pipeline_project["dir"]
    client = _client(work)
    champion = client.get_model_version_by_alias(NAME, "champion").version
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    (work / ".gitignore").write_text("mlruns.db\nmlartifacts/\nruns/\n__pycache__/\n")
    subprocess.run([*git, "add", "-A"], cwd=work, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=work, check=True, capture_output=True)
    weaker = ["-S", "finetune.epochs=1", "-S", "tune.num_samples=1"]
    done = _run(pipeline_project, "-m", "dvc", "exp", "run", *weaker)
    assert "Running stage 'pretrain'" not in done.stdout and "Stage 'pretrain' didn't change" in done.stdout
    for stage in ("tune", "evaluate", "register"):
        assert f"Running stage '{stage}'" in done.stdout
    record = json.loads((work / "registry/registered.json").read_text())
    assert record["registered"] and record["alias"] == "challenger" and not record["decision"]["promoted"]
    assert client.get_model_version_by_alias(NAME, "champion").version == champion
    version = client.get_model_version_by_alias(NAME, "challenger")
    assert int(version.version) == record["version"] != int(champion)
    reason = version.tags["decision.reason"]
    assert reason == record["decision"]["reason"] and "vs champion" in reason and "McNemar p=" in reason
    assert f"@champion stays on version {champion}: {reason}" in done.stdout
