"""Ray Train against a real (session) Ray cluster: a training worker killed mid-run is replaced and training
continues from the last checkpoint; a stopped pretrain stage resumes its run when started again; checkpoints
land in S3 (SeaweedFS) when `ray.storage_path` is s3://."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from stagerun import run_stage_ok, stage_command, stage_env, wait_for

pytestmark = pytest.mark.integration

EPOCHS = 5
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints


@pytest.fixture(scope="module")
def prepared(tiny_fractals) -> Path:
    return tiny_fractals


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories holding the rank-0 state, oldest first."""
    return sorted(path.parent for path in run_dir.glob("checkpoint_*/state.pt"))


def _train_workers(ray_address: str) -> list:
    from ray.util.state import list_actors

    return list_actors(
        address=ray_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )


def test_a_killed_worker_is_replaced_and_training_continues_from_the_last_checkpoint(
    ray_address, prepared, tmp_path
):
    from mlflow.tracking import MlflowClient

    from resnet.config import AugmentConfig, PretrainConfig, RayConfig
    from resnet.distributed import TrainJob, make_trainer, storage_path
    from resnet.tracking import start_run

    ray_cfg = RayConfig(
        num_workers=2, max_failures=1, checkpoints_to_keep=EPOCHS, storage_path=str(tmp_path / "ray")
    )
    optim = PretrainConfig(epochs=EPOCHS, batch_size=16, lr=0.05)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = start_run(tracking_uri, "resnet-pipeline", "killed", root=tmp_path)
    job = TrainJob(
        data_dir=str(prepared),
        optim=optim.model_dump(),
        augment=AugmentConfig(crop_padding=0).model_dump(),
        mlflow_run=run,
    )
    trainer = make_trainer(job, ray_cfg, name="killed", storage=storage_path(ray_cfg))
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
    thread.start()

    run_dir = tmp_path / "ray" / "killed"
    wait_for(lambda: _checkpoints(run_dir)[:1], 180, "the first epoch's checkpoint")
    first_seen = time.monotonic()
    wait_for(lambda: len(_checkpoints(run_dir)) >= 2, 60, "the second epoch's checkpoint")
    # Half an epoch into the third epoch (an epoch lasts as long as the wait between the first two
    # checkpoints, measured here rather than assumed).
    time.sleep((time.monotonic() - first_seen) / 2)
    workers = _train_workers(ray_address)
    assert len(workers) == 2
    victim = workers[1].pid
    os.kill(victim, signal.SIGKILL)

    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    result = outcome["result"]
    assert result.error is None
    reports = sorted((metrics for _, metrics in result.best_checkpoints), key=lambda m: m["epoch"])
    # Every epoch ran exactly once and the run ended at the configured number of epochs.
    assert [m["epoch"] for m in reports] == list(range(1, EPOCHS + 1))
    # The replacement worker group started after a saved epoch, not from scratch (after the second, or the
    # first when the controller had not yet registered the second when the worker died)...
    restarted = [m for m in reports if m["start_epoch"] > 0]
    assert restarted, "no epoch ran in a restarted worker group"
    resumed_at = restarted[0]["start_epoch"]
    assert 1 <= resumed_at < EPOCHS
    assert all(m["start_epoch"] == 0 for m in reports[:resumed_at])
    assert all(m["start_epoch"] == resumed_at for m in reports[resumed_at:])
    # ...and its loss curve continues from where it was: the epochs after the restart are below a fresh
    # start's first epoch, and the run ends well below it.
    assert all(m["train_loss"] < reports[0]["train_loss"] for m in reports[resumed_at:])
    assert reports[-1]["train_loss"] < 0.8 * reports[0]["train_loss"]
    assert victim not in {worker.pid for worker in _train_workers(ray_address)}
    state = torch.load(Path(result.checkpoint.path) / "state.pt", weights_only=True)
    assert state["epoch"] == EPOCHS and state["optimizer"]["state"]  # momentum buffers were saved too
    for rank in (0, 1):
        rng = torch.load(Path(result.checkpoint.path) / f"rng-rank{rank}.pt", weights_only=True)
        assert set(rng) >= {"python", "numpy", "torch"}

    # MLflow holds each epoch exactly once (a list, not a set: a duplicate would show), with the values of
    # the run that kept going, and the restart where it happened.
    client = MlflowClient(tracking_uri)
    curve = client.get_metric_history(run.run_id, "train_loss")
    assert [m.step for m in sorted(curve, key=lambda m: (m.step, m.timestamp))] == list(range(1, EPOCHS + 1))
    assert [m.value for m in sorted(curve, key=lambda m: m.step)] == pytest.approx(
        [m["train_loss"] for m in reports]
    )
    resumed = client.get_metric_history(run.run_id, "resumed_from_epoch")
    assert [(m.step, m.value) for m in resumed] == [(resumed_at, resumed_at)]
    # Each epoch was logged only after its checkpoint was in storage: logging waits for Ray Train to register
    # the epoch, so a worker that dies before that cannot have logged an epoch that will run again.
    logged_at = {m.step: m.timestamp for m in curve}
    for checkpoint in _checkpoints(run_dir):
        epoch = torch.load(checkpoint / "model.pt", weights_only=True)["meta"]["metrics"]["epoch"]
        stored_ms = (checkpoint / "state.pt").stat().st_mtime * 1000
        assert logged_at[epoch] >= stored_ms - 1, (epoch, logged_at[epoch], stored_ms)


def _write_params(path: Path, storage: str, epochs: int) -> None:
    params = {
        "pretrain": {"epochs": epochs, "batch_size": 16, "lr": 0.05},
        "augment": {"crop_padding": 0},
        "ray": {"num_workers": 2, "storage_path": storage, "max_failures": 0},
    }
    path.write_text(yaml.safe_dump(params))


def _pretrain_command(work: Path, data: Path) -> list[str]:
    return stage_command("pretrain", work, data, out="models", metrics="metrics.json")


def test_a_stopped_pretrain_stage_resumes_its_run_from_s3_when_started_again(
    ray_address, prepared, tmp_path, repo_root, s3_env
):
    """`ray.storage_path: s3://…`: the stage's Ray run keeps its checkpoints in the S3 server (every rank writes
    its part with its node's keys; nothing on local disk); stopped with SIGINT after two epochs, the stage started
    again resumes the same run from its last checkpoint there, and the best model is read back from the bucket."""
    from mlflow.tracking import MlflowClient

    from resnet.data import s3

    storage = f"s3://ray/resume-{tmp_path.name}"
    _write_params(tmp_path / "params.yaml", storage, EPOCHS)
    # The stage's environment carries the s3_env fixture's AWS_* variables.
    command, env = _pretrain_command(tmp_path, prepared), stage_env(ray_address, tmp_path)
    stage = subprocess.Popen(
        command, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def run_keys() -> list[str]:
        return [key for key, _ in s3.list_objects(storage)]

    try:

        def registered_twice() -> bool:
            # Two epochs uploaded, and Ray's run snapshot (what a restart reads) written.
            keys = run_keys()
            states = [key for key in keys if key.endswith("/state.pt")]
            return any(key.endswith(f"/{SNAPSHOT}") for key in keys) and len(states) >= 2

        wait_for(registered_twice, 240, "2 epochs in S3")
        stage.send_signal(signal.SIGINT)  # what Ctrl-C (or a stopped `dvc repro`) sends
        first_output, _ = stage.communicate(timeout=120)
    finally:
        stage.kill()
    assert stage.returncode != 0, first_output[-3000:]
    assert not (tmp_path / "models" / "model.pt").exists()  # a stopped stage leaves no output
    (snapshot_key,) = [key for key in run_keys() if key.endswith(f"/{SNAPSHOT}")]
    run_name = snapshot_key.split("/")[-2]
    bucket, _ = s3.split_s3_uri(storage)
    snapshot = json.loads(s3.read_object(f"s3://{bucket}/{snapshot_key}"))
    last_saved = snapshot["latest_checkpoint_result"]["metrics"]["epoch"]
    assert 1 <= last_saved < EPOCHS

    # Resumed with more restarts allowed (what a user raises after a failure): an execution setting, not part of
    # the run's identity, so the same run continues and the change is recorded.
    output = run_stage_ok([*command, "-S", "ray.max_failures=1"], env)
    assert f"pretrain: resuming run {run_name}:" in output  # the same name: config, data, code
    assert "pretrain: resuming with changed execution settings: ray.max_failures 0 → 1" in output
    assert f"pretrain: resumed after epoch {last_saved} from its last checkpoint" in output, (
        first_output[-6000:] + "\n=====\n" + output[-6000:]
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == EPOCHS
    meta = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["meta"]
    assert meta["metrics"]["start_epoch"] == last_saved  # from the last registered epoch, not from scratch
    keys = run_keys()
    assert any(key.endswith("/rng-rank1.pt") for key in keys)  # every rank wrote its part
    # ray.checkpoints_to_keep (2) prunes within an attempt; the resumed attempt keeps its own two as well.
    assert 2 <= len([key for key in keys if key.endswith("/state.pt")]) <= 4
    assert not list(tmp_path.glob("**/checkpoint_*"))  # nothing on local disk

    # One MLflow run holds the whole curve: reopened, every epoch logged, finished.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resnet-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["ray.run_name"] == run_name
    assert run.data.tags["ray.max_failures"] == "1" and run.data.params["ray.num_workers"] == "2"
    assert run.data.tags["resume.changed_settings"] == "ray.max_failures 0 → 1"
    curve = sorted(
        client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: (m.step, m.timestamp)
    )
    assert [m.step for m in curve] == list(range(1, EPOCHS + 1))
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_epoch")
    assert [m.value for m in resumed] == [meta["metrics"]["start_epoch"]]
