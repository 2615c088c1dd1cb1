"""The training loop, plain PyTorch: optimiser, schedule, one epoch of training, evaluation, model files.

No Ray and no MLflow here, so the same step runs on a GPU box that has only torch, in a plain single-process
baseline, and inside a Ray Train worker (which only adds the process group and a report callback). Under
`torch.distributed` every metric is summed over ranks before it is returned, so rank 0's numbers describe the
whole dataset, not its own shard.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from resnet.data.augment import BatchAugment, hard_labels, loss_fn
from resnet.data.loading import Normalize
from resnet.io import atomic_path
from resnet.models import build_model


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """`targets`: class indices, or (mixup/cutmix) class probabilities, counted by their largest class."""
        labels = hard_labels(targets)
        self.loss_sum += float(loss) * len(labels)
        self.correct += int((logits.argmax(1) == labels).sum())
        self.count += len(labels)

    def all_reduce(self) -> EpochStats:
        """Sum over all ranks (a no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            totals = torch.tensor([self.loss_sum, self.correct, self.count], dtype=torch.float64)
            dist.all_reduce(totals)
            self.loss_sum, self.correct, self.count = float(totals[0]), int(totals[1]), int(totals[2])
        return self

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weight decay on conv/linear weights only, none on BN and biases
    (decaying BN's scale fights the normalisation and slightly hurts accuracy; timm and torchvision do this)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    """SGD with momentum from an `OptimizerConfig` (lr, momentum, nesterov, weight_decay)."""
    return torch.optim.SGD(
        param_groups(model, optim.weight_decay),
        lr=optim.lr,
        momentum=optim.momentum,
        nesterov=optim.nesterov and optim.momentum > 0,
    )


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warmup from ~0 to 1, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, optim, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(optim.epochs * steps_per_epoch, optim.warmup_epochs * steps_per_epoch)
    )


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Train mode, except that frozen BatchNorm layers keep using (and not updating) their running statistics."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    normalize: Normalize,
    augment: BatchAugment,
    *,
    label_smoothing: float,
    device: torch.device,
    generator: torch.Generator,
    freeze_bn: bool = False,
) -> EpochStats:
    """One pass over `batches` of uint8 images: augment on the CPU, normalise, step. Metrics over all ranks."""
    set_train_mode(model, freeze_bn)
    stats = EpochStats()
    for images, labels in batches:
        images, targets = augment(images, labels, generator)
        images, targets = (
            normalize(images.to(device, non_blocking=True)),
            targets.to(device, non_blocking=True),
        )
        logits = model(images)
        loss = loss_fn(logits, targets, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        stats.add(loss.detach(), logits.detach(), targets)
    return stats.all_reduce()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    normalize: Normalize,
    *,
    device: torch.device,
    confusion: torch.Tensor | None = None,
) -> EpochStats:
    """Loss and accuracy over all ranks' shards; fills `confusion[true, predicted]` if given (this rank only)."""
    model.eval()
    stats = EpochStats()
    for images, labels in batches:
        images, labels = normalize(images.to(device)), labels.to(device)
        logits = model(images)
        stats.add(nn.functional.cross_entropy(logits, labels), logits, labels)
        if confusion is not None:
            pairs = labels.cpu() * confusion.shape[1] + logits.argmax(1).cpu()
            confusion += torch.bincount(pairs, minlength=confusion.numel()).view_as(confusion)
    return stats.all_reduce()


@dataclass
class TrainState:
    """Everything needed to continue a run after the last finished epoch."""

    epoch: int  # the next epoch to run
    model: dict
    optimizer: dict
    scheduler: dict


def fit(
    model: nn.Module,
    data,
    optim,
    augment,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    freeze_bn: bool = False,
    resume: TrainState | None = None,
    on_epoch_end: Callable[[dict[str, float], TrainState], None] | None = None,
) -> nn.Module:
    """Train `model` for `optim.epochs` epochs on `data`'s train split, validating after every epoch.

    `data` is a `loading.PreparedData` (in memory) or anything with the same `train_steps`, `train_epoch`,
    `val_batches`, `mean`, `std` and `num_classes` (Ray Data's streaming shards). `optim` is an
    `OptimizerConfig`, `augment` an `AugmentConfig` or a ready `BatchAugment`. Under torch.distributed the model
    is wrapped in DDP here and each rank trains on its shard with `optim.batch_size // world_size` images per
    step. After each epoch `on_epoch_end(metrics, state)` is called on every rank (metrics are global); `state`
    holds the live tensors, so save or copy it there rather than keep it. Returns the unwrapped model.
    """
    model.to(device)
    net = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    per_rank_batch = max(1, optim.batch_size // world_size)
    steps_per_epoch = data.train_steps(per_rank_batch, world_size)
    if not isinstance(augment, BatchAugment):
        augment = BatchAugment.from_config(augment, data.num_classes)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch)
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        start_epoch = resume.epoch
    normalize = Normalize(data.mean, data.std).to(device)
    for epoch in range(start_epoch, optim.epochs):
        # Augmentation randomness differs per rank and epoch but is reproducible from the seed.
        generator = torch.Generator().manual_seed(optim.seed * 100_003 + epoch * 1_009 + rank)
        started = time.perf_counter()
        train_stats = train_epoch(
            net,
            data.train_epoch(per_rank_batch, epoch=epoch, seed=optim.seed, rank=rank, world_size=world_size),
            optimizer,
            scheduler,
            normalize,
            augment,
            label_smoothing=optim.label_smoothing,
            device=device,
            generator=generator,
            freeze_bn=freeze_bn,
        )
        train_seconds = time.perf_counter() - started
        val_stats = evaluate(
            net, data.val_batches(256, rank=rank, world_size=world_size), normalize, device=device
        )
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_stats.loss,
            "train_acc": train_stats.accuracy,
            "val_loss": val_stats.loss,
            "val_acc": val_stats.accuracy,
            "lr": scheduler.get_last_lr()[0],
            "images_per_sec": train_stats.count / train_seconds,
            "epoch_seconds": time.perf_counter() - started,
        }
        if on_epoch_end is not None:
            state = TrainState(epoch + 1, model.state_dict(), optimizer.state_dict(), scheduler.state_dict())
            on_epoch_end(metrics, state)
    return model


# ---------------------------------------------------------------- model files


def save_model_file(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Weights plus what is needed to rebuild and feed the model (name, classes, normalisation), written to a
    temporary file and renamed, so a reader never sees half a file. Loadable with `weights_only=True`."""
    with atomic_path(path) as tmp:
        torch.save({"meta": meta, "model": model.state_dict()}, tmp)


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved by `save_model_file`; returns (model in eval mode, meta)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    meta = blob["meta"]
    model = build_model(meta["model_name"], meta["num_classes"])
    model.load_state_dict(blob["model"], strict=True)
    return model.eval(), meta
