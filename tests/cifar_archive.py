"""Small CIFAR archives in the exact official format, for tests.

The official batches were pickled by Python 2 (cPickle, protocol 2): dict keys, class names, file names and the
arrays' raw bytes are Python 2 `str`, written with the SHORT_BINSTRING/BINSTRING opcodes, and the arrays name
`numpy.core.multiarray._reconstruct`, `numpy.ndarray` and `numpy.dtype`. Python 3's own pickler cannot write
that (at protocol 2 it spells bytes as `_codecs.encode(...)` calls), so `py2_pickle` does it with a small
subclass of the pure-Python pickler.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Each official file, as (archive top folder, train batches, test batches, meta file).
LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta"),
}


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote it: every string is a Python 2 str, numpy named as in numpy 1."""

    dispatch = pickle._Pickler.dispatch.copy()
    GLOBALS = {
        id(np.ndarray): ("numpy", "ndarray"),
        id(np.dtype): ("numpy", "dtype"),
        id(_numpy_reconstruct()): ("numpy.core.multiarray", "_reconstruct"),
    }

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module, qualname = self.GLOBALS[id(obj)]  # the official files name nothing else
        self.write(pickle.GLOBAL + module.encode() + b"\n" + qualname.encode() + b"\n")
        self.memoize(obj)


def py2_pickle(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) → the official (N, 3072) rows: the red plane, then green, then blue, each row-major."""
    return np.stack(
        [
            np.concatenate([image[:, :, 0].ravel(), image[:, :, 1].ravel(), image[:, :, 2].ravel()])
            for image in images
        ]
    ).astype(np.uint8)


@dataclass(frozen=True)
class CifarContents:
    """What a test archive holds, pooled as the loader returns it: train batches in order, then test."""

    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # int64 (N,)
    classes: tuple[str, ...]
    num_train: int  # the first num_train images are the training batches'


def write_cifar_archive(
    path: str | Path,
    name: str,
    *,
    per_class: int,
    num_classes: int | None = None,
    test_per_class: int = 1,
    seed: int = 0,
    first_images: np.ndarray | None = None,
    omit: tuple[str, ...] = (),
    edit: Callable[[str, dict], None] | None = None,
    raw: dict[str, bytes] | None = None,
) -> CifarContents:
    """Write a small `name` ("cifar10"/"cifar100") archive at `path` in the official layout and pickle format.

    `per_class` training and `test_per_class` test images per class, shuffled by `seed` and dealt into the
    official batches. `first_images` (K, 32, 32, 3) replace the first training images. For broken archives:
    `omit` leaves out members (file names such as "data_batch_3"), `edit(member, entry)` may change an entry
    dict in place before it is pickled, `raw` replaces a member's bytes entirely.
    """
    folder, train_files, test_files, meta_file = LAYOUT[name]
    num_classes = num_classes if num_classes is not None else (10 if name == "cifar10" else 100)
    if name == "cifar10":
        classes = tuple(
            CIFAR10_NAMES[i] if i < len(CIFAR10_NAMES) else f"class_{i}" for i in range(num_classes)
        )
    else:
        classes = tuple(f"fine_{i:03d}" for i in range(num_classes))
    rng = np.random.default_rng(seed)

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.repeat(np.arange(num_classes), count))
        return rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels.astype(np.int64)

    train_images, train_labels = draw(per_class)
    test_images, test_labels = draw(test_per_class)
    if first_images is not None:
        train_images[: len(first_images)] = first_images

    members: dict[str, Any] = {}
    groups = [
        (train_files, train_images, train_labels, "training"),
        (test_files, test_images, test_labels, "testing"),
    ]
    for files, images, labels, kind in groups:
        for number, chunk in enumerate(np.array_split(np.arange(len(labels)), len(files)), start=1):
            file = files[number - 1]
            entry: dict[bytes, Any] = {
                b"batch_label": f"{kind} batch {number} of {len(files)}".encode(),
                b"data": cifar_rows(images[chunk]) if len(chunk) else np.zeros((0, 3072), np.uint8),
                b"filenames": [f"image_{file}_{i:05d}.png".encode() for i in range(len(chunk))],
            }
            if name == "cifar10":
                entry[b"labels"] = [int(v) for v in labels[chunk]]
            else:
                entry[b"fine_labels"] = [int(v) for v in labels[chunk]]
                entry[b"coarse_labels"] = [int(v) % 20 for v in labels[chunk]]
            members[file] = entry
    if name == "cifar10":
        members[meta_file] = {
            b"num_cases_per_batch": max(len(c) for c in np.array_split(train_labels, 5)),
            b"label_names": [c.encode() for c in classes],
            b"num_vis": 3072,
        }
    else:
        members[meta_file] = {
            b"fine_label_names": [c.encode() for c in classes],
            b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
        }

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        top = tarfile.TarInfo(folder)
        top.type, top.mode, top.mtime = tarfile.DIRTYPE, 0o755, 1_234_567_890
        tar.addfile(top)
        for member, entry in members.items():
            if member in omit:
                continue
            if edit is not None:
                edit(member, entry)
            data = raw[member] if raw and member in raw else py2_pickle(entry)
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_234_567_890
            tar.addfile(info, io.BytesIO(data))

    return CifarContents(
        images=np.concatenate([train_images, test_images]),
        labels=np.concatenate([train_labels, test_labels]),
        classes=classes,
        num_train=len(train_labels),
    )
