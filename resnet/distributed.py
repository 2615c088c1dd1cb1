"""Ray Train glue: connect to (or start) a cluster, and run `engine.fit` as a TorchTrainer with DDP.

The worker function is the only code that runs inside Ray Train workers. It rebuilds everything from a plain,
picklable `TrainJob`, trains with `engine.fit` (which wraps the model in DDP; Ray Train has already set up the
gloo or NCCL process group), and after every epoch reports the global metrics with a checkpoint from rank 0.
Rank 0 also logs each epoch to the MLflow run the job names: Ray Train V2 has no MLflow callback of its own.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from resnet.config import AugmentConfig, FinetuneConfig, PretrainConfig, RayConfig
from resnet.data.loading import load_prepared
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

    data = load_prepared(job.data_dir, splits=("train", "val"))
    model, model_name, freeze_bn = build_job_model(job, data.num_classes)
    meta = {
        "model_name": model_name,
        "num_classes": data.num_classes,
        "classes": data.classes,
        "image_size": int(data.splits["train"].images.shape[-1]),
        "mean": list(data.mean),
        "std": list(data.std),
        "data_hash": data.content_hash,
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
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_config(),
        scaling_config=scaling_config(cfg, cpus_per_worker),
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
