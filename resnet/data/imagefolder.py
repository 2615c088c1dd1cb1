"""The `imagefolder` source: a directory (local or s3://bucket/prefix) of ROOT/CLASS_NAME/**/IMAGE files.

The layout and class order are torchvision's ImageFolder: every directory under ROOT is a class, classes are
sorted by name and indexed by position (so label i means the same class as in torchvision), files may be
nested at any depth below their class directory. Unlike ImageFolder, files are not filtered by extension:
every file in a class directory is decoded, and one that cannot be used (see resnet/data/images.py) is listed
in `RawDataset.rejected` with its reason instead of stopping the run. Names starting with '.' (.DS_Store,
.ipynb_checkpoints, .git) are skipped silently, at every level; files directly under ROOT are ignored.

Images come out ordered by (class, path relative to ROOT), whatever order the listing or the downloads happen
in, so the same folder gives the same bytes on every run. Decoding runs sequentially in this process,
streaming: an S3 object is decoded as soon as it arrives and its bytes are dropped.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resnet.data.images import RESIZE_POLICIES, RejectedImage, decode_image, one_line
from resnet.data.s3 import is_s3_uri  # boto3 is imported only when S3 is used
from resnet.data.sources import REJECT_REASONS, RawDataset, Rejected
from resnet.errors import DataError
from resnet.progress import progress

LAYOUT = "expected ROOT/CLASS/IMAGE files"


@dataclass(frozen=True)
class Candidate:
    """One file in a class directory."""

    cls: str
    relative: str  # posix path below ROOT, "cat/sub/x.png": the sort key
    name: str  # as Rejected names it: `relative` for a local folder, the object's s3:// URI for S3
    location: str  # what the reader opens: a local path, or the S3 key
    size: int | None  # bytes, None when unknown (a broken link): then the reader reports the problem


@dataclass
class Layout:
    """What a listing found: the class directories and the candidate files in them."""

    root: str  # as the user wrote it, for messages
    classes: list[str]  # sorted
    files: list[Candidate]
    rejected: list[Rejected] = field(default_factory=list)  # things the listing itself could not read
    separator: str = "/"

    def class_path(self, cls: str) -> str:
        return f"{self.root.rstrip('/')}{self.separator}{cls}"


# A reader turns candidates into their bytes, or the exception that stopped it, in the order given.
Reader = Callable[[Sequence[Candidate]], Iterable[tuple[Candidate, "bytes | Exception"]]]


def load_imagefolder(
    image_size: int,
    *,
    path: str,
    resize: str = "center_crop",
    min_size: int = 8,
    workers: int = 16,
) -> RawDataset:
    """Every usable image under `path` (a local directory or s3://bucket/prefix) as uint8 RGB
    (N, image_size, image_size, 3), labels by class directory, the files left out with their reasons.

    `resize` is one of RESIZE_POLICIES; images with a side below `min_size` pixels are rejected as too small;
    `workers` is the number of parallel S3 downloads.
    """
    if resize not in RESIZE_POLICIES:
        raise DataError(f"imagefolder resize {resize!r}: expected one of {', '.join(RESIZE_POLICIES)}")
    for name, value in (("image_size", image_size), ("min_size", min_size), ("workers", workers)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"imagefolder {name} {value!r}: expected a positive integer")
    path = os.fspath(path)
    if is_s3_uri(path):
        return load_s3(path, image_size, resize=resize, min_size=min_size, workers=workers)
    layout = list_local(path)
    return decode_layout(
        layout, read_local, image_size=image_size, resize=resize, min_size=min_size, desc=f"decode {path}"
    )


# ---- local folders ----


def list_local(path: str) -> Layout:
    root = Path(path)
    if not root.exists():
        raise DataError(f"{path}: no such directory ({LAYOUT})")
    if not root.is_dir():
        raise DataError(f"{path}: is a file, not a directory ({LAYOUT})")
    try:
        with os.scandir(root) as entries:
            classes = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    except OSError as exc:
        raise DataError(f"{path}: cannot list the directory ({exc.strerror or exc})") from None
    layout = Layout(root=path, classes=classes, files=[], separator=os.sep)
    for cls in classes:
        _walk_class(root, cls, layout)
    return layout


def _walk_class(root: Path, cls: str, layout: Layout) -> None:
    """Every non-hidden regular file below ROOT/cls, following symbolic links (as torchvision does) but never
    into a directory twice, so a link loop ends."""
    top = root / cls

    def unreadable_directory(exc: OSError) -> None:
        if Path(exc.filename) == top:
            raise DataError(f"{layout.class_path(cls)}: cannot list the directory ({exc.strerror or exc})")
        relative = Path(exc.filename).relative_to(root).as_posix()
        detail = f"cannot list the directory: {exc.strerror or exc}"
        layout.rejected.append(Rejected(relative + "/", "unreadable", one_line(detail)))

    seen: set[tuple[int, int]] = set()
    for directory, subdirectories, filenames in os.walk(top, onerror=unreadable_directory, followlinks=True):
        info = os.stat(directory)
        seen.add((info.st_dev, info.st_ino))
        keep = []
        for name in subdirectories:
            if name.startswith("."):
                continue
            try:
                sub = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            if (sub.st_dev, sub.st_ino) not in seen:
                keep.append(name)
        subdirectories[:] = keep
        for name in filenames:
            if name.startswith("."):
                continue
            full = os.path.join(directory, name)
            try:
                info = os.stat(full)
            except OSError:  # a broken link: the reader will say why
                size = None
            else:
                if not stat.S_ISREG(info.st_mode):  # a fifo or a device would block or never end
                    continue
                size = info.st_size
            relative = Path(full).relative_to(root).as_posix()
            layout.files.append(Candidate(cls, relative, relative, full, size))


def read_local(files: Sequence[Candidate]) -> Iterator[tuple[Candidate, bytes | Exception]]:
    for file in files:
        try:
            with open(file.location, "rb") as handle:
                data: bytes | Exception = handle.read()
        except OSError as exc:  # permission denied, a broken link, a file gone since the listing
            data = exc
        yield file, data


# ---- S3 ----


def load_s3(
    uri: str, image_size: int, *, resize: str, min_size: int, workers: int, api: Any = None
) -> RawDataset:
    """The S3 branch. `api` is resnet.data.s3 (the default) or a stand-in with the same split_s3_uri,
    list_objects and read_objects, for tests."""
    if api is None:
        from resnet.data import s3 as api  # boto3 only when a dataset is on S3

    bucket, prefix = api.split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    objects = api.list_objects(uri)  # a prefix is a directory there too; errors name the URI as given
    if not objects:
        raise DataError(f"{uri}: no objects under this prefix ({LAYOUT})")
    layout = s3_layout(uri, bucket, prefix, objects)

    def read(files: Sequence[Candidate]) -> Iterator[tuple[Candidate, bytes | Exception]]:
        results = api.read_objects(bucket, [file.location for file in files], workers=workers)
        for file, (key, result) in zip(files, results, strict=True):
            if key != file.location:
                raise RuntimeError(f"read_objects returned {key!r} where {file.location!r} was due")
            yield file, result

    return decode_layout(
        layout, read, image_size=image_size, resize=resize, min_size=min_size, desc=f"download+decode {uri}"
    )


def s3_layout(uri: str, bucket: str, prefix: str, objects: Iterable[tuple[str, int]]) -> Layout:
    """Classes and candidates from the (key, size) of the objects under `prefix` (which ends in '/' unless it
    is empty): a key PREFIX/CLASS/.../FILE belongs to CLASS; keys directly under the prefix and directory
    markers (keys ending in '/') are ignored; names starting with '.' are skipped at every level."""
    classes: set[str] = set()
    files = []
    for key, size in objects:
        if not key.startswith(prefix) or key.endswith("/"):
            continue
        parts = key[len(prefix) :].split("/")
        if len(parts) < 2 or not parts[0] or parts[0].startswith("."):
            continue
        classes.add(parts[0])
        if any(part.startswith(".") for part in parts[1:]):
            continue
        files.append(Candidate(parts[0], "/".join(parts), f"s3://{bucket}/{key}", key, size))
    return Layout(root=uri, classes=sorted(classes), files=files)


# ---- decoding, shared ----


def decode_layout(
    layout: Layout, read: Reader, *, image_size: int, resize: str, min_size: int, desc: str
) -> RawDataset:
    """Check the layout, read and decode every candidate in (class, path) order, collect the rejected."""
    classes = layout.classes
    if not classes:
        raise DataError(f"{layout.root}: no class directories ({LAYOUT})")
    if len(classes) < 2:
        raise DataError(f"{layout.root}: found 1 class ({classes[0]}); a classifier needs at least 2")
    index = {cls: i for i, cls in enumerate(classes)}
    files = sorted(layout.files, key=lambda f: (index[f.cls], f.relative))
    per_class = Counter(f.cls for f in files)
    for cls in classes:
        if not per_class[cls]:
            raise DataError(f"{layout.class_path(cls)}: empty class directory (expected image files)")

    rejected = list(layout.rejected)
    reasons: dict[str, Counter] = {cls: Counter() for cls in classes}

    def reject(file: Candidate, reason: str, detail: str) -> None:
        rejected.append(Rejected(file.name, reason, detail))
        reasons[file.cls][reason] += 1

    to_read = []
    for file in files:
        if file.size == 0:  # known empty without reading it
            reject(file, "zero-byte", "the file is empty")
        else:
            to_read.append(file)

    images = np.empty((len(to_read), image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(len(to_read), dtype=np.int64)
    count = 0
    for file, data in progress(read(to_read), desc=desc, total=len(to_read), unit="img"):
        if isinstance(data, Exception):
            reason = _reason(data).removeprefix(f"{file.name}: ")  # s3.read_objects' errors name the URI
            reject(file, "unreadable", one_line(f"cannot read: {reason}"))
            continue
        try:
            images[count] = decode_image(data, image_size=image_size, resize=resize, min_size=min_size)
        except RejectedImage as exc:
            reject(file, exc.reason, exc.detail)
            continue
        labels[count] = index[file.cls]
        count += 1

    for cls in classes:
        if sum(reasons[cls].values()) == per_class[cls]:
            total = per_class[cls]
            counts = sorted(reasons[cls].items(), key=lambda item: (-item[1], REJECT_REASONS.index(item[0])))
            summary = ", ".join(f"{n} {reason}" for reason, n in counts)  # the most frequent first
            files_word = "its only file is not" if total == 1 else f"none of its {total} files is"
            raise DataError(f"{layout.class_path(cls)}: {files_word} a usable image ({summary})")

    if count < len(images):
        images, labels = images[:count].copy(), labels[:count].copy()
    rejected.sort(key=lambda r: r.file)
    return RawDataset(images, labels, tuple(classes), tuple(rejected))


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
