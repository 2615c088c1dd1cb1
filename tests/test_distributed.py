"""Ray Train against a real (session) Ray cluster: a training worker killed three times in one run, while the
MLflow server is away, is replaced each time and training continues from the last checkpoint to the end an
uninterrupted run reaches; a stopped pretrain stage resumes its run when started again; checkpoints
land in S3 (SeaweedFS) when `ray.storage_path` is s3://."""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from localservers import MlflowServer
from stagerun import REPO, listening, own_env, ray_train_logs, stage_command, stage_env, wait_for

EPOCHS = 5
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints


@pytest.fixture(scope="module")
def prepared(tiny_fractals) -> Path:
    return tiny_fractals


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories holding the rank-0 state, oldest first."""
    return sorted(path.parent for path in run_dir.glob("checkpoint_*/state.pt"))


def _train_worker_pids() -> list[int]:
    """The Train workers of this session's Ray cluster, by their process titles among its raylet's children:
    found at once, where the state API (through the dashboard) can take seconds on a busy machine, long enough
    for a run of 1-second epochs to end before the kill lands."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid  # no public API
    pids = []
    for child in psutil.Process(raylet).children(recursive=True):  # a runtime env may wrap them
        with contextlib.suppress(psutil.NoSuchProcess):
            if " ".join(child.cmdline()).startswith("ray::RayTrainWorker"):
                pids.append(child.pid)
    return pids


def _actors_of_this_driver(class_name: str) -> list:
    """The actors of `class_name` this test process's Ray job created, alive or dead (the state API)."""
    import ray
    from ray.util.state import list_actors

    context = ray.get_runtime_context()
    filters = [("class_name", "=", class_name), ("job_id", "=", context.get_job_id())]
    # The cluster's address, given: without it Ray looks for one on the machine and fails where it finds several.
    return list_actors(address=context.gcs_address, filters=filters, detail=True)


KILLS = 3
# How long the S3 server stays down mid-run: past what pyarrow's default retries and Ray's three upload attempts
# ride out (~7-10 s: a worker group was lost to it), within what the run's storage filesystem does.
S3_DOWN_S = 15
KILLED_EPOCHS = 7
# A run that lost workers three times ends where an uninterrupted run with the same seed ends, to this absolute
# tolerance on its losses and accuracies: each restart continues from the checkpoint's weights, optimizer,
# schedule and every rank's random generators, and reads the epochs' data in the same seeded order.
SAME_AS_UNINTERRUPTED = 1e-4


def _killable_trainer(
    name: str, prepared: Path, tmp_path: Path, run=None, progress=None, epochs: int = KILLED_EPOCHS
):
    from resnet.config import AugmentConfig, PretrainConfig, RayConfig
    from resnet.distributed import TrainJob, make_trainer, storage_path

    ray_cfg = RayConfig(
        num_workers=2,
        max_failures=KILLS,
        checkpoints_to_keep=KILLED_EPOCHS + 1,  # every epoch: the straight run resumed for one more too
        storage_path=str(tmp_path / "ray"),
    )
    job = TrainJob(
        data_dir=str(prepared),
        optim=PretrainConfig(epochs=epochs, batch_size=16, lr=0.05).model_dump(),
        augment=AugmentConfig(crop_padding=0).model_dump(),
        mlflow_run=run,
    )
    return make_trainer(job, ray_cfg, name=name, storage=storage_path(ray_cfg), progress=progress)


def test_only_a_run_with_ray_datasets_gets_ray_trains_datasets_callback(tmp_path):
    """`Trainer` leaves out Ray Train's DatasetsCallback (which starts a DatasetManager actor) for a run of the
    memory loader, and only it: otherwise the callbacks are Ray Train's own, in its order; a run of the ray_data
    loader keeps it. (A run without it starts no DatasetManager: the worker-kill test below.)"""
    from resnet.config import AugmentConfig, PretrainConfig, RayConfig
    from resnet.distributed import TrainJob, make_trainer, storage_path

    cfg = RayConfig(storage_path=str(tmp_path / "ray"))
    names = {}
    for loader in ("memory", "ray_data"):
        optim = PretrainConfig(epochs=2, loader=loader).model_dump()
        job = TrainJob(data_dir=str(tmp_path), optim=optim, augment=AugmentConfig().model_dump())
        trainer = make_trainer(job, cfg, name=loader, storage=storage_path(cfg))
        names[loader] = [type(callback).__name__ for callback in trainer._create_default_callbacks()]
    assert "DatasetsCallback" in names["ray_data"]
    assert names["memory"] == [name for name in names["ray_data"] if name != "DatasetsCallback"]


class _Lines:
    """Collects the progress lines the Train controller sends (`ProgressPrinter`'s queue) while a run goes on."""

    def __init__(self, progress):
        self.queue, self.lines, self.stop = progress.queue, [], threading.Event()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self.stop.is_set():
            with contextlib.suppress(Empty):
                self.lines.append(self.queue.get(timeout=0.2))

    def registered(self) -> int:
        """The last epoch Ray Train has registered (its progress line sent)."""
        epochs = [int(m[1]) for line in self.lines if (m := re.match(r"pretrain epoch (\d+)/", line))]
        return max(epochs, default=0)

    def resumed(self) -> list[int]:
        """The epochs each new worker group resumed after, in order."""
        return [
            int(m[1]) for line in self.lines if (m := re.match(r"pretrain: resumed after epoch (\d+) ", line))
        ]

    def close(self) -> list[str]:
        self.stop.set()
        self.thread.join(timeout=5)
        return self.lines


def _off_loopback(sockets: set[tuple[str, int]]) -> list[str]:
    """The listeners that other machines could reach: any address but 127.0.0.0/8 and ::1 (an IPv4 loopback
    address mapped into IPv6 counts as loopback; 0.0.0.0 and :: do not)."""

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        mapped = getattr(address, "ipv4_mapped", None)
        return address.is_loopback or bool(mapped and mapped.is_loopback)

    return sorted(f"{ip}:{port}" for ip, port in sockets if not loopback(ip))


# A stage's own local Ray (no cluster configured), one task run on it, then every listener of its processes.
_LOCAL_RAY = """
import json, os, time, ray
from resnet.config import RayConfig
from resnet.distributed import init_ray
from stagerun import listening

init_ray(RayConfig(), "probe")
ray.get(ray.remote(lambda: 0).remote())  # a worker process up, with its own gRPC server
seen = set()
for _ in range(3):  # the dashboard's metrics endpoints may come up after ray.init returns
    seen |= listening(os.getpid())
    time.sleep(1)
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listening": sorted(seen)}))
"""


@pytest.mark.integration
def test_a_stages_own_local_ray_listens_on_loopback_only(tmp_path):
    """With no cluster configured a stage starts a Ray of its own: nothing of it is reachable from another
    machine. On Linux Ray would bind the GCS, the raylet, every worker and the dashboard agent to every interface
    and its metrics endpoints (unauthenticated) too."""
    done = subprocess.run(
        [sys.executable, "-c", _LOCAL_RAY],
        cwd=tmp_path,
        # Not the setting this test proves init_ray makes (a process that started the session cluster has it).
        env={k: v for k, v in own_env().items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        | {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(
        r"^probe: started a local Ray with \d+ CPUs \(dashboard http://127\.0\.0\.1:", done.stdout, re.M
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    sockets = {(ip, port) for ip, port in found["listening"]}
    # The GCS, the raylet, the dashboard and its agents, the worker: each with at least one listener, all seen.
    assert int(found["gcs"].rsplit(":", 1)[1]) in {port for _, port in sockets}
    assert len(sockets) >= 6, sockets
    assert _off_loopback(sockets) == []


@pytest.mark.integration
def test_the_session_cluster_listens_on_loopback_only(ray_address):
    """The test session's Ray cluster (and the S3 server it holds keys of), started as a stage starts its own."""
    sockets = listening(os.getpid())
    assert int(ray_address.rsplit(":", 1)[1]) in {port for _, port in sockets}
    assert _off_loopback(sockets) == []


@pytest.mark.integration
def test_a_worker_killed_three_times_while_mlflow_is_away_loses_no_epoch_and_ends_as_an_uninterrupted_run(
    ray_address, prepared, tmp_path
):
    """Three SIGKILLs of a DDP worker at random points of three epochs, and the MLflow server stopped for two
    epochs meanwhile: the run ends at its configured epoch, its checkpoints have no gap, MLflow's curve has every
    epoch once (the two kept while the server was away delivered when it came back, with their own times), the
    outage is said once, and the final metrics equal an uninterrupted run's.

    That uninterrupted run logs nothing to MLflow: so it stands, too, for a run whose Train controller died (with
    a killed sweep driver) after Ray Train registered epochs and before they were logged. Resumed by a new
    controller for one more epoch, it logs every registered epoch MLflow lacks, then its own."""
    from mlflow.tracking import MlflowClient

    from resnet.distributed import ProgressPrinter
    from resnet.tracking import start_run

    randomly = random.Random(os.environ.get("RESNET_KILL_SEED", "14"))
    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path).start()
    lines = None
    try:
        run = start_run(server.url, "resnet-pipeline", "killed", root=tmp_path)
        progress = ProgressPrinter()
        lines = _Lines(progress)
        trainer = _killable_trainer("killed", prepared, tmp_path, run, progress)
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
        thread.start()

        # Epoch 1 is logged after Ray Train registers it: on a busy machine, after its progress line arrives.
        client = MlflowClient(server.url)
        wait_for(
            lambda: client.get_metric_history(run.run_id, "train_loss"), 180, "the first epoch in MLflow"
        )
        server.stop()  # away for epochs 2 and 3
        first_seen = time.monotonic()
        wait_for(lambda: lines.registered() >= 2, 60, "the second epoch")
        epoch_s = time.monotonic() - first_seen
        victims = []
        for kill in range(KILLS):
            # Each kill waits until the group started after the last one has registered an epoch of its own (on
            # a busy machine, waiting a second after a kill could still land the next one in the same group).
            def own_epoch(kill=kill) -> bool:
                resumes = lines.resumed()
                return len(resumes) == kill and lines.registered() > max(resumes, default=1)

            wait_for(own_epoch, 120, f"an epoch of worker group {kill + 1}")
            time.sleep(randomly.uniform(0.05, 0.35) * epoch_s)
            workers = _train_worker_pids()
            assert len(workers) == 2, workers
            victims.append(sorted(workers)[randomly.randrange(2)])
            os.kill(victims[-1], signal.SIGKILL)
            if kill == 1:
                back_ms = time.time() * 1000
                server.start()

        thread.join(timeout=300)
        assert not thread.is_alive(), "training did not finish after its workers were killed"
        said = lines.close()
        result = outcome["result"]
        assert result.error is None
        # The run ended at its configured epoch, and Ray Train registered a checkpoint for every epoch: no gap.
        reports = sorted((metrics for _, metrics in result.best_checkpoints), key=lambda m: m["epoch"])
        assert [m["epoch"] for m in reports] == list(range(1, KILLED_EPOCHS + 1))
        # Each worker group started from the last saved epoch: three restarts, each from a later one.
        starts = [m["start_epoch"] for m in reports]
        resumed_at = sorted(set(starts) - {0})
        assert starts == sorted(starts) and len(resumed_at) == KILLS, starts
        assert not set(_train_worker_pids()) & set(victims)
        state = torch.load(Path(result.checkpoint.path) / "state.pt", weights_only=True)
        assert state["epoch"] == KILLED_EPOCHS and state["optimizer"]["state"]  # momentum buffers too

        # What the person running it saw: each restart, and the outage once, when it began and when it ended.
        assert [line for line in said if "resumed after" in line] == [
            f"pretrain: resumed after epoch {epoch} from its last checkpoint" for epoch in resumed_at
        ]
        away = [line for line in said if "does not answer" in line]
        assert away == [
            f"pretrain: warning: MLflow at {server.url} does not answer (connection refused); "
            "training goes on and keeps its metrics until it answers"
        ]
        back = [line for line in said if "answers again" in line]
        assert len(back) == 1 and back[0].startswith(
            "pretrain: MLflow answers again: delivered the metrics kept for epochs 2, 3"
        ), said
        assert not [line for line in said if "dropped" in line]

        # MLflow holds each epoch exactly once (a list, not a set: a duplicate would show), with the values of
        # the group that finished it; those kept while it was away carry the time they were measured.
        curve = sorted(
            client.get_metric_history(run.run_id, "train_loss"), key=lambda m: (m.step, m.timestamp)
        )
        assert [m.step for m in curve] == list(range(1, KILLED_EPOCHS + 1))
        assert [m.value for m in curve] == pytest.approx([m["train_loss"] for m in reports])
        assert curve[1].timestamp < back_ms and curve[2].timestamp < back_ms
        resumed = client.get_metric_history(run.run_id, "resumed_from_epoch")
        assert sorted((m.step, m.value) for m in resumed) == [(epoch, epoch) for epoch in resumed_at]
        # Each epoch was logged only after its checkpoint was in storage: logging waits for Ray Train to register
        # the epoch, so a worker that dies before that cannot have logged an epoch that will run again.
        logged_at = {m.step: m.timestamp for m in curve}
        for checkpoint, metrics in result.best_checkpoints:
            stored_ms = (Path(checkpoint.path) / "state.pt").stat().st_mtime * 1000
            assert logged_at[metrics["epoch"]] >= stored_ms - 1, (metrics["epoch"], stored_ms)
    finally:
        if lines is not None:  # its thread reads the queue actor: left running, it warns into a later test
            lines.close()
        server.stop()

    # The same seed without a kill ends at the same place.
    straight = _killable_trainer("straight", prepared, tmp_path).fit()
    assert straight.error is None
    final = max((metrics for _, metrics in straight.best_checkpoints), key=lambda m: m["epoch"])
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert reports[-1][key] == pytest.approx(final[key], abs=SAME_AS_UNINTERRUPTED), key
    # Neither run has Ray Datasets, so neither started Ray Data's DatasetManager (nor did any other run of this
    # driver: the session's in-process runs, all of the memory loader); nor a preemption watcher, off on the
    # session's cluster (tests/conftest.py).
    assert _actors_of_this_driver("DatasetManager") == []
    assert _actors_of_this_driver("PreemptionWatcher") == []

    # A new controller resumes it with an MLflow run: the registered epochs MLflow lacks are logged first, with
    # the metrics Ray Train registered, then the new epoch.
    registered = {m["epoch"]: m["train_loss"] for _, m in straight.best_checkpoints}
    assert sorted(registered) == list(range(1, KILLED_EPOCHS + 1))
    run = start_run(f"sqlite:///{tmp_path / 'resumed.db'}", "resnet-pipeline", "straight", root=tmp_path)
    resumed = _killable_trainer("straight", prepared, tmp_path, run, epochs=KILLED_EPOCHS + 1).fit()
    assert resumed.error is None and resumed.metrics["start_epoch"] == KILLED_EPOCHS
    curve = sorted(
        MlflowClient(run.tracking_uri).get_metric_history(run.run_id, "train_loss"), key=lambda m: m.step
    )
    assert [m.step for m in curve] == list(range(1, KILLED_EPOCHS + 2))
    assert [m.value for m in curve] == pytest.approx(
        [*(registered[epoch] for epoch in sorted(registered)), resumed.metrics["train_loss"]]
    )


# How long a stage may take to start its run and register its first epochs: ~70 s beside the rest of the suite
# on a 2-core machine; machines here differ up to 2.5× in speed, and the suite's other half may be at its busiest.
STARTED_S = 480


def _write_params(path: Path, storage: str, epochs: int) -> None:
    params = {
        "pretrain": {"epochs": epochs, "batch_size": 16, "lr": 0.05},
        "augment": {"crop_padding": 0},
        "ray": {"num_workers": 2, "storage_path": storage, "max_failures": 0},
    }
    path.write_text(yaml.safe_dump(params))


def _etag(body: bytes) -> str:
    """S3's ETag of `body` uploaded in one multipart part (as pyarrow uploads these small files): the MD5 of the
    part's MD5, and the number of parts."""
    return f"{hashlib.md5(hashlib.md5(body).digest()).hexdigest()}-1"


def _pretrain_command(work: Path, data: Path) -> list[str]:
    return stage_command("pretrain", work, data, out="models", metrics="metrics.json")


@pytest.mark.integration
def test_a_stopped_pretrain_stage_resumes_its_run_from_s3_when_started_again(
    ray_address, prepared, tmp_path, repo_root, s3_server, s3_env
):
    """`ray.storage_path: s3://…`: the stage's Ray run keeps its checkpoints in the S3 server (every rank writes
    its part with its node's keys; nothing on local disk); stopped with SIGINT after two epochs, the stage started
    again resumes the same run from its last checkpoint there, and the best model is read back from the bucket."""
    from mlflow.tracking import MlflowClient

    from resnet.data import s3

    started = time.time()
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

        try:
            wait_for(registered_twice, STARTED_S, "2 epochs in S3")
        except AssertionError as failure:  # with what the stage said and where its run stood
            stage.kill()
            said_so_far, _ = stage.communicate()
            raise AssertionError(
                f"{failure}\n{said_so_far[-6000:]}\n=====\n{ray_train_logs(started)}"
            ) from None
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
    # the run's identity, so the same run continues and the change is recorded. After its first epoch, the S3
    # server restarts (its process stopped, started again on the same ports S3_DOWN_S later): the uploads of the
    # next checkpoints meet a server that is not there.
    again = subprocess.Popen(
        [*command, "-S", "ray.max_failures=1"],
        cwd=repo_root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    said: list[tuple[float, str]] = []  # (when, line)
    reader = threading.Thread(
        target=lambda: [said.append((time.monotonic(), line)) for line in again.stdout], daemon=True
    )
    reader.start()
    try:

        def resumed() -> bool:
            return any("resumed after epoch" in line for _, line in said)

        try:
            wait_for(lambda: resumed() or again.poll() is not None, STARTED_S, "the resumed first epoch")
            assert resumed(), "the resumed stage ended before its first epoch"
        except AssertionError as failure:  # with what each run said, to tell where the second one stood
            again.kill()
            reader.join(timeout=10)
            said_so_far = "".join(line for _, line in said)
            raise AssertionError(
                f"{failure}\n{first_output[-3000:]}\n=====\n{said_so_far[-6000:]}\n=====\n"
                + ray_train_logs(started)
            ) from None
        s3_server.stop()
        time.sleep(S3_DOWN_S)
        s3_server.start(same_ports=True)
        back = time.monotonic()
        again.wait(timeout=600)
    finally:
        again.kill()
    reader.join(timeout=10)
    output = "".join(line for _, line in said)
    assert again.returncode == 0, output[-6000:]
    # The next epoch (under a second of training) was registered only after the server was back: its
    # checkpoint's upload waited through the restart.
    after = [when for when, line in said if re.match(rf"pretrain epoch {last_saved + 2}/", line)]
    assert after and after[0] > back, output[-3000:]
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
    # Nothing half-written: every object of the run is whole (its ETag, the MD5 the server computed of the parts
    # it received, matches what it gives back), and every checkpoint Ray registered loads.
    for key in keys:
        answer = s3.s3_client().get_object(Bucket=bucket, Key=key)
        assert answer["ETag"].strip('"') == _etag(answer["Body"].read()), key
    snapshot = json.loads(s3.read_object(f"s3://{bucket}/{snapshot_key}"))
    run_prefix = f"s3://{bucket}/{snapshot_key.rsplit('/', 1)[0]}"
    registered = [entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]]
    assert len(registered) == 2, snapshot  # ray.checkpoints_to_keep
    for name in registered:
        state = torch.load(io.BytesIO(s3.read_object(f"{run_prefix}/{name}/state.pt")), weights_only=True)
        assert state["optimizer"]["state"], name

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
