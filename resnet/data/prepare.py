"""The prepare stage's library: stratified split, per-channel statistics, Parquet shards, manifest, atomic write.

A prepared dataset is a directory:

    manifest.json                      classes, counts per split and class, mean/std, files, hashes, rejects
    train-00000-of-00002.parquet       columns: image (fixed-size binary, H*W*3 uint8 bytes, HWC), label (int32)
    ...

Parquet because every reader of the project takes a shard as it is, from local disk or S3: the in-memory
loader (pyarrow → one numpy buffer, no per-row copy), Ray Data's read tasks (`distributed.train_dataset`) and
anyone with pyarrow or pandas. Parquet written by the same
pyarrow from the same rows has no timestamps, so the same input gives byte-identical files and `dvc repro`
stays a no-op.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from resnet.data.s3 import is_s3_uri, read_object  # boto3 is imported only when one is used
from resnet.data.sources import RawDataset
from resnet.errors import DataError
from resnet.io import atomic_dir

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
PREPARED_ROOT = "data/prepared"  # where the prepare stage writes each dataset (dvc.yaml says the same)
FORMAT = "resnet-pipeline/parquet-shards/v1"
# How the sources other than imagefolder bring images to image_size: digits and cifar are square and resized by
# `sources.resize_rgb` (bilinear, aspect ratio ignored), fractals are drawn at that size. The manifest's
# "resize" (a policy of resnet.data.images.RESIZE_POLICIES) tells predictions how to treat new images.
FIXED_RESIZE = "stretch"


def stratified_split(labels: np.ndarray, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Indices of each split. Every class is shuffled with `seed` and cut by the same fractions (at least one
    validation and one test image per class), so each split keeps the class balance of the whole."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = max(1, round(test * len(members)))
        n_val = max(1, round(val * len(members)))
        if n_test + n_val >= len(members):
            raise DataError(f"class {cls} has {len(members)} images: too few to split into train/val/test")
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test : n_test + n_val])
        parts["train"].append(members[n_test + n_val :])
    # Interleave classes in a seeded order, so that a prefix of a split is a fair sample too.
    return {name: rng.permutation(np.concatenate(chunks)) for name, chunks in parts.items()}


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images, in [0, 1] units, exact (integer sums, then float64)."""
    pixels = images.reshape(-1, images.shape[-1])
    count = len(pixels)
    # Per-channel sums of x and x² in int64 over chunks: exact, and no float64 copy of the whole dataset.
    sums = np.zeros(pixels.shape[1], dtype=np.int64)
    squares = np.zeros(pixels.shape[1], dtype=np.int64)
    for start in range(0, count, 1 << 22):
        chunk = pixels[start : start + (1 << 22)].astype(np.int64)
        sums += chunk.sum(axis=0)
        squares += (chunk * chunk).sum(axis=0)
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return (mean / 255.0).round(6).tolist(), (std / 255.0).round(6).tolist()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_names(split: str, rows: int, shard_size: int) -> list[str]:
    count = max(1, -(-rows // shard_size))
    return [f"{split}-{i:05d}-of-{count:05d}.parquet" for i in range(count)]


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """One Parquet file: `image` as fixed-size binary (the HWC bytes of one image), `label` as int32."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, h, w, c = images.shape
    width = h * w * c
    flat = pa.py_buffer(np.ascontiguousarray(images).reshape(-1))
    image_column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, flat])
    schema = pa.schema(
        [pa.field("image", pa.binary(width)), pa.field("label", pa.int32())],
        metadata={"image_shape": json.dumps([h, w, c])},
    )
    table = pa.Table.from_arrays([image_column, pa.array(labels.astype(np.int32))], schema=schema)
    # One row group per shard, zstd: images of this kind compress well; no statistics (nothing to filter on).
    pq.write_table(table, path, compression="zstd", row_group_size=max(n, 1), write_statistics=False)


def default_prepared_dir(name: str) -> str:
    """Where the stage `prepare@name` writes dataset `name`: the default `--data` of the training stages."""
    return f"{PREPARED_ROOT}/{name}"


def join_location(prepared_dir: str | Path, name: str) -> str:
    """`prepared_dir`/`name` for a local directory or an s3://bucket/prefix alike."""
    text = str(prepared_dir)
    return f"{text.rstrip('/')}/{name}" if is_s3_uri(text) else str(Path(text) / name)


def resolve_location(location: str | Path) -> str:
    """An absolute path (Ray workers run elsewhere) or an s3:// URI unchanged."""
    text = str(location)
    return text if is_s3_uri(text) else str(Path(text).resolve())


def read_bytes(location: str | Path) -> bytes:
    """A file's bytes from local disk or S3 (a prepared dataset may live in a bucket, for cluster workers that
    share no disk). FileNotFoundError locally; DataError naming the URI from S3."""
    if is_s3_uri(str(location)):
        return read_object(str(location))
    return Path(location).read_bytes()


def read_shard(location: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, H, W, 3) images, int64 labels) of one shard, local or s3://, the images without a per-row copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(read_bytes(location)))
    shape = json.loads(table.schema.metadata[b"image_shape"])
    return table_to_arrays(table, shape)


def table_to_arrays(table, shape) -> tuple[np.ndarray, np.ndarray]:
    """A Parquet/Arrow table of (image fixed-size binary, label) → (uint8 (N, *shape), int64 (N,))."""
    column = table.column("image").combine_chunks()
    width = column.type.byte_width
    data = column.buffers()[1]
    images = np.frombuffer(data, dtype=np.uint8, count=len(column) * width, offset=column.offset * width)
    labels = table.column("label").to_numpy().astype(np.int64)
    return images.reshape(len(column), *shape), labels


def write_prepared(
    raw: RawDataset,
    out_dir: str | Path,
    *,
    val: float,
    test: float,
    seed: int,
    source: str,
    shard_size: int = 10_000,
    max_rejected: float = 1.0,
    progress=None,
    resize: str = FIXED_RESIZE,
) -> dict:
    """Split `raw` and write it to `out_dir` atomically: everything goes to a temporary sibling directory which
    replaces `out_dir` only once complete, so a failure never leaves a half-written dataset. Returns the manifest.

    `max_rejected` is the fraction of input files that may have been rejected by the source; more is an error
    (a dataset that lost a tenth of its images to corruption should not train silently). `progress`, if given,
    is called as progress(iterable, desc=..., total=..., unit=...) around the shard writes. `resize` is the
    policy the source resized its images with, recorded in the manifest (not part of the content hash).
    """
    out_dir = Path(out_dir)
    scanned = len(raw.labels) + len(raw.rejected)
    if raw.rejected and len(raw.rejected) / scanned > max_rejected:
        reasons = _reason_counts(raw)
        raise DataError(
            f"{source}: {len(raw.rejected)} of {scanned} files rejected "
            f"({', '.join(f'{n} {r}' for r, n in reasons.items())}), more than max_rejected={max_rejected}"
        )
    if len(raw.classes) < 2:
        raise DataError(f"{source}: found {len(raw.classes)} class; a classifier needs at least 2")
    empty = [cls for i, cls in enumerate(raw.classes) if not (raw.labels == i).any()]
    if empty:
        raise DataError(f"{source}: no usable images in class {', '.join(empty)}")
    splits = stratified_split(raw.labels, val, test, seed)
    with atomic_dir(out_dir) as tmp:
        jobs = []
        for name in SPLITS:
            idx = splits[name]
            for i, file in enumerate(shard_names(name, len(idx), shard_size)):
                jobs.append((file, idx[i * shard_size : (i + 1) * shard_size]))
        files = {}
        for file, idx in (
            progress(jobs, desc=f"{source}: write", total=len(jobs), unit="shard") if progress else jobs
        ):
            write_shard(tmp / file, raw.images[idx], raw.labels[idx])
            files[file] = {"rows": int(len(idx)), "sha256": sha256_file(tmp / file)}
        mean, std = channel_stats(raw.images[splits["train"]])
        content_hash = hashlib.sha256(
            json.dumps({f: v["sha256"] for f, v in files.items()}, sort_keys=True).encode()
        ).hexdigest()
        manifest = {
            "format": FORMAT,
            "source": source,
            "classes": list(raw.classes),
            "class_to_index": {cls: i for i, cls in enumerate(raw.classes)},
            "image_shape": list(raw.images.shape[1:]),
            "resize": resize,
            "seed": seed,
            "counts": {
                name: {
                    "total": int(len(splits[name])),
                    "per_class": {
                        cls: int((raw.labels[splits[name]] == i).sum()) for i, cls in enumerate(raw.classes)
                    },
                }
                for name in SPLITS
            },
            "mean": mean,
            "std": std,
            "files": files,
            "content_hash": content_hash,
            "scanned": scanned,
            "rejected": [
                {"file": r.file, "reason": r.reason, "detail": r.detail}
                for r in sorted(raw.rejected, key=lambda r: r.file)
            ],
            "rejected_by_reason": _reason_counts(raw),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def prepare_dataset(name: str, dataset, out_dir: str | Path, *, progress=None) -> dict:
    """Load dataset `name` (a `config.DatasetConfig`) from its source and write it to `out_dir`; the manifest."""
    from resnet.data.sources import load_source

    raw = load_source(dataset.source, dataset.image_size, **dataset.source_options())
    return write_prepared(
        raw,
        out_dir,
        val=dataset.split.val,
        test=dataset.split.test,
        seed=dataset.seed,
        source=name,
        shard_size=dataset.shard_size,
        max_rejected=dataset.max_rejected,
        progress=progress,
        resize=dataset.resize if dataset.source == "imagefolder" else FIXED_RESIZE,
    )


def _reason_counts(raw: RawDataset) -> dict[str, int]:
    return dict(sorted(Counter(rejected.reason for rejected in raw.rejected).items()))


def summary_metrics(manifest: dict) -> dict:
    """The numbers `dvc metrics show` tracks for a prepared dataset."""
    return {
        "classes": len(manifest["classes"]),
        "images": {name: manifest["counts"][name]["total"] for name in SPLITS},
        "rejected": len(manifest["rejected"]),
        "scanned": manifest["scanned"],
        "content_hash": manifest["content_hash"],
    }


def summary_table(manifest: dict, max_classes: int = 20) -> str:
    """Counts per class and split, as a fixed-width table for the end of the prepare stage's output."""
    classes = manifest["classes"]
    width = max(5, *(len(c) for c in classes[:max_classes]))
    lines = [f"{'class':<{width}} " + " ".join(f"{name:>7}" for name in SPLITS)]
    for cls in classes[:max_classes]:
        lines.append(
            f"{cls:<{width}} " + " ".join(f"{manifest['counts'][s]['per_class'][cls]:>7}" for s in SPLITS)
        )
    if len(classes) > max_classes:
        lines.append(f"{'…':<{width}} ({len(classes) - max_classes} more classes)")
    lines.append(f"{'total':<{width}} " + " ".join(f"{manifest['counts'][s]['total']:>7}" for s in SPLITS))
    if manifest["rejected"]:
        reasons = ", ".join(f"{n} {r}" for r, n in manifest["rejected_by_reason"].items())
        lines.append(f"rejected {len(manifest['rejected'])} of {manifest['scanned']} files: {reasons}")
    return "\n".join(lines)


def read_manifest(prepared_dir: str | Path) -> dict:
    """The manifest of a prepared dataset in a local directory or under s3://bucket/prefix."""
    path = join_location(prepared_dir, MANIFEST)
    try:
        manifest = json.loads(read_bytes(path))
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest; run the prepare stage first") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text, expected a JSON manifest") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; run the prepare stage again"
        )
    return manifest


def split_files(manifest: dict, split: str) -> list[str]:
    """The shard file names of `split`, in order."""
    return sorted(f for f in manifest["files"] if f.startswith(f"{split}-"))
