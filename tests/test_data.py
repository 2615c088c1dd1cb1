"""Sources, the stratified split, the prepared format and its manifest, sharded batches, batched augmentation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet.data.loading import Normalize, eval_batches, load_prepared, random_crop_flip, train_batches
from resnet.data.prepare import (
    read_manifest,
    read_shard,
    shard_names,
    split_files,
    stratified_split,
    write_prepared,
)
from resnet.data.sources import RawDataset, load_digits, load_source
from resnet.errors import DataError


def synthetic(num_classes: int = 3, per_class: int = 20, size: int = 8, seed: int = 0) -> RawDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_classes * per_class, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int64)
    return RawDataset(images, labels, tuple(f"c{i}" for i in range(num_classes)))


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def read_split(directory: Path, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's stored (images, labels), its shards read back in order and concatenated."""
    parts = [read_shard(directory / file) for file in split_files(manifest, split)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


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
    first = write_prepared(raw, tmp_path / "a", val=0.2, test=0.2, seed=0, source="synthetic", shard_size=10)
    write_prepared(raw, tmp_path / "b", val=0.2, test=0.2, seed=0, source="synthetic", shard_size=10)
    assert len(first["files"]) == 4 + 2 + 2  # 36 train, 12 val, 12 test rows in shards of 10
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")  # every shard and the manifest
    counts = first["counts"]
    assert sum(counts[s]["total"] for s in ("train", "val", "test")) == 60
    for split in ("train", "val", "test"):
        assert sum(counts[split]["per_class"].values()) == counts[split]["total"]
    train, _ = read_split(tmp_path / "a", first, "train")
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
    with pytest.raises(DataError) as info:
        load_source("nope", 32)
    assert str(info.value) == (
        "unknown data source 'nope': expected one of cifar10, cifar100, digits, fractals, imagefolder"
    )


def test_load_prepared_round_trips_to_nchw(tmp_path):
    raw = synthetic()
    write_prepared(raw, tmp_path / "d", val=0.2, test=0.2, seed=0, source="synthetic")
    data = load_prepared(tmp_path / "d")
    train = data.splits["train"]
    stored, _ = read_split(tmp_path / "d", read_manifest(tmp_path / "d"), "train")
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


# ---------------------------------------------------------------- more on the split and the prepared format


def test_split_shares_per_class_and_seeds():
    labels = np.random.default_rng(7).permutation(np.repeat(np.arange(3), [11, 26, 63]))
    split = stratified_split(labels, val=0.15, test=0.2, seed=0)
    assert all(idx.dtype == np.int64 for idx in split.values())
    for cls, count in enumerate([11, 26, 63]):
        n = {name: int((labels[idx] == cls).sum()) for name, idx in split.items()}
        assert sum(n.values()) == count
        for name, fraction in (("val", 0.15), ("test", 0.2), ("train", 0.65)):
            assert abs(n[name] - fraction * count) <= 1, (cls, name, n)
    other = stratified_split(labels, val=0.15, test=0.2, seed=1)
    assert any(not np.array_equal(split[k], other[k]) for k in split)
    assert {k: len(v) for k, v in other.items()} == {k: len(v) for k, v in split.items()}


def test_manifest_describes_the_files(tmp_path):
    raw = synthetic(num_classes=3, per_class=20)
    manifest = write_prepared(raw, tmp_path / "d", val=0.2, test=0.2, seed=5, source="synthetic")
    hashes = file_hashes(tmp_path / "d")
    assert {k: v["sha256"] for k, v in manifest["files"].items()} == {
        k: v for k, v in hashes.items() if k != "manifest.json"
    }
    assert sorted(manifest["files"]) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
        "val-00000-of-00001.parquet",
    ]
    assert (
        manifest["image_shape"] == [8, 8, 3] and manifest["seed"] == 5 and manifest["source"] == "synthetic"
    )
    assert manifest["classes"] == ["c0", "c1", "c2"]
    for cls in ("c0", "c1", "c2"):
        assert sum(manifest["counts"][s]["per_class"][cls] for s in ("train", "val", "test")) == 20
    # the stored splits are exactly stratified_split's indices
    split = stratified_split(raw.labels, 0.2, 0.2, 5)
    for name, idx in split.items():
        images, labels = read_split(tmp_path / "d", manifest, name)
        assert np.array_equal(images, raw.images[idx]) and np.array_equal(labels, raw.labels[idx])
        assert manifest["files"][f"{name}-00000-of-00001.parquet"]["rows"] == len(idx)


def test_rewriting_the_same_directory_is_byte_identical_and_leaves_no_temporaries(tmp_path):
    raw = synthetic()
    write_prepared(raw, tmp_path / "d", val=0.2, test=0.2, seed=0, source="synthetic")
    first = file_hashes(tmp_path / "d")
    (tmp_path / "d" / "stale.txt").write_text("from an older run")
    write_prepared(raw, tmp_path / "d", val=0.2, test=0.2, seed=0, source="synthetic")
    assert file_hashes(tmp_path / "d") == first  # replaced as a whole: the stale file is gone
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_one_changed_pixel_changes_exactly_one_shard(tmp_path):
    raw = synthetic()
    options = {"val": 0.2, "test": 0.2, "seed": 0, "source": "s", "shard_size": 5}
    before = write_prepared(raw, tmp_path / "a", **options)
    assert len(before["files"]) == 8 + 3 + 3  # 36 train, 12 val, 12 test rows in shards of 5
    images = raw.images.copy()
    images[0, 3, 4, 1] ^= 0x80
    after = write_prepared(RawDataset(images, raw.labels, raw.classes), tmp_path / "b", **options)
    assert after["files"].keys() == before["files"].keys()
    changed = {k for k in before["files"] if before["files"][k] != after["files"][k]}
    home, idx = next(
        (name, idx) for name, idx in stratified_split(raw.labels, 0.2, 0.2, 0).items() if 0 in idx
    )
    position = int(np.flatnonzero(idx == 0)[0])
    assert changed == {shard_names(home, len(idx), 5)[position // 5]}
    assert after["content_hash"] != before["content_hash"]
    assert {k: v for k, v in after.items() if k not in ("files", "content_hash", "mean", "std")} == {
        k: v for k, v in before.items() if k not in ("files", "content_hash", "mean", "std")
    }


def test_a_failed_write_keeps_the_previous_output_and_no_temporary(tmp_path, monkeypatch):
    import resnet.data.prepare as prepare

    raw = synthetic()
    write_prepared(raw, tmp_path / "d", val=0.2, test=0.2, seed=0, source="s")
    good = file_hashes(tmp_path / "d")

    def broken(images):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare, "channel_stats", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_prepared(synthetic(seed=1), tmp_path / "d", val=0.2, test=0.2, seed=0, source="s")
    assert file_hashes(tmp_path / "d") == good
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_refused_dataset_leaves_an_existing_parent_untouched(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="found 1 class"):
        write_prepared(synthetic(num_classes=1), parent / "out", val=0.2, test=0.2, seed=0, source="one")
    with pytest.raises(DataError, match="too few to split"):
        write_prepared(synthetic(per_class=2), parent / "out", val=0.2, test=0.2, seed=0, source="small")
    assert [p.name for p in parent.iterdir()] == ["keep.txt"]


def test_labels_outside_the_class_list_are_refused(tmp_path):
    raw = synthetic(num_classes=3)
    with pytest.raises(DataError):
        write_prepared(
            RawDataset(raw.images, raw.labels, ("c0", "c1")),
            tmp_path / "d",
            val=0.2,
            test=0.2,
            seed=0,
            source="s",
        )


def test_digits_labels_and_native_size():
    digits = load_source("digits", 8)  # the native 8x8: no resampling, just 0..16 -> 0..255 as gray RGB
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    assert digits.images.shape == (1797, 8, 8, 3) and digits.labels.dtype == np.int64
    assert np.array_equal(digits.labels, bunch.target)
    assert (
        np.bincount(digits.labels).tolist() == np.bincount(bunch.target).tolist()
        and len(digits.classes) == 10
    )
    expected = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(digits.images[..., channel], expected)


def test_load_prepared_keeps_labels_and_statistics(tmp_path):
    raw = synthetic()
    manifest = write_prepared(raw, tmp_path / "d", val=0.2, test=0.2, seed=0, source="synthetic")
    data = load_prepared(tmp_path / "d")
    split = stratified_split(raw.labels, 0.2, 0.2, 0)
    for name, idx in split.items():
        part = data.splits[name]
        assert part.images.is_contiguous() and part.labels.dtype == torch.int64 and len(part) == len(idx)
        assert torch.equal(part.labels, torch.from_numpy(raw.labels[idx]))
        assert torch.equal(part.images.permute(0, 2, 3, 1), torch.from_numpy(raw.images[idx]))
    assert data.mean == tuple(manifest["mean"]) and data.std == tuple(manifest["std"])
    assert data.content_hash == manifest["content_hash"]
    only_test = load_prepared(tmp_path / "d", splits=("test",))
    assert list(only_test.splits) == ["test"]


def test_prepared_dataset_errors_name_the_file(tmp_path):
    manifest = write_prepared(synthetic(), tmp_path / "d", val=0.2, test=0.2, seed=0, source="s")
    (tmp_path / "d" / "val-00000-of-00001.parquet").unlink()
    assert split_files(manifest, "val") == ["val-00000-of-00001.parquet"]
    with pytest.raises(DataError, match="val-00000-of-00001.parquet: missing from the prepared dataset"):
        load_prepared(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path / "d")
    with pytest.raises(DataError) as info:
        read_manifest(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "manifest.json") in str(info.value)


# ---------------------------------------------------------------- more on batches and augmentation


def _indexed(n: int):
    """A split whose every image carries its own index, so batches can be checked image against label."""
    from resnet.data.loading import Split

    return Split(
        torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous(), torch.arange(n)
    )


def test_train_batches_pair_images_with_their_labels_and_depend_on_seed_and_epoch():
    split = _indexed(23)

    def order(seed, epoch, rank=0, world_size=1, batch=4):
        batches = list(train_batches(split, batch, epoch=epoch, seed=seed, rank=rank, world_size=world_size))
        for images, labels in batches:
            assert len(labels) <= batch
            assert torch.equal(images[:, 0, 0, 0].long(), labels)
        return torch.cat([labels for _, labels in batches]).tolist()

    shards = [order(1, 0, rank, 2) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 12  # 23 padded to 24: one image seen twice
    assert len(set(shards[0]) & set(shards[1])) <= 1 and set(shards[0]) | set(shards[1]) == set(range(23))
    assert [order(1, 3, r, 2) for r in (0, 1)] == [order(1, 3, r, 2) for r in (0, 1)]
    assert order(1, 0, 0, 2) != order(1, 1, 0, 2)
    assert order(1, 0) != order(2, 0)
    assert sorted(order(1, 0)) == list(range(23))  # one rank: a permutation, no padding


def test_eval_batches_are_disjoint_across_ranks_and_in_order():
    split = _indexed(23)
    per_rank = [[labels for _, labels in eval_batches(split, 5, rank=r, world_size=2)] for r in (0, 1)]
    flat = [torch.cat(b).tolist() for b in per_rank]
    assert flat == [list(range(0, 23, 2)), list(range(1, 23, 2))]
    assert [len(b) for b in per_rank[0]] == [5, 5, 2]
    assert torch.cat([b for _, b in eval_batches(split, 100)]).tolist() == list(range(23))


def _window(padded: torch.Tensor, out: torch.Tensor, flipped: bool) -> tuple[int, int] | None:
    _, h, w = out.shape
    for y in range(padded.shape[1] - h + 1):
        for x in range(padded.shape[2] - w + 1):
            win = padded[:, y : y + h, x : x + w]
            if torch.equal(out, win.flip(-1) if flipped else win):
                return y, x
    return None


def test_crop_without_flip_is_an_exact_window_and_offsets_vary():
    g = torch.Generator().manual_seed(3)
    images = torch.randint(1, 256, (16, 3, 5, 7), dtype=torch.uint8, generator=g)  # non-square, no zeros
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    out = random_crop_flip(images, padding=2, hflip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.is_contiguous()
    offsets = [_window(padded[i], out[i], flipped=False) for i in range(16)]
    assert None not in offsets
    assert len(set(offsets)) > 1
    other = random_crop_flip(images, padding=2, hflip=False, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)


def test_flip_only_mirrors_some_images_and_keeps_the_rest():
    images = torch.randint(
        0, 256, (32, 3, 4, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)
    )
    out = random_crop_flip(images, padding=0, hflip=True, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], images[i].flip(-1)) for i in range(32)]
    kept = [torch.equal(out[i], images[i]) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 32


def test_normalize_is_exactly_the_same_for_uint8_and_float_input():
    normalize = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 0.125))
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(out, normalize(images.float() / 255))
    assert images.dtype == torch.uint8  # the input is not modified in place
    assert out[0, 2, 0, 0].item() == pytest.approx((images[0, 2, 0, 0].item() / 255 - 0.3) / 0.125, rel=1e-6)


def test_a_split_is_a_map_style_dataset_for_a_dataloader_with_the_same_batches(tmp_path):
    from torch.utils.data import DataLoader, DistributedSampler

    write_prepared(synthetic(), tmp_path / "d", val=0.2, test=0.2, seed=0, source="synthetic")
    train = load_prepared(tmp_path / "d", splits=("train",)).splits["train"]
    image, label = train[3]
    assert image.equal(train.images[3]) and int(label) == int(train.labels[3])
    for rank in (0, 1):
        sampler = DistributedSampler(train, num_replicas=2, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(2)
        loaded = list(DataLoader(train, batch_size=4, sampler=sampler))
        ours = list(train_batches(train, 4, epoch=2, seed=7, rank=rank, world_size=2))
        assert len(loaded) == len(ours)
        for (a_images, a_labels), (b_images, b_labels) in zip(loaded, ours, strict=True):
            assert a_images.equal(b_images) and a_labels.equal(b_labels)
