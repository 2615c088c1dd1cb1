"""Sources, the stratified split, the prepared format and its manifest, sharded batches, batched augmentation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet.data.loading import Normalize, eval_batches, load_prepared, random_crop_flip, train_batches
from resnet.data.prepare import read_manifest, stratified_split, write_prepared
from resnet.data.sources import RawDataset, load_digits, load_source
from resnet.errors import DataError


def synthetic(num_classes: int = 3, per_class: int = 20, size: int = 8, seed: int = 0) -> RawDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_classes * per_class, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int64)
    return RawDataset(images, labels, tuple(f"c{i}" for i in range(num_classes)))


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_split_is_deterministic_disjoint_covering_and_stratified():
    labels = np.repeat(np.arange(4), [40, 30, 20, 50])
    split = stratified_split(labels, val=0.15, test=0.2, seed=3)
    again = stratified_split(labels, val=0.15, test=0.2, seed=3)
    other = stratified_split(labels, val=0.15, test=0.2, seed=4)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["train"], other["train"])
    everything = np.concatenate(list(split.values()))
    assert sorted(everything.tolist()) == list(range(len(labels)))  # disjoint and covering
    for cls, count in enumerate([40, 30, 20, 50]):
        assert abs((labels[split["test"]] == cls).sum() - 0.2 * count) <= 1
        assert abs((labels[split["val"]] == cls).sum() - 0.15 * count) <= 1


def test_split_refuses_a_class_too_small_to_split():
    with pytest.raises(DataError, match="class 1 has 2 images"):
        stratified_split(np.array([0] * 10 + [1] * 2), val=0.15, test=0.15, seed=0)


def test_prepared_files_are_byte_identical_across_runs_and_manifest_is_right(tmp_path):
    raw = synthetic()
    first = write_prepared(raw, tmp_path / "a", val=0.2, test=0.2, seed=0, source="synthetic")
    write_prepared(raw, tmp_path / "b", val=0.2, test=0.2, seed=0, source="synthetic")
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    counts = first["counts"]
    assert sum(counts[s]["total"] for s in ("train", "val", "test")) == 60
    for split in ("train", "val", "test"):
        assert sum(counts[split]["per_class"].values()) == counts[split]["total"]
    train = np.load(tmp_path / "a" / "train_images.npy")
    pixels = train.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(first["mean"], pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(first["std"], pixels.std(0), atol=1e-6)
    assert read_manifest(tmp_path / "a") == first

    changed = synthetic()
    changed.images[0, 0, 0, 0] ^= 1
    other = write_prepared(changed, tmp_path / "c", val=0.2, test=0.2, seed=0, source="synthetic")
    assert other["content_hash"] != first["content_hash"]


def test_single_class_dataset_is_refused_and_nothing_is_left_behind(tmp_path):
    with pytest.raises(DataError, match="at least 2"):
        write_prepared(synthetic(num_classes=1), tmp_path / "out", val=0.2, test=0.2, seed=0, source="one")
    assert list(tmp_path.iterdir()) == []


def test_digits_source_and_unknown_source():
    digits = load_digits(32)
    assert digits.images.shape == (1797, 32, 32, 3) and digits.images.dtype == np.uint8
    assert digits.classes == tuple(str(i) for i in range(10))
    assert digits.images.max() == 255  # 0..16 rescaled to the full range
    with pytest.raises(DataError, match="expected one of digits"):
        load_source("nope", 32)


def test_load_prepared_round_trips_to_nchw(tmp_path):
    raw = synthetic()
    write_prepared(raw, tmp_path / "d", val=0.2, test=0.2, seed=0, source="synthetic")
    data = load_prepared(tmp_path / "d")
    train = data.splits["train"]
    stored = np.load(tmp_path / "d" / "train_images.npy")
    assert train.images.dtype == torch.uint8 and tuple(train.images.shape) == (len(stored), 3, 8, 8)
    assert torch.equal(train.images, torch.from_numpy(stored).permute(0, 3, 1, 2))
    assert data.classes == ["c0", "c1", "c2"] and data.num_classes == 3
    with pytest.raises(DataError, match=str(tmp_path / "missing")):
        read_manifest(tmp_path / "missing")


def _split(n: int):
    from resnet.data.loading import Split

    return Split(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n))


def test_train_batches_shard_evenly_and_reshuffle_each_epoch():
    split = _split(23)
    shards = [[b[1] for b in train_batches(split, 4, epoch=0, seed=1, rank=r, world_size=2)] for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])  # DDP needs the same number of steps on every rank
    seen = torch.cat([torch.cat(s) for s in shards])
    assert set(seen.tolist()) == set(range(23))
    epoch0 = torch.cat([b[1] for b in train_batches(split, 4, epoch=0, seed=1)])
    epoch1 = torch.cat([b[1] for b in train_batches(split, 4, epoch=1, seed=1)])
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch0, torch.cat([b[1] for b in train_batches(split, 4, epoch=0, seed=1)]))


def test_eval_batches_count_every_image_exactly_once():
    split = _split(23)
    seen = torch.cat([b[1] for r in (0, 1) for b in eval_batches(split, 5, rank=r, world_size=2)])
    assert sorted(seen.tolist()) == list(range(23))


def test_random_crop_flip_takes_windows_of_the_padded_batch():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    out = random_crop_flip(images, padding=2, hflip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i in range(6):
        windows = [padded[i, :, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    again = random_crop_flip(images, padding=2, hflip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert random_crop_flip(images, padding=0, hflip=False) is images


def test_normalize_accepts_uint8_and_unit_floats_alike():
    normalize = Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    torch.testing.assert_close(normalize(images), expected)
    torch.testing.assert_close(normalize(images.float() / 255), expected)
