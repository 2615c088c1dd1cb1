"""The prepared format: Parquet shards and their sizing, the manifest's fields, refusals (rejected files, empty
classes, other formats), what `load_prepared` does with damaged shards, statistics and the stage's summaries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from resnet.data.loading import PreparedData, Split, load_prepared
from resnet.data.prepare import (
    FORMAT,
    channel_stats,
    read_manifest,
    read_shard,
    split_files,
    stratified_split,
    summary_metrics,
    summary_table,
    write_prepared,
    write_shard,
)
from resnet.data.sources import RawDataset, Rejected
from resnet.errors import DataError

SPLITS = ("train", "val", "test")


def synthetic(
    num_classes: int = 3, per_class: int = 20, size: int = 8, seed: int = 0, rejected: tuple = ()
) -> RawDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_classes * per_class, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int64)
    return RawDataset(images, labels, tuple(f"c{i}" for i in range(num_classes)), rejected)


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def prepare(raw: RawDataset, out: Path, **options) -> dict:
    return write_prepared(raw, out, **({"val": 0.2, "test": 0.2, "seed": 0, "source": "s"} | options))


REJECTS = (
    Rejected("c1/b.png", "truncated", "image file is truncated"),
    Rejected("c0/a.jpg", "zero-byte"),
    Rejected("c2/notes.txt", "not an image", "cannot identify image file"),
    Rejected("c0/tiny.png", "too small", "4x4 pixels, min_size 8"),
    Rejected("c1/c.png", "truncated", "broken data stream"),
)


# ---------------------------------------------------------------- shards


def test_25_train_images_with_shard_size_10_make_three_shards_of_10_10_5(tmp_path):
    raw = synthetic(num_classes=5, per_class=7)  # per class: 1 test, 1 val, 5 train
    manifest = prepare(raw, tmp_path / "d", val=0.15, test=0.15, shard_size=10)
    train = [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert split_files(manifest, "train") == train
    assert split_files(manifest, "val") == ["val-00000-of-00001.parquet"]
    assert split_files(manifest, "test") == ["test-00000-of-00001.parquet"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted([*manifest["files"], "manifest.json"])
    assert [manifest["files"][f]["rows"] for f in train] == [10, 10, 5]
    assert [len(read_shard(tmp_path / "d" / f)[1]) for f in train] == [10, 10, 5]
    # the shards, in order, are exactly the split's images in stratified_split's order
    idx = stratified_split(raw.labels, 0.15, 0.15, 0)["train"]
    images = np.concatenate([read_shard(tmp_path / "d" / f)[0] for f in train])
    labels = np.concatenate([read_shard(tmp_path / "d" / f)[1] for f in train])
    assert np.array_equal(images, raw.images[idx]) and np.array_equal(labels, raw.labels[idx])


@pytest.mark.parametrize(("shard_size", "train_shards"), [(1, 25), (5, 5), (24, 2), (25, 1), (10_000, 1)])
def test_shard_count_is_the_rows_divided_by_shard_size_rounded_up(tmp_path, shard_size, train_shards):
    manifest = prepare(
        synthetic(num_classes=5, per_class=7), tmp_path / "d", val=0.15, test=0.15, shard_size=shard_size
    )
    files = split_files(manifest, "train")
    assert files == [f"train-{i:05d}-of-{train_shards:05d}.parquet" for i in range(train_shards)]
    assert sum(manifest["files"][f]["rows"] for f in files) == 25
    assert all(manifest["files"][f]["rows"] == min(shard_size, 25) for f in files[:-1])


def test_a_shard_is_parquet_with_the_documented_schema(tmp_path):
    manifest = prepare(synthetic(size=6), tmp_path / "d", shard_size=7)
    first = tmp_path / "d" / split_files(manifest, "train")[0]
    schema = pq.read_schema(first)
    assert schema.names == ["image", "label"]
    assert schema.field("image").type == pa.binary(6 * 6 * 3)  # fixed-size binary: one HWC image per row
    assert schema.field("label").type == pa.int32()
    assert json.loads(schema.metadata[b"image_shape"]) == [6, 6, 3]
    images, labels = read_shard(first)
    assert images.dtype == np.uint8 and images.shape == (7, 6, 6, 3)
    assert labels.dtype == np.int64 and labels.shape == (7,)


def test_write_shard_and_read_shard_round_trip_one_row_and_many(tmp_path):
    rng = np.random.default_rng(1)
    for n in (1, 13):
        images = rng.integers(0, 256, (n, 5, 7, 3), dtype=np.uint8)  # not square
        labels = rng.integers(0, 100, n)
        write_shard(tmp_path / f"{n}.parquet", images, labels)
        back_images, back_labels = read_shard(tmp_path / f"{n}.parquet")
        assert np.array_equal(back_images, images) and np.array_equal(back_labels, labels)


def test_same_input_gives_byte_identical_shards_with_several_shards_per_split(tmp_path):
    raw = synthetic(per_class=30)
    first = prepare(raw, tmp_path / "a", shard_size=7)
    second = prepare(raw, tmp_path / "b", shard_size=7)
    assert len(split_files(first, "train")) > 1 and len(split_files(first, "val")) > 1
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    assert first == second


# ---------------------------------------------------------------- the manifest


def test_manifest_fields(tmp_path):
    raw = synthetic(num_classes=3, per_class=20, rejected=REJECTS)
    manifest = prepare(raw, tmp_path / "d", seed=5, shard_size=8, source="mine")
    assert manifest["format"] == FORMAT and manifest["source"] == "mine" and manifest["seed"] == 5
    assert manifest["classes"] == ["c0", "c1", "c2"]
    assert manifest["class_to_index"] == {"c0": 0, "c1": 1, "c2": 2}
    assert manifest["image_shape"] == [8, 8, 3]

    # counts per split and class: exactly stratified_split's
    split = stratified_split(raw.labels, 0.2, 0.2, 5)
    for name in SPLITS:
        per_class = {f"c{i}": int((raw.labels[split[name]] == i).sum()) for i in range(3)}
        assert manifest["counts"][name] == {"total": len(split[name]), "per_class": per_class}
    assert manifest["counts"]["test"]["per_class"] == {"c0": 4, "c1": 4, "c2": 4}
    assert manifest["counts"]["train"] == {"total": 36, "per_class": {"c0": 12, "c1": 12, "c2": 12}}

    # files: every shard on disk, with its row count and its bytes' sha256
    on_disk = file_hashes(tmp_path / "d")
    assert set(manifest["files"]) == set(on_disk) - {"manifest.json"}
    for file, entry in manifest["files"].items():
        assert entry["sha256"] == on_disk[file]
        assert entry["rows"] == len(read_shard(tmp_path / "d" / file)[1])
    for name in SPLITS:
        assert sum(manifest["files"][f]["rows"] for f in split_files(manifest, name)) == len(split[name])
    expected_hash = hashlib.sha256(
        json.dumps({f: v["sha256"] for f, v in manifest["files"].items()}, sort_keys=True).encode()
    ).hexdigest()
    assert manifest["content_hash"] == expected_hash

    # rejected files: counted in `scanned`, listed sorted by file with reason and detail, counted per reason
    assert manifest["scanned"] == 60 + 5
    assert manifest["rejected"] == [
        {"file": "c0/a.jpg", "reason": "zero-byte", "detail": ""},
        {"file": "c0/tiny.png", "reason": "too small", "detail": "4x4 pixels, min_size 8"},
        {"file": "c1/b.png", "reason": "truncated", "detail": "image file is truncated"},
        {"file": "c1/c.png", "reason": "truncated", "detail": "broken data stream"},
        {"file": "c2/notes.txt", "reason": "not an image", "detail": "cannot identify image file"},
    ]
    assert manifest["rejected_by_reason"] == {
        "not an image": 1,
        "too small": 1,
        "truncated": 2,
        "zero-byte": 1,
    }
    assert list(manifest["rejected_by_reason"]) == sorted(manifest["rejected_by_reason"])

    # what is on disk is what was returned, and read_manifest gives it back
    assert json.loads((tmp_path / "d" / "manifest.json").read_text()) == manifest
    assert read_manifest(tmp_path / "d") == manifest


def test_a_clean_dataset_has_empty_rejects(tmp_path):
    manifest = prepare(synthetic(), tmp_path / "d")
    assert manifest["scanned"] == 60
    assert manifest["rejected"] == [] and manifest["rejected_by_reason"] == {}


def test_manifest_of_another_format_is_refused(tmp_path):
    manifest = prepare(synthetic(), tmp_path / "d")
    path = tmp_path / "d" / "manifest.json"
    path.write_text(json.dumps(manifest | {"format": "resnet-pipeline/npy/v0"}))
    with pytest.raises(DataError) as info:
        read_manifest(tmp_path / "d")
    assert str(info.value) == (
        f"{path}: format 'resnet-pipeline/npy/v0', expected {FORMAT!r}; run the prepare stage again"
    )
    # a manifest of the earlier .npy layout had no `format` at all
    path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "format"}))
    with pytest.raises(DataError, match=r"format None, expected .*; run the prepare stage again"):
        load_prepared(tmp_path / "d")


# ---------------------------------------------------------------- refusals


def test_more_rejected_files_than_max_rejected_is_refused_and_nothing_changes(tmp_path):
    good = prepare(synthetic(), tmp_path / "d")
    before = file_hashes(tmp_path / "d")
    # 60 images + 5 rejected = 65 scanned; 5/65 = 0.077 > 0.05
    raw = synthetic(seed=1, rejected=REJECTS)
    with pytest.raises(DataError) as info:
        prepare(raw, tmp_path / "d", max_rejected=0.05, source="flowers")
    assert str(info.value) == (
        "flowers: 5 of 65 files rejected (1 not an image, 1 too small, 2 truncated, 1 zero-byte), "
        "more than max_rejected=0.05"
    )
    assert file_hashes(tmp_path / "d") == before  # the previous output is kept
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # and no temporary is left
    assert read_manifest(tmp_path / "d") == good
    # a refusal with no previous output writes nothing at all
    with pytest.raises(DataError, match="5 of 65 files rejected"):
        prepare(raw, tmp_path / "new", max_rejected=0.05)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_max_rejected_is_inclusive_at_the_boundary(tmp_path):
    rejects = tuple(Rejected(f"c0/bad{i:02d}.png", "not an image") for i in range(15))
    raw = synthetic(rejected=rejects)  # 15 of 75 scanned: exactly 0.2
    manifest = prepare(raw, tmp_path / "d", max_rejected=0.2)
    assert manifest["scanned"] == 75 and len(manifest["rejected"]) == 15
    assert manifest["rejected_by_reason"] == {"not an image": 15}
    with pytest.raises(
        DataError, match=r"^s: 15 of 75 files rejected \(15 not an image\), more than max_rejected=0\.19$"
    ):
        prepare(raw, tmp_path / "e", max_rejected=0.19)
    one = synthetic(rejected=rejects[:1])
    with pytest.raises(DataError, match="1 of 61 files rejected"):
        prepare(one, tmp_path / "f", max_rejected=0.0)
    assert prepare(synthetic(), tmp_path / "g", max_rejected=0.0)["rejected"] == []  # 0 rejected: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "g"]


def test_a_class_without_images_is_refused(tmp_path):
    raw = synthetic(num_classes=4)
    keep = raw.labels != 2
    no_c2 = RawDataset(raw.images[keep], raw.labels[keep], raw.classes)
    with pytest.raises(DataError) as info:
        prepare(no_c2, tmp_path / "d", source="mine")
    assert str(info.value) == "mine: no usable images in class c2"
    keep = raw.labels < 2
    with pytest.raises(DataError, match="^mine: no usable images in class c2, c3$"):
        prepare(RawDataset(raw.images[keep], raw.labels[keep], raw.classes), tmp_path / "d", source="mine")
    assert list(tmp_path.iterdir()) == []


def test_a_single_class_is_refused(tmp_path):
    with pytest.raises(DataError) as info:
        prepare(synthetic(num_classes=1), tmp_path / "d", source="one")
    assert str(info.value) == "one: found 1 class; a classifier needs at least 2"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- loading damaged datasets


def _prepared(tmp_path: Path) -> tuple[Path, dict]:
    manifest = prepare(synthetic(), tmp_path / "d", shard_size=5)
    return tmp_path / "d", manifest


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: b"not parquet at all" * 8, id="foreign"),
        pytest.param(lambda data: data[:8] + bytes(len(data) - 16) + data[-8:], id="zeroed-middle"),
    ],
)
def test_a_damaged_shard_is_a_data_error_naming_the_file(tmp_path, damage):
    directory, manifest = _prepared(tmp_path)
    shard = directory / split_files(manifest, "val")[1]
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(DataError) as info:
        load_prepared(directory)
    assert str(info.value).startswith(f"{shard}: not a readable Parquet shard (")


def test_a_damaged_shard_error_is_one_line(tmp_path):
    directory, manifest = _prepared(tmp_path)
    shard = directory / split_files(manifest, "val")[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + bytes(len(data) - 16) + data[-8:])
    with pytest.raises(DataError) as info:
        load_prepared(directory)
    assert "\n" not in str(info.value)


def test_a_missing_shard_is_a_data_error_naming_the_file(tmp_path):
    directory, manifest = _prepared(tmp_path)
    shard = directory / split_files(manifest, "test")[0]
    shard.unlink()
    with pytest.raises(DataError) as info:
        load_prepared(directory)
    assert str(info.value) == f"{shard}: missing from the prepared dataset"
    load_prepared(directory, splits=("train", "val"))  # the other splits still load


def test_a_shard_with_other_rows_than_the_manifest_is_a_data_error(tmp_path):
    directory, manifest = _prepared(tmp_path)
    shard = directory / split_files(manifest, "train")[0]  # 5 rows
    images, labels = read_shard(shard)
    write_shard(shard, images[:-2], labels[:-2])  # a valid shard, two rows short
    total = manifest["counts"]["train"]["total"]
    with pytest.raises(DataError) as info:
        load_prepared(directory)
    assert str(info.value) == (
        f"{directory}: train has {total - 2} rows, the manifest says {total}; run the prepare stage again"
    )


def test_a_manifest_listing_no_shards_of_a_split_is_a_data_error(tmp_path):
    directory, manifest = _prepared(tmp_path)
    files = {f: v for f, v in manifest["files"].items() if not f.startswith("val-")}
    (directory / "manifest.json").write_text(json.dumps(manifest | {"files": files}))
    with pytest.raises(DataError, match="the manifest lists no val shards"):
        load_prepared(directory)


# ---------------------------------------------------------------- statistics and summaries


def test_channel_stats_equal_numpy_float64_mean_and_std():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (50, 9, 7, 3), dtype=np.uint8)
    images[..., 2] //= 4  # channels with different statistics
    mean, std = channel_stats(images)
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    assert mean == np.round(pixels.mean(0), 6).tolist()
    assert std == np.round(pixels.std(0), 6).tolist()
    assert all(isinstance(v, float) for v in mean + std)


def test_channel_stats_of_constant_images_are_exact():
    white = np.full((10, 4, 4, 3), 255, dtype=np.uint8)
    assert channel_stats(white) == ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])  # no negative variance, no NaN
    mixed = np.zeros((2, 1, 1, 3), dtype=np.uint8)
    mixed[1] = (255, 51, 0)
    assert channel_stats(mixed) == ([0.5, 0.1, 0.0], [0.5, 0.1, 0.0])


def test_channel_stats_sum_across_chunks():
    # More pixels than one chunk (2**22): the last 7 pixels, white, are in the second chunk.
    n = (1 << 22) + 7
    images = np.zeros((1, n, 1, 3), dtype=np.uint8)
    images[0, -7:] = 255
    mean, std = channel_stats(images)
    p = 7 / n
    assert mean == [round(p, 6)] * 3
    assert std == [round(float(np.sqrt(p - p * p)), 6)] * 3


def test_summary_metrics_and_table(tmp_path):
    manifest = prepare(synthetic(rejected=REJECTS[:3]), tmp_path / "d")
    assert summary_metrics(manifest) == {
        "classes": 3,
        "images": {"train": 36, "val": 12, "test": 12},
        "rejected": 3,
        "scanned": 63,
        "content_hash": manifest["content_hash"],
    }
    assert summary_table(manifest).splitlines() == [
        "class   train     val    test",
        "c0         12       4       4",
        "c1         12       4       4",
        "c2         12       4       4",
        "total      36      12      12",
        "rejected 3 of 63 files: 1 not an image, 1 truncated, 1 zero-byte",
    ]


def test_summary_table_widens_for_long_names_and_shortens_many_classes():
    def manifest(classes: list[str]) -> dict:
        counts = {
            name: {"total": n * len(classes), "per_class": dict.fromkeys(classes, n)}
            for name, n in (("train", 8), ("val", 1), ("test", 1))
        }
        return {"classes": classes, "counts": counts, "rejected": [], "rejected_by_reason": {}, "scanned": 0}

    assert summary_table(manifest(["sunflower", "rose"])).splitlines() == [
        "class       train     val    test",
        "sunflower       8       1       1",
        "rose            8       1       1",
        "total          16       2       2",
    ]
    lines = summary_table(manifest([f"k{i}" for i in range(25)]), max_classes=20).splitlines()
    assert len(lines) == 1 + 20 + 1 + 1
    assert lines[20] == "k19         8       1       1"
    assert lines[21] == "…     (5 more classes)"
    assert lines[22] == "total     200      25      25"


# ---------------------------------------------------------------- what engine.fit asks of the data


@pytest.mark.parametrize("n", [1, 23, 24, 25])
@pytest.mark.parametrize("batch_size", [1, 4, 5, 12, 30])
@pytest.mark.parametrize("world_size", [1, 2])
def test_train_steps_is_the_number_of_batches_train_epoch_yields(n, batch_size, world_size):
    split = Split(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n))
    data = PreparedData(["a", "b"], (0.5,) * 3, (0.25,) * 3, "hash", {"train": split, "val": split})
    steps = data.train_steps(batch_size, world_size)
    for rank in range(world_size):
        batches = list(data.train_epoch(batch_size, epoch=0, seed=0, rank=rank, world_size=world_size))
        assert len(batches) == steps, (rank, n, batch_size, world_size)
        assert sum(len(labels) for _, labels in batches) == -(-n // world_size)  # padded evenly over ranks


def test_val_batches_cover_the_validation_split_once_over_ranks():
    train = Split(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.arange(4))
    val = Split(torch.zeros(11, 3, 2, 2, dtype=torch.uint8), torch.arange(11))
    data = PreparedData(["a", "b"], (0.5,) * 3, (0.25,) * 3, "hash", {"train": train, "val": val})
    seen = [
        int(x) for r in range(2) for _, labels in data.val_batches(3, rank=r, world_size=2) for x in labels
    ]
    assert sorted(seen) == list(range(11))
    assert [len(labels) for _, labels in data.val_batches(4)] == [4, 4, 3]
