"""CIFAR-10 and CIFAR-100 from the official "python version" archives (https://www.cs.toronto.edu/~kriz/cifar.html).

The archive is read straight from the tarfile in one sequential pass (nothing is extracted to disk), and each
batch is unpickled by a restricted unpickler that can build only dicts, lists, strings, numbers and numpy arrays:
a pickle that names any other callable (os.system, builtins.eval, ...) is refused before anything runs.

Layout (as torchvision's `torchvision.datasets.CIFAR10`/`CIFAR100` read it):

- `cifar-10-python.tar.gz`: `cifar-10-batches-py/` with `data_batch_1` .. `data_batch_5`, `test_batch` and
  `batches.meta` (class names under `label_names`); labels under `labels`.
- `cifar-100-python.tar.gz`: `cifar-100-python/` with `train`, `test` and `meta` (class names under
  `fine_label_names`); labels under `fine_labels` (the 100 fine classes; the 20 coarse ones are ignored).

Each batch is a Python 2 pickle of a dict whose `data` is uint8 (N, 3072): per image 1024 red, 1024 green and
1024 blue values, each plane row-major with rows of 32 pixels.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from resnet.data.sources import RawDataset, resize_rgb
from resnet.errors import DataError
from resnet.progress import progress

SIDE = 32  # CIFAR images are 32×32 RGB
ROW_SIZE = 3 * SIDE * SIDE  # 3072 values per image, channel-major


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR archive comes from and what is inside it (the values of torchvision's dataset classes)."""

    name: str
    url: str
    filename: str  # the archive's file name
    md5: str  # of the archive, as torchvision checks it after downloading
    base_folder: str  # the archive's top directory
    train: tuple[str, ...]  # the training batches, in order
    test: tuple[str, ...]
    meta: str  # the file holding the class names
    classes_key: str  # the class names' key in the meta file
    labels_key: str  # the labels' key in each batch

    @property
    def batches(self) -> tuple[str, ...]:
        return self.train + self.test

    @property
    def members(self) -> tuple[str, ...]:
        """Every file the loader reads, relative to the base folder: the batches in pool order, then the meta."""
        return self.batches + (self.meta,)


CIFAR_SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="cifar10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        filename="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        base_folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        classes_key="label_names",
        labels_key="labels",
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        filename="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        base_folder="cifar-100-python",
        train=("train",),
        test=("test",),
        meta="meta",
        classes_key="fine_label_names",
        labels_key="fine_labels",
    ),
}


def load_cifar(
    name: str,
    image_size: int,
    *,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike = "data/downloads",
) -> RawDataset:
    """All of CIFAR-10 or CIFAR-100 (`name`: "cifar10" or "cifar100") as one pool, resized to `image_size`.

    The pool holds the official training batches followed by the test batch, each in file order (CIFAR-10:
    `data_batch_1` .. `data_batch_5`, then `test_batch`, 60,000 images; CIFAR-100: `train`, then `test`,
    60,000 images). The official train/test division is deliberately not kept: the prepare stage makes its own
    seeded, stratified train/val/test split of the pool. Classes are the meta file's names in label order.

    `path` is one of:

    - None: download the official archive from torchvision's URL into `cache_dir` with torchvision's own
      downloader and md5 check (an archive already there with the right md5 is not downloaded again);
    - a local archive (`cifar-10-python.tar.gz`; any tar, gzip'd or not, with the official layout);
    - an extracted directory: `cifar-10-batches-py` itself, or the folder that contains it;
    - `s3://bucket/key.tar.gz`: downloaded to `cache_dir/<basename of key>`, then read as a local archive.

    Images are 32×32; any other `image_size` is a bilinear resize. Raises DataError (one line naming the file)
    for anything that is not a CIFAR archive of the expected layout.
    """
    try:
        spec = CIFAR_SPECS[name]
    except KeyError:
        raise DataError(f"unknown CIFAR dataset {name!r}: expected one of {', '.join(CIFAR_SPECS)}") from None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"{name}: image_size must be a positive number of pixels, got {image_size!r}")

    if path is None:
        archive = download_official(spec, Path(cache_dir))
        batches, classes = _read_archive(spec, archive, label=str(archive))
    elif _is_s3(str(path)):
        archive = _download_s3(str(path), Path(cache_dir))
        batches, classes = _read_archive(spec, archive, label=f"{path} (downloaded to {archive})")
    else:
        local = Path(path).expanduser()
        if local.is_dir():
            batches, classes = _read_directory(spec, local)
        elif local.is_file():
            batches, classes = _read_archive(spec, local, label=str(local))
        else:
            raise DataError(
                f"{local}: no such file or directory (expected the {spec.filename} archive, the extracted "
                f"{spec.base_folder} folder, or a folder containing it)"
            )

    for where, _data, labels in batches:
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            bad = labels[(labels < 0) | (labels >= len(classes))][0]
            raise DataError(
                f"{where}: label {bad} is outside the {len(classes)} class names of {spec.meta} "
                f"(expected 0..{len(classes) - 1})"
            )
    data = np.concatenate([data for (_where, data, _labels) in batches])
    labels = np.concatenate([labels for (_where, _data, labels) in batches])
    images = np.ascontiguousarray(data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1))
    if image_size != SIDE:
        images = resize_rgb(images, image_size)
    return RawDataset(images, labels, classes)


def load_cifar10(image_size: int, **options) -> RawDataset:
    """CIFAR-10 (10 classes, 60,000 images pooled): see `load_cifar`."""
    return load_cifar("cifar10", image_size, **options)


def load_cifar100(image_size: int, **options) -> RawDataset:
    """CIFAR-100 (100 fine classes, 60,000 images pooled): see `load_cifar`."""
    return load_cifar("cifar100", image_size, **options)


# --- where the archive comes from --------------------------------------------------------------------------


def download_official(spec: CifarSpec, cache_dir: Path) -> Path:
    """The official archive in `cache_dir`, downloaded by torchvision (`download_url`: the first half of its
    `download_and_extract_archive`, with the same md5 check) unless a copy with the right md5 is already there.
    Nothing is extracted: the loader reads the archive itself."""
    from torchvision.datasets.utils import calculate_md5, download_url  # heavy (torch): only when downloading

    archive = cache_dir / spec.filename
    try:
        download_url(spec.url, str(cache_dir), filename=spec.filename, md5=spec.md5)
    except RuntimeError as exc:  # torchvision: "File not found or corrupted." after its md5 check
        if not archive.is_file():
            raise DataError(f"{archive}: download from {spec.url} left no file ({exc})") from None
        raise DataError(
            f"{archive}: md5 {calculate_md5(archive)} does not match torchvision's {spec.md5} for {spec.url} "
            "(a corrupt or substituted download; it is downloaded again on the next run)"
        ) from None
    except OSError as exc:  # urllib.error.URLError is an OSError
        raise DataError(
            f"could not download {spec.url} to {archive}: {exc} (download it by hand and set the dataset's "
            "path to the file)"
        ) from None
    return archive


def _is_s3(path: str) -> bool:
    return path[:5].lower() == "s3://"


def _download_s3(uri: str, cache_dir: Path) -> Path:
    """Download the object `uri` to `cache_dir/<basename of its key>` (resnet.data.s3: atomic, one-line errors)."""
    bucket, _, key = uri[5:].partition("/")
    basename = PurePosixPath(key).name
    if not bucket or not key or key.endswith("/") or not basename:
        raise DataError(
            f"{uri}: expected s3://bucket/key naming the archive object (e.g. s3://bucket/cifar-10-python.tar.gz)"
        )
    from resnet.data.s3 import download_file  # boto3: only for s3:// paths

    cache_dir.mkdir(parents=True, exist_ok=True)
    destination = cache_dir / basename
    download_file(uri, destination)
    return destination


# --- reading -----------------------------------------------------------------------------------------------

Batch = tuple[str, np.ndarray, np.ndarray]  # (where, for messages; data uint8 (N, 3072); labels int64 (N,))


def _read_archive(spec: CifarSpec, archive: Path, *, label: str) -> tuple[list[Batch], tuple[str, ...]]:
    """The batches (pool order) and class names from the tar at `archive`, in one sequential pass."""
    wanted = {f"{spec.base_folder}/{member}": member for member in spec.members}
    found: dict[str, Any] = {}
    try:
        # a stream: one pass, no seeking back through the gzip; closed by the `with` below
        tar = tarfile.open(archive, mode="r|*")  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{label}: not a gzip/tar archive (expected the official {spec.filename}): {exc}"
        ) from None
    with tar, progress(desc=f"{spec.name}: read", total=len(spec.members), unit="batch") as bar:
        try:
            for info in tar:
                member = wanted.get(_normalize(info.name))
                if member is None or not info.isfile():
                    continue
                stream = tar.extractfile(info)
                raw = stream.read() if stream is not None else b""
                found[member] = _parse(spec, member, raw, where=f"{label}: {spec.base_folder}/{member}")
                bar.update(1)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{label}: corrupt or truncated archive ({exc})") from None
    for member in spec.members:
        if member not in found:
            raise DataError(f"{label}: missing {spec.base_folder}/{member}")
    return [found[m] for m in spec.batches], found[spec.meta]


def _read_directory(spec: CifarSpec, directory: Path) -> tuple[list[Batch], tuple[str, ...]]:
    """The batches and class names from an extracted `base_folder`, or from the folder that contains it."""
    if (directory / spec.base_folder).is_dir():
        directory = directory / spec.base_folder
    elif not any((directory / member).exists() for member in spec.members):
        raise DataError(
            f"{directory}: no {spec.name} files here (expected the extracted {spec.base_folder} folder with "
            f"{', '.join(spec.members)}, or a folder containing it)"
        )
    found: dict[str, Any] = {}
    with progress(desc=f"{spec.name}: read", total=len(spec.members), unit="batch") as bar:
        for member in spec.members:
            file = directory / member
            if not file.is_file():
                raise DataError(f"{directory}: missing {member}")
            try:
                raw = file.read_bytes()
            except OSError as exc:
                raise DataError(f"{file}: unreadable ({exc.strerror or exc})") from None
            found[member] = _parse(spec, member, raw, where=str(file))
            bar.update(1)
    return [found[m] for m in spec.batches], found[spec.meta]


def _normalize(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _parse(spec: CifarSpec, member: str, raw: bytes, *, where: str) -> Any:
    entry = _unpickle_dict(raw, where=where)
    if member == spec.meta:
        return _class_names(entry, spec.classes_key, where=where)
    return _batch(entry, spec.labels_key, where=where)


def _batch(entry: dict[str, Any], labels_key: str, *, where: str) -> Batch:
    for key in ("data", labels_key):
        if key not in entry:
            raise DataError(
                f"{where}: no {key!r} in the batch (found {', '.join(map(repr, entry)) or 'nothing'})"
            )
    data = entry["data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != ROW_SIZE
    ):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: 'data' must be a uint8 array of shape (N, {ROW_SIZE}), found {found}")
    raw_labels = entry[labels_key]
    try:
        labels = np.asarray(raw_labels)
    except (TypeError, ValueError):
        labels = np.asarray([], dtype=object)
    if labels.ndim != 1 or (len(labels) and labels.dtype.kind not in "iu"):
        raise DataError(f"{where}: {labels_key!r} must be a list of integer class indices")
    if len(labels) != len(data):
        raise DataError(f"{where}: {len(labels)} {labels_key!r} for {len(data)} images in 'data'")
    return where, data, labels.astype(np.int64)


def _class_names(entry: dict[str, Any], key: str, *, where: str) -> tuple[str, ...]:
    names = entry.get(key)
    if not isinstance(names, list | tuple) or not names or not all(isinstance(n, bytes | str) for n in names):
        raise DataError(f"{where}: expected a list of class names under {key!r}")
    return tuple(_text(n) for n in names)


def _text(value: bytes | str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


# --- the restricted unpickler ------------------------------------------------------------------------------


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    """The only globals a CIFAR pickle names: numpy's array reconstruction (Python 2 pickles of numpy 1 arrays
    spell it numpy.core.multiarray, pickles written by numpy 2 numpy._core.multiarray), ndarray and dtype."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


ALLOWED_GLOBALS = _numpy_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds plain containers and numpy arrays; refuses every other global before it is imported or called.

    encoding="bytes" as for the Python 2 originals: their str values (keys, names, the arrays' raw data) load as
    bytes, which numpy's array reconstruction takes as is.
    """

    def __init__(self, file: io.BytesIO, *, where: str):
        super().__init__(file, encoding="bytes")
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._where}: refusing to unpickle {module}.{name} (a CIFAR batch holds only dicts, lists, "
                "strings and numpy arrays)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._where}: refusing to unpickle a persistent id")


def restricted_loads(raw: bytes, *, where: str) -> Any:
    """Unpickle `raw` allowing only numpy arrays beyond plain data; DataError naming `where` otherwise."""
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), where=where).load()
    except DataError:
        raise
    except (
        Exception
    ) as exc:  # a corrupt pickle can fail in many ways (UnpicklingError, EOFError, ValueError...)
        raise DataError(f"{where}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from None


def _unpickle_dict(raw: bytes, *, where: str) -> dict[str, Any]:
    entry = restricted_loads(raw, where=where)
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a pickled dict, found {type(entry).__name__}")
    return {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in entry.items()}
