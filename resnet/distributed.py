"""Ray Train glue: connect to (or start) a cluster, and run `engine.fit` as a TorchTrainer with DDP.

The worker function is the only code that runs inside Ray Train workers. It rebuilds everything from a plain,
picklable `TrainJob`, trains with `engine.fit` (which wraps the model in DDP; Ray Train has already set up the
gloo or NCCL process group), and after every epoch reports the global metrics with a checkpoint from rank 0.
Once Ray Train has registered an epoch, `EpochReporter` (in the Train controller) logs it to the MLflow run the
job names (Ray Train V2 has no MLflow callback of its own) and sends its progress line to the driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback

from resnet.config import AugmentConfig, FinetuneConfig, PretrainConfig, RayConfig
from resnet.data.loading import PreparedData, load_prepared
from resnet.data.prepare import join_location, read_manifest, read_shard, split_files
from resnet.data.s3 import is_s3_uri, split_s3_uri
from resnet.engine import TrainState, fit, save_model_file
from resnet.errors import first_line
from resnet.finetune import FinetunePlan
from resnet.io import atomic_path
from resnet.models import build_model
from resnet.pretrained import state_dict_digest

# Progress lines from rank 0. Through a logger, not print: Ray Train tees a worker's prints to its log and its
# stdout, and the driver would show each line twice.
log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # full training state, to resume (rank 0 writes it)
RNG_FILE = "rng-rank{rank}.pt"  # each rank's global RNG states
MODEL_FILE = "model.pt"  # weights + meta, what the stages hand on

# Forwarded from the driver to every Ray worker of the job (when set), so that workers reach the same S3
# endpoint in the same region as the driver. Never credentials: the job's runtime_env is shown on the dashboard
# and kept in Ray's logs and job records. The nodes get credentials from their own environment (the local stack
# starts them with its keys) or their role (an instance profile, IRSA).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def forwarded_env() -> dict[str, str]:
    """What the driver hands its job's workers through runtime_env: FORWARDED_ENV's variables that are set."""
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def init_ray(cfg: RayConfig, stage: str = "ray") -> None:
    """Connect to `ray.address`, else `RAY_ADDRESS`, else start a local Ray on this machine, and say which in
    one line.

    Ray's own output (its daemons', the Train controller's and the workers' logs) stays in Ray's log files
    rather than streaming into the stage's output: the stage prints its own progress (`EpochReporter`, the
    sweep's `SweepReporter`), and a failure reaches the driver as an exception with the worker's traceback.
    The local Ray keeps its dashboard on: Ray Train's placement-group cleanup asks the dashboard's state API,
    and without it a second Tune trial on a small machine never gets its workers. Its workers run at normal
    priority (Ray's default is nice 15). It listens on 127.0.0.1 only (`on_loopback_only`).
    """
    if ray.is_initialized():
        return
    env = forwarded_env()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and "://" not in address:
        # Ray Train's placement-group cleaner finds its cluster through RAY_ADDRESS (else by scanning the
        # machine, which fails where several Ray clusters run, as on a test machine).
        env["RAY_ADDRESS"] = address
    runtime_env = {"env_vars": env} if env else None
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "runtime_env": runtime_env}
    _keep_worker_pool_warnings_in_the_log()
    if address:
        ray.init(address=address, **quiet)
        print(f"{stage}: connected to the Ray cluster at {address}; Ray's logs are on its nodes", flush=True)
        return
    on_loopback_only()
    context = ray.init(
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        # Ray starts workers at nice 15, below its own daemons; a machine that runs one training job wants its
        # DDP workers at full priority (measured: +6% images/s on 2 cores, benchmarks/RESULTS.md). A cluster
        # started with `ray start` takes the same from RAY_worker_niceness=0 in its environment.
        _system_config={"worker_niceness": 0},
        **quiet,
    )
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(
        f"{stage}: started a local Ray with {cpus} CPUs (dashboard http://{context.dashboard_url}; "
        f"Ray's logs in {ray_log_dir()})",
        flush=True,
    )


def on_loopback_only() -> None:
    """From now on, a local Ray that this process starts (`ray.init()` without an address) listens on 127.0.0.1
    only, and the addresses this process and its children give Ray for it stay 127.0.0.1.

    On Linux, Ray gives a local cluster the machine's routable address and binds its servers to every interface:
    the GCS, the raylet, every worker's gRPC server, the dashboard agent, and the metrics endpoints, which
    answer anyone. Nothing outside this machine needs to reach a one-machine Ray; but Ray refuses 127.0.0.1 as
    `_node_ip_address`, and rewrites a 127.0.0.1 address to connect to into the machine's. Its loopback mode
    is what it runs on macOS and Windows, chosen by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and read when Ray is
    imported: so it goes into this process's environment, which Ray's daemons, its workers and this process's
    children inherit, and into the constant that this process's Ray read already. Under it `ray start` refuses
    to start a worker node: call it only in a process whose Ray is this machine's own."""
    import ray._private.ray_constants as ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _keep_worker_pool_warnings_in_the_log() -> None:
    """Ray's raylet tells every driver when a node has started several worker processes per CPU ("WARNING: 8
    PYTHON worker processes have been started ..."): each Train run starts half a dozen actors, so a sweep on a
    small machine triggers it all the time, and there is nothing for a user of this pipeline to do about it. It
    goes to the log. Every other message from the raylet (running out of memory, ...) is still printed."""
    import ray._private.worker as ray_worker  # no public switch for this one message

    print_to_stdstream = ray_worker.print_to_stdstream
    if getattr(print_to_stdstream, "keeps_worker_pool_warnings", False):
        return

    def filtered(data: dict, ignore_prefix: bool) -> None:
        lines = data.get("lines") or []
        if (
            data.get("pid") == "raylet"
            and lines
            and all("worker processes have been started" in x for x in lines)
        ):
            log.info("ray: %s", " ".join(lines))
            return
        print_to_stdstream(data, ignore_prefix)

    filtered.keeps_worker_pool_warnings = True
    ray_worker.print_to_stdstream = filtered


def ray_log_dir() -> str:
    """Where this machine's Ray session keeps its logs."""
    node = getattr(ray._private.worker.global_worker, "node", None)  # no public API for the session directory
    return (
        str(Path(node.get_session_dir_path()) / "logs")
        if node is not None
        else "/tmp/ray/session_latest/logs"
    )


@dataclass(frozen=True)
class Storage:
    """Where Ray keeps a run's checkpoints and results: `path` on `filesystem` (None: Ray infers it)."""

    path: str
    filesystem: Any = None  # a pyarrow.fs.FileSystem

    def run_config_kwargs(self) -> dict[str, Any]:
        return {"storage_path": self.path, "storage_filesystem": self.filesystem}

    def checkpoint(self, path: str) -> Checkpoint:
        """The checkpoint at `path` as Ray reports it for a run under this storage (on `filesystem`, no scheme)."""
        return Checkpoint(path, filesystem=self.filesystem)


# Attempts of each request to the S3 storage of a run (checkpoints, Ray Train's run state), where pyarrow makes 3:
# AWS's standard retries back off up to 1 s, 2 s, 4 s, ... between them, so a request rides out ~15-20 s of an
# S3 server that does not answer (restarted, a network blip) instead of ~2 s; Ray retries a checkpoint's upload
# 3 times on top. A worker group lost to a failed upload costs a restart from the last checkpoint.
# Errors S3 answers (403, 404, a bad bucket) are not retried.
S3_ATTEMPTS = 6


class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
    """pyarrow's S3 filesystem with S3_ATTEMPTS attempts per request, kept when pickled: Ray pickles a run's
    storage filesystem to its controller and workers, and pyarrow's own pickling drops the retry strategy."""

    def __init__(self, **settings):
        super().__init__(
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS), **settings
        )

    def __reduce__(self):
        settings = super().__reduce__()[1][0]  # pyarrow's construction arguments (credentials only if given)
        return _retrying_s3, (settings,)


def _retrying_s3(settings: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**settings)


def storage_path(cfg: RayConfig, root: str | Path = ".") -> Storage:
    """`ray.storage_path` for Ray, always with its filesystem named, so that the checkpoint paths Ray reports
    (on that filesystem, without the scheme) can be opened again: a local path is made absolute (relative ones
    from the repository root); `s3://` gets a pyarrow S3 filesystem, pointed at AWS_ENDPOINT_URL_S3 (or
    AWS_ENDPOINT_URL) when set (SeaweedFS, MinIO: pyarrow ignores those variables) and in AWS_REGION (or
    AWS_DEFAULT_REGION) when set, else in the bucket's own region, which pyarrow asks AWS for; `gs://` and
    other URIs get pyarrow's filesystem for their scheme. Credentials are left to each filesystem's usual chain
    in each process (environment, config files, instance role)."""
    uri = cfg.storage_path
    if "://" not in uri:
        return Storage(str((Path(root) / uri).resolve()))
    if is_s3_uri(uri):
        bucket, prefix = split_s3_uri(uri)
        path = f"{bucket}/{prefix}".rstrip("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint:
            return Storage(
                path, RetryingS3FileSystem(endpoint_override=endpoint, region=region or "us-east-1")
            )
        if region:
            return Storage(path, RetryingS3FileSystem(region=region))
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    if isinstance(filesystem, pyarrow.fs.S3FileSystem):  # in the bucket's region, which pyarrow asked AWS for
        filesystem = RetryingS3FileSystem(region=filesystem.region)
    return Storage(path, filesystem)


def run_fingerprint(*parts: Any) -> str:
    """A short hash of what determines a training run (config, data hash, the code's sources), used as its Ray
    run name: running a stage again after it was stopped finds the same name and resumes that run."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
    code = Path(__file__).resolve().parent
    for source in sorted(code.rglob("*.py")):
        digest.update(str(source.relative_to(code)).encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class TrainJob:
    """What a Ray Train worker needs, as plain data (it is pickled to every worker)."""

    data_dir: str
    optim: dict[str, Any]  # a PretrainConfig or FinetuneConfig, dumped
    augment: dict[str, Any]
    kind: str = "pretrain"  # or "finetune"
    # Fine-tuning's starting point: {"model_name": str, "model": state dict, head sized for the data}, as a Ray
    # ObjectRef (the weights go once through the object store to every node) or as the dict itself.
    init_weights: Any = None
    threads_per_worker: int = 1
    mlflow_run: Any = None  # tracking.RunHandle or None
    meta: dict[str, Any] = field(default_factory=dict)  # extra metadata to store in model files
    stage: str = "pretrain"  # the name progress lines start with

    def to_config(self) -> dict[str, Any]:
        # Shallow, unlike dataclasses.asdict, which would deep-copy the ObjectRef and the run handle.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------- Ray Data loading

# Rows each worker shuffles among as they stream in (on top of the shards' seeded order from prepare).
SHUFFLE_BUFFER = 2048


def _read_shards(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Parquet shard paths → their rows as uint8 NCHW images and int64 labels (what engine.fit expects)."""
    parts = [read_shard(str(path)) for path in batch["path"]]
    images = np.concatenate([p[0] for p in parts])
    return {
        "image": np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
        "label": np.concatenate([p[1] for p in parts]),
    }


def train_dataset(data_dir: str, task_cpus: float) -> ray.data.Dataset:
    """The prepared train split as a Ray Data dataset: shards are read and decoded by Ray tasks (each asking
    `task_cpus`) and streamed to the workers, so no process holds the whole split. Built from the manifest's
    file list rather than `read_parquet`, whose file listing step asks a whole CPU that training workers
    may hold. Called inside the Train controller."""
    import ray.data

    # Ray Data's per-operator progress bars flood a log; the training loop reports progress per epoch.
    ray.data.DataContext.get_current().enable_progress_bars = False
    manifest = read_manifest(data_dir)
    files = [{"path": join_location(data_dir, name)} for name in split_files(manifest, "train")]
    return ray.data.from_items(files).map_batches(_read_shards, batch_size=1, num_cpus=task_cpus)


class RayDataSource:
    """`engine.fit`'s data with the train split streaming from this worker's Ray Data shard. The validation
    split is small next to training (and must count every image exactly once), so it stays in memory."""

    def __init__(self, shard, train_rows: int, held_out: PreparedData):
        self.shard, self.train_rows, self.held_out = shard, train_rows, held_out
        self.mean, self.std, self.num_classes = held_out.mean, held_out.std, held_out.num_classes

    def train_steps(self, batch_size: int, world_size: int = 1) -> int:
        # Ray Train splits the stream into equal shards (the remainder is dropped), so ranks step in lockstep.
        return max(1, math.ceil((self.train_rows // world_size) / batch_size))

    def train_epoch(self, batch_size: int, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1):
        batches = self.shard.iter_torch_batches(
            batch_size=batch_size,
            device="cpu",  # augmentation runs on uint8 CPU tensors; fit moves batches to the device
            local_shuffle_buffer_size=SHUFFLE_BUFFER,
            local_shuffle_seed=(seed * 1_000_003 + epoch) * 64 + rank,
        )
        for batch in batches:
            yield batch["image"], batch["label"]

    def val_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1):
        return self.held_out.val_batches(batch_size, rank=rank, world_size=world_size)


def build_job_model(job: TrainJob, num_classes: int) -> tuple[torch.nn.Module, str, FinetunePlan | None]:
    """(model, model name, fine-tuning plan) for the job: a fresh model to pretrain (no plan), or the starting
    weights to fine-tune with the plan of `finetune.strategy`."""
    if job.kind == "pretrain":
        optim = PretrainConfig(**job.optim)
        model = build_model(
            optim.model, num_classes, zero_init_residual=optim.zero_init_residual, dropout=optim.dropout
        )
        return model, optim.model, None
    optim = FinetuneConfig(**job.optim)
    init = job.init_weights
    if isinstance(init, ray.ObjectRef):
        init = ray.get(init)
    model = build_model(init["model_name"], num_classes, dropout=optim.dropout)
    model.load_state_dict(init["model"])  # the head was already sized for this data by the driver
    return model, init["model_name"], FinetunePlan.from_config(model, optim)


def load_train_state(directory: str | Path, rank: int) -> TrainState:
    """A checkpoint's training state, with this rank's RNG states if it saved them (a run resumed with more
    workers than it had starts the new ranks' generators from the seed)."""
    directory = Path(directory)
    blob = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    rng_file = directory / RNG_FILE.format(rank=rank)
    if rng_file.is_file():
        blob["rng"] = torch.load(rng_file, map_location="cpu", weights_only=True)
    return TrainState(**blob)


def write_checkpoint(directory: Path, state: TrainState, rank: int, model_meta: dict[str, Any]) -> None:
    """This rank's part of an epoch's checkpoint; Ray Train merges the ranks' directories into one."""
    torch.save(state.rng, directory / RNG_FILE.format(rank=rank))
    if rank == 0:  # the rest is identical on every rank (DDP keeps the weights in sync): one copy
        # vars(), not dataclasses.asdict(): asdict deep-copies every tensor of the state first.
        torch.save(vars(state) | {"rng": None}, directory / STATE_FILE)
        weights = state.ema["module"] if state.ema is not None else state.model
        save_model_file(directory / MODEL_FILE, weights, model_meta)


def replica_fingerprints(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Every rank's node and a hash of its parameters, gathered on all ranks. DDP must leave the replicas
    bit-identical; a difference means the ranks silently trained different models."""
    import torch.distributed as dist

    context = ray.train.get_context()
    mine = {
        "rank": context.get_world_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "params_sha256": state_dict_digest(dict(model.named_parameters())),
    }
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def progress_line(stage: str, total_epochs: int, metrics: dict[str, float]) -> str:
    return (
        f"{stage} epoch {int(metrics['epoch'])}/{total_epochs}: "
        f"train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.4f} | "
        f"val loss {metrics['val_loss']:.4f} acc {metrics['val_acc']:.4f} | lr {metrics['lr']:.3g} | "
        f"{metrics['images_per_sec']:.0f} img/s | {metrics['epoch_seconds']:.1f} s"
    )


# Reported with each epoch for Ray (Tune, the checkpoint meta), not curves: not logged to MLflow.
NOT_LOGGED = ("epoch", "start_epoch", "early_stopped")


def _curves(reported: dict[str, Any]) -> dict[str, Any]:
    """What MLflow records of an epoch's reported metrics."""
    return {k: v for k, v in reported.items() if k not in NOT_LOGGED}


class EpochReporter(UserCallback):
    """Runs in the Ray Train controller once every rank has reported an epoch and its checkpoint is
    registered: logs rank 0's metrics to the MLflow run (step = epoch) and sends the epoch's progress line to
    the driver (`lines`, a `ray.util.queue.Queue`; None: the sweep's driver prints from Tune's results).

    Logging here rather than in the worker is what makes each epoch appear exactly once in MLflow: a worker
    group that dies before its epoch is registered is restarted from the previous checkpoint and runs that
    epoch again; had the worker logged it first, the curve would hold it twice. A controller that died between
    the registration and the logging (with its driver: a killed sweep) left that epoch out; the controller that
    resumes the run logs it from Ray Train's record of the run's checkpoints (`_log_epochs_left_out`).

    An MLflow server that stops answering never stops training: each request fails at once (no minutes of
    retries), the epoch's metrics are kept, in order and with their own timestamps, and sent with the next
    epoch's once the server answers again. It is said once when it goes away and once when it is back; metrics
    still kept after the last epoch (and MLflow's own retries) are said to be dropped, epoch by epoch."""

    def __init__(self, stage: str, epochs: int, run=None, lines=None):
        self.stage, self.epochs, self.run, self.lines = stage, epochs, run, lines
        self.last_epoch = 0  # guards against a report delivered twice
        self.start_epoch = 0  # where the running worker group started (> 0: from a checkpoint)
        # (step, time in ms, metrics) not yet in MLflow, oldest first
        self.unsent: list[tuple[int, int, dict[str, Any]]] = []
        self.kept_steps: set[int] = set()  # steps kept while MLflow did not answer
        self.mlflow_away = False

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        reported = metrics[0]
        epoch, start = int(reported["epoch"]), int(reported.get("start_epoch", 0))
        if epoch <= self.last_epoch:
            return
        resumed_run = self.last_epoch == 0 and start > 0  # begun by another controller, now gone
        self.last_epoch = epoch
        if start != self.start_epoch:  # a restarted worker group, or a resumed run
            self.start_epoch = start
            self._send(f"{self.stage}: resumed after epoch {start} from its last checkpoint")
            if resumed_run and checkpoint is not None:
                self._log_epochs_left_out(start, checkpoint)
            self._log({"resumed_from_epoch": start}, step=start)
        self._send(progress_line(self.stage, self.epochs, reported))
        self._log(_curves(reported), step=epoch)
        if epoch >= self.epochs or reported.get("early_stopped"):
            self._deliver_the_rest()

    def _log_epochs_left_out(self, start: int, checkpoint: Checkpoint) -> None:
        """The epochs up to `start` that Ray Train registered for this run (those whose checkpoints it keeps)
        and MLflow does not have: the previous controller died before logging them. Logged now, with the
        metrics Ray Train recorded for them."""
        if self.run is None:
            return
        from resnet.tracking import fail_fast

        try:
            record = ray.train.Result.from_path(os.path.dirname(checkpoint.path), checkpoint.filesystem)
            with fail_fast():
                logged = {m.step for m in self.run.client.get_metric_history(self.run.run_id, "train_loss")}
        except Exception as exc:  # noqa: BLE001 -- whatever fails here, training goes on
            log.warning("%s: could not check MLflow for epochs left out: %s", self.stage, exc)
            return
        registered = {int(metrics["epoch"]): metrics for _, metrics in record.best_checkpoints}
        if record.metrics:
            registered[int(record.metrics["epoch"])] = record.metrics
        for epoch in sorted(set(registered) - logged):
            if epoch <= start:
                self._send(
                    f"{self.stage}: epoch {epoch}, left out of MLflow when the run stopped, logged now"
                )
                self._log(_curves(registered[epoch]), step=epoch)

    def _log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        from resnet.tracking import fail_fast

        self.unsent.append((step, int(time.time() * 1000), metrics))
        with fail_fast():
            self._flush()

    def _flush(self) -> bool:
        """Send what is kept, oldest first; False (and the rest kept) when MLflow does not take it."""
        try:
            while self.unsent:
                step, timestamp_ms, metrics = self.unsent[0]
                self.run.log_metrics(metrics, step=step, timestamp_ms=timestamp_ms)
                self.unsent.pop(0)
        except Exception as exc:  # noqa: BLE001 -- whatever MLflow raises, training goes on
            self.kept_steps.update(step for step, _, _ in self.unsent)
            log.warning("%s: MLflow did not take step %d: %s", self.stage, self.unsent[0][0], exc)
            if not self.mlflow_away:
                self.mlflow_away = True
                self._send(
                    f"{self.stage}: warning: MLflow at {self._where()} does not answer ({_short_reason(exc)}); "
                    "training goes on and keeps its metrics until it answers"
                )
            return False
        if self.mlflow_away:
            self.mlflow_away = False
            self._send(
                f"{self.stage}: MLflow answers again: delivered the metrics kept for "
                f"{_steps(self.kept_steps)}"
            )
            self.kept_steps.clear()
        return True

    def _deliver_the_rest(self) -> None:
        """After the last epoch: what is still kept gets MLflow's own retries (minutes), then is dropped."""
        if self.unsent and not self._flush():
            dropped = {step for step, _, _ in self.unsent}
            self.unsent.clear()
            self._send(
                f"{self.stage}: warning: MLflow still does not answer after the last epoch: dropped the "
                f"metrics of {len(dropped)} {'epoch' if len(dropped) == 1 else 'epochs'} ({_steps(dropped)})"
            )

    def _where(self) -> str:
        from resnet.tracking import redact

        return redact(self.run.tracking_uri)

    def _send(self, line: str) -> None:
        log.info(line)  # the controller's own log file
        if self.lines is not None:
            self.lines.put(line)


def _steps(steps: set[int]) -> str:
    ordered = sorted(steps)
    return f"epoch {ordered[0]}" if len(ordered) == 1 else "epochs " + ", ".join(map(str, ordered))


def _short_reason(exc: Exception) -> str:
    text = str(exc)
    for phrase in ("Connection refused", "Read timed out", "timed out", "Name or service not known"):
        if phrase in text:
            return phrase.lower()
    return first_line(exc, limit=160)


class ProgressPrinter:
    """The driver's end of `EpochReporter`'s lines: a queue actor (no CPU) that the controller puts lines
    into, printed by a thread here while `trainer.fit()` blocks the main thread (which keeps Ctrl-C)."""

    def __init__(self):
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node, as Ray Train's controller: a worker node lost mid-run must not take it along.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    @contextlib.contextmanager
    def printing(self):
        stop = threading.Event()

        def pump(final: bool = False) -> None:
            from ray.util.queue import Empty

            while final or not stop.is_set():
                try:
                    line = self.queue.get(timeout=0.5 if not final else 0)
                except Empty:
                    if final:
                        return
                    continue
                except Exception:  # the queue actor went away (Ray shut down under us)
                    return
                print(line, flush=True)

        thread = threading.Thread(target=pump, name="progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            pump(final=True)  # what arrived after the last poll


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    job = TrainJob(**config)
    torch.set_num_threads(job.threads_per_worker)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    optim = (PretrainConfig if job.kind == "pretrain" else FinetuneConfig)(**job.optim)
    augment = AugmentConfig(**job.augment)
    torch.manual_seed(optim.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)

    if optim.loader == "ray_data":
        manifest = read_manifest(job.data_dir)
        data = RayDataSource(
            ray.train.get_dataset_shard("train"),
            manifest["counts"]["train"]["total"],
            load_prepared(job.data_dir, splits=("val",)),
        )
        held_out = data.held_out
    else:
        data = held_out = load_prepared(job.data_dir, splits=("train", "val"))
    model, model_name, plan = build_job_model(job, data.num_classes)
    meta = {
        "model_name": model_name,
        "num_classes": data.num_classes,
        "classes": held_out.classes,
        "image_size": int(held_out.splits["val"].images.shape[-1]),
        "resize": read_manifest(job.data_dir).get("resize", "center_crop"),  # how new images are resized
        "mean": list(data.mean),
        "std": list(data.std),
        "data_hash": held_out.content_hash,
        **job.meta,
    }

    resume = None
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a resumed run: continue after the last epoch
        with checkpoint.as_directory() as directory:
            resume = load_train_state(directory, rank)
        start_epoch = resume.epoch
        if rank == 0:
            log.info("%s: resuming after epoch %d from %s", job.stage, start_epoch, checkpoint.path)

    def report(metrics: dict[str, float], state: TrainState) -> None:
        # MLflow and the progress line get the epoch from the controller once it is registered (EpochReporter).
        metrics = metrics | {"start_epoch": start_epoch, "early_stopped": state.stopped}
        replicas = replica_fingerprints(model)
        if len({r["params_sha256"] for r in replicas}) > 1:
            warnings.warn(
                f"DDP replicas differ after epoch {int(metrics['epoch'])}: {replicas}", stacklevel=1
            )
        with tempfile.TemporaryDirectory() as directory:
            model_meta = meta | {"metrics": metrics, "replicas": replicas}
            write_checkpoint(Path(directory), state, rank, model_meta)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))

    from resnet.tracking import system_metrics  # mlflow: imported where a run is logged, not by every user

    with system_metrics(job.mlflow_run if rank == 0 else None):  # one node's view: rank 0's
        fit(
            model,
            data,
            optim,
            augment,
            device=ray.train.torch.get_device(),
            rank=rank,
            world_size=world_size,
            plan=plan,
            resume=resume,
            on_epoch_end=report,
        )


def scaling_config(cfg: RayConfig, cpus_per_worker: float | None = None) -> ScalingConfig:
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return ScalingConfig(
        num_workers=cfg.num_workers,
        use_gpu=cfg.use_gpu,
        resources_per_worker=resources,
        placement_strategy=cfg.placement_strategy,
    )


class Trainer(TorchTrainer):
    """A TorchTrainer that starts Ray Data's machinery only for a run with Ray Datasets.

    Ray Train (2.60) gives every run a DatasetManager actor, datasets or not: a process of its own that imports
    Ray Data, ~3 core-seconds for nothing in a run of the `memory` loader, and one more process to start before
    the workers can (benchmarks/RESULTS.md: -10% of a short run's CPU and wall time on 2 cores). Without
    datasets its callback is left out; with them (the `ray_data` loader) everything is as Ray Train has it.
    `_create_default_callbacks` is Ray Train's own hook, not a public API: tests/test_distributed.py checks
    both cases against the installed Ray."""

    def _create_default_callbacks(self) -> list:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [callback for callback in callbacks if not isinstance(callback, DatasetsCallback)]


def make_trainer(
    job: TrainJob,
    cfg: RayConfig,
    *,
    name: str,
    storage: Storage,
    metric: str = "val_acc",
    mode: str = "max",
    cpus_per_worker: float | None = None,
    callbacks: list | None = None,
    progress: ProgressPrinter | None = None,
) -> Trainer:
    """A TorchTrainer for `job` that keeps the best `ray.checkpoints_to_keep` checkpoints by `metric` and
    restarts its workers from the last one up to `ray.max_failures` times. A trainer with the name of an
    unfinished run under the same storage resumes that run. Each registered epoch goes to `job.mlflow_run`
    and, as a progress line, to `progress` (`EpochReporter`), then to `callbacks` (Tune's)."""
    streaming = job.optim.get("loader") == "ray_data"
    worker_cpus = cpus_per_worker if cpus_per_worker is not None else cfg.cpus_per_worker
    if streaming:
        # Ray Data's read tasks need CPU that training workers do not hold: each worker leaves
        # `data_cpus_per_worker` of its share to them.
        worker_cpus = round(worker_cpus - cfg.data_cpus_per_worker, 4)
    return Trainer(
        train_loop_per_worker,
        train_loop_config=job.to_config(),
        # A factory, so that the dataset is built where the Train controller runs (also on a remote cluster).
        datasets=(
            {"train": functools.partial(train_dataset, job.data_dir, cfg.data_cpus_per_worker)}
            if streaming
            else None
        ),
        dataset_config=DataConfig(datasets_to_split=["train"]) if streaming else None,
        scaling_config=scaling_config(cfg, worker_cpus),
        run_config=RunConfig(
            name=name,
            **storage.run_config_kwargs(),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoints_to_keep,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=mode,
            ),
            failure_config=FailureConfig(
                max_failures=cfg.max_failures, controller_failure_limit=cfg.controller_failure_limit
            ),
            # The epoch is logged before Tune hears of it: Tune may stop the trial on that result (ASHA, or
            # the trial's last epoch), which ends this controller too.
            callbacks=[
                EpochReporter(
                    job.stage,
                    job.optim["epochs"],
                    job.mlflow_run,
                    progress.queue if progress is not None else None,
                ),
                *(callbacks or []),
            ],
        ),
    )


def copy_model_file(checkpoint: Checkpoint, destination: str | Path) -> dict[str, Any]:
    """Copy a checkpoint's model file (from local disk or S3) to `destination`; returns its meta."""
    with checkpoint.as_directory() as directory, atomic_path(destination) as tmp:
        shutil.copyfile(Path(directory) / MODEL_FILE, tmp)
    return torch.load(destination, map_location="cpu", weights_only=True)["meta"]
