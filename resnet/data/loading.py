"""Training-time data: prepared splits as uint8 tensors, sharded batches, batched augmentation. torch only.

The datasets this project trains on at its default size fit in memory, so a split is one uint8 tensor and a
batch is an index into it: no DataLoader worker processes competing with training for the two cores. Each
rank sees its own shard of every epoch through `DistributedSampler` with explicit rank/world size, which is
the same code for one process and for N Ray Train workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from resnet.data.prepare import read_manifest
from resnet.errors import DataError


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class PreparedData:
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    content_hash: str
    splits: dict[str, Split]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_prepared(
    prepared_dir: str | Path, splits: tuple[str, ...] = ("train", "val", "test")
) -> PreparedData:
    prepared_dir = Path(prepared_dir)
    manifest = read_manifest(prepared_dir)
    loaded = {}
    for name in splits:
        try:
            images = np.load(prepared_dir / f"{name}_images.npy", allow_pickle=False)
            labels = np.load(prepared_dir / f"{name}_labels.npy", allow_pickle=False)
        except FileNotFoundError as err:
            raise DataError(f"{err.filename}: missing from the prepared dataset") from None
        loaded[name] = Split(
            torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()
        )
    return PreparedData(
        manifest["classes"], tuple(manifest["mean"]), tuple(manifest["std"]), manifest["content_hash"], loaded
    )


def train_batches(
    split: Split, batch_size: int, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shuffled shard of one epoch, in batches. `DistributedSampler` pads the index list so that
    every rank gets the same number of batches, which DDP needs (a rank with one batch fewer would hang)."""
    sampler = DistributedSampler(
        range(len(split)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield split.images[idx], split.labels[idx]


def eval_batches(
    split: Split, batch_size: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's strided shard, without padding: summed over ranks, every image counts exactly once."""
    order = torch.arange(rank, len(split), world_size)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield split.images[idx], split.labels[idx]


def random_crop_flip(
    images: torch.Tensor, *, padding: int, hflip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Batched pad-and-random-crop plus optional horizontal flip on uint8 (N, C, H, W), all in one gather.

    Equivalent to torchvision's RandomCrop(size, padding, fill=0) + RandomHorizontalFlip per image, without a
    Python loop over images.
    """
    n, _, h, w = images.shape
    if padding == 0 and not hflip:
        return images
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    rows = dy + torch.arange(h)  # (N, H)
    cols = dx + torch.arange(w)  # (N, W)
    if hflip:
        flip = torch.rand(n, 1, generator=generator) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    # Advanced indices around the channel slice put the indexed dims first: (N, H, W, C).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


class Normalize(torch.nn.Module):
    """uint8 or [0, 1] float images → standardised float; a module so it can travel inside an exported model."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return (images - self.mean) / self.std
