"""The prepare stage's library: stratified split, per-channel statistics, manifest, atomic write.

A prepared dataset is a directory of plain `.npy` arrays (uint8 NHWC images, int64 labels) per split plus
`manifest.json`. `.npy` has no timestamps, so the same input gives byte-identical files and DVC sees no change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from resnet.data.sources import RawDataset
from resnet.errors import DataError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


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
    """Per-channel mean and std of uint8 NHWC images, in [0, 1] units, computed in float64."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return pixels.mean(axis=0).round(6).tolist(), pixels.std(axis=0).round(6).tolist()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_prepared(
    raw: RawDataset, out_dir: str | Path, *, val: float, test: float, seed: int, source: str
) -> dict:
    """Split `raw` and write it to `out_dir` atomically: everything goes to a temporary sibling directory which
    replaces `out_dir` only once complete, so a failure never leaves a half-written dataset. Returns the manifest."""
    out_dir = Path(out_dir)
    if len(raw.classes) < 2:
        raise DataError(f"{source}: found {len(raw.classes)} class; a classifier needs at least 2")
    splits = stratified_split(raw.labels, val, test, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        files = {}
        for name in SPLITS:
            idx = splits[name]
            for kind, array in (("images", raw.images[idx]), ("labels", raw.labels[idx])):
                path = tmp / f"{name}_{kind}.npy"
                np.save(path, np.ascontiguousarray(array), allow_pickle=False)
                files[path.name] = _sha256(path)
        mean, std = channel_stats(raw.images[splits["train"]])
        content_hash = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        manifest = {
            "source": source,
            "classes": list(raw.classes),
            "image_shape": list(raw.images.shape[1:]),
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
            "rejected": [],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest; run the prepare stage first") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
