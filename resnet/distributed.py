"""Ray Train glue: connect to (or start) a cluster, and run `engine.fit` as a TorchTrainer with DDP.

The worker function is the only code that runs inside Ray Train workers. It rebuilds everything from a plain,
picklable `TrainJob`, trains with `engine.fit` (which wraps the model in DDP; Ray Train has already set up the
gloo or NCCL process group), and after every epoch reports the global metrics with a checkpoint from rank 0.
Rank 0 also logs each epoch to the MLflow run the job names: Ray Train V2 has no MLflow callback of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from resnet.config import AugmentConfig, FinetuneConfig, PretrainConfig, RayConfig
from resnet.data.loading import PreparedData, load_prepared
from resnet.data.prepare import join_location, read_manifest, read_shard, split_files
from resnet.engine import TrainState, fit, load_model_file, save_model_file
from resnet.finetune import apply_strategy, replace_head
from resnet.io import atomic_path
from resnet.models import build_model

STATE_FILE = "state.pt"  # full training state, to resume
MODEL_FILE = "model.pt"  # weights + meta, what the stages hand on


def init_ray(cfg: RayConfig) -> None:
    """Connect to `ray.address`, else `RAY_ADDRESS`, else start a local Ray on this machine.

    The local one keeps its dashboard on: Ray Train's placement-group cleanup asks the dashboard's state API,
    and without it a second Tune trial on a small machine never gets its workers.
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1")


def storage_path(cfg: RayConfig, root: str | Path = ".") -> str:
    """Ray wants an absolute path or a URI; a relative one is taken from the repository root."""
    if "://" in cfg.storage_path:
        return cfg.storage_path
    return str((Path(root) / cfg.storage_path).resolve())


@dataclass(frozen=True)
class TrainJob:
    """What a Ray Train worker needs, as plain data (it is pickled to every worker)."""

    data_dir: str
    optim: dict[str, Any]  # a PretrainConfig or FinetuneConfig, dumped
    augment: dict[str, Any]
    kind: str = "pretrain"  # or "finetune"
    init_from: str | None = None  # model file to fine-tune from
    threads_per_worker: int = 1
    mlflow_run: Any = None  # tracking.RunHandle or None
    meta: dict[str, Any] = field(default_factory=dict)  # extra metadata to store in model files

    def to_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"mlflow_run": self.mlflow_run}


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


def build_job_model(job: TrainJob, num_classes: int) -> tuple[torch.nn.Module, str, bool]:
    """(model, model name, freeze BN) for the job: a fresh model to pretrain, or a loaded one to fine-tune."""
    if job.kind == "pretrain":
        optim = PretrainConfig(**job.optim)
        model = build_model(optim.model, num_classes, zero_init_residual=optim.zero_init_residual)
        return model, optim.model, False
    optim = FinetuneConfig(**job.optim)
    model, meta = load_model_file(job.init_from)
    replace_head(model, num_classes)
    return model, meta["model_name"], apply_strategy(model, optim.strategy)


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
    model, model_name, freeze_bn = build_job_model(job, data.num_classes)
    meta = {
        "model_name": model_name,
        "num_classes": data.num_classes,
        "classes": held_out.classes,
        "image_size": int(held_out.splits["val"].images.shape[-1]),
        "mean": list(data.mean),
        "std": list(data.std),
        "data_hash": held_out.content_hash,
        **job.meta,
    }

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a resumed run: continue after the last epoch
        with checkpoint.as_directory() as directory:
            blob = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        resume = TrainState(**blob)

    def report(metrics: dict[str, float], state: TrainState) -> None:
        if rank == 0 and job.mlflow_run is not None:
            job.mlflow_run.log_metrics(
                {k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"])
            )
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:  # one copy of the (DDP-synchronised) weights is enough
                torch.save(dataclasses.asdict(state), Path(directory) / STATE_FILE)
                save_model_file(Path(directory) / MODEL_FILE, model, meta | {"metrics": metrics})
                checkpoint = Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)

    device = ray.train.torch.get_device()
    fit(
        model,
        data,
        optim,
        augment,
        device=device,
        rank=rank,
        world_size=world_size,
        freeze_bn=freeze_bn,
        resume=resume,
        on_epoch_end=report,
    )


def scaling_config(cfg: RayConfig, cpus_per_worker: float | None = None) -> ScalingConfig:
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)


def make_trainer(
    job: TrainJob,
    cfg: RayConfig,
    *,
    name: str,
    storage: str,
    metric: str = "val_acc",
    mode: str = "max",
    cpus_per_worker: float | None = None,
    callbacks: list | None = None,
) -> TorchTrainer:
    """A TorchTrainer for `job`, keeping only the best checkpoint by `metric`."""
    streaming = job.optim.get("loader") == "ray_data"
    worker_cpus = cpus_per_worker if cpus_per_worker is not None else cfg.cpus_per_worker
    if streaming:
        # Ray Data's read tasks need CPU that training workers do not hold: each worker leaves
        # `data_cpus_per_worker` of its share to them.
        worker_cpus = round(worker_cpus - cfg.data_cpus_per_worker, 4)
    return TorchTrainer(
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
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            callbacks=callbacks,
        ),
    )


def copy_model_file(checkpoint: Checkpoint, destination: str | Path) -> dict[str, Any]:
    """Copy a checkpoint's model file (from local disk or S3) to `destination`; returns its meta."""
    with checkpoint.as_directory() as directory, atomic_path(destination) as tmp:
        shutil.copyfile(Path(directory) / MODEL_FILE, tmp)
    return torch.load(destination, map_location="cpu", weights_only=True)["meta"]
