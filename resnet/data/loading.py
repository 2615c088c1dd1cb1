"""Training-time data: prepared splits as uint8 tensors, sharded batches, batched augmentation. torch only.

The datasets this project trains on at its default size fit in memory, so a split is one uint8 tensor and a
batch is an index into it: no DataLoader worker processes competing with training for the two cores. Each
rank sees its own shard of every epoch through `DistributedSampler` with explicit rank/world size, which is
the same code for one process and for N Ray Train workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from resnet.data.prepare import join_location, read_manifest, read_shard, split_files
from resnet.errors import DataError


@dataclass(frozen=True)
class Split(torch.utils.data.Dataset):
    """One split in memory; also a map-style torch Dataset ((uint8 CHW image, label) per index), for users who
    want a `DataLoader`. The training loop itself indexes whole batches at once (`train_batches`)."""

    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


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

    # What engine.fit asks of its data; a streaming source (distributed.RayDataSource) answers the same.

    def train_steps(self, batch_size: int, world_size: int = 1) -> int:
        """Optimiser steps per epoch on each rank with `batch_size` images per rank."""
        return math.ceil(math.ceil(len(self.splits["train"]) / world_size) / batch_size)

    def train_epoch(
        self, batch_size: int, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return train_batches(
            self.splits["train"], batch_size, epoch=epoch, seed=seed, rank=rank, world_size=world_size
        )

    def val_batches(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return eval_batches(self.splits["val"], batch_size, rank=rank, world_size=world_size)


def load_prepared(
    prepared_dir: str | Path, splits: tuple[str, ...] = ("train", "val", "test")
) -> PreparedData:
    """The prepared dataset's `splits` in memory, as uint8 NCHW tensors, with its classes and statistics.
    `prepared_dir` is a local directory or s3://bucket/prefix (endpoint and keys from the AWS environment)."""
    manifest = read_manifest(prepared_dir)
    loaded = {}
    for name in splits:
        parts = []
        for file in split_files(manifest, name):
            location = join_location(prepared_dir, file)
            try:
                parts.append(read_shard(location))
            except FileNotFoundError:
                raise DataError(f"{location}: missing from the prepared dataset") from None
            except (OSError, ValueError, KeyError) as err:  # pyarrow's ArrowInvalid is a ValueError
                reason = " ".join(str(err).split())  # pyarrow's messages can span lines
                raise DataError(f"{location}: not a readable Parquet shard ({reason})") from None
        if not parts:
            raise DataError(f"{prepared_dir}: the manifest lists no {name} shards")
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if len(labels) != manifest["counts"][name]["total"]:
            raise DataError(
                f"{prepared_dir}: {name} has {len(labels)} rows, the manifest says "
                f"{manifest['counts'][name]['total']}; run the prepare stage again"
            )
        # The Arrow buffer is read-only; torch wants a writable array, and NCHW is a copy anyway.
        loaded[name] = Split(
            torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), torch.from_numpy(labels)
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
