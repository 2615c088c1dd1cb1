"""CIFAR-10/100 from the official python-pickle archives: exact decoding, layouts, errors, the safe unpickler."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import os
import pickle
import shutil
import sys
import tarfile
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from cifar_archive import py2_pickle, write_cifar_archive  # tests/ is on sys.path (pytest's rootdir import)

from resnet.data.cifar import CIFAR_SPECS, load_cifar, load_cifar10, load_cifar100, restricted_loads
from resnet.data.sources import resize_rgb
from resnet.errors import DataError


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RESNET_PROGRESS", "0")


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def hand_rows(member: str, entry: dict) -> None:
    """Hand-built rows in the official channel-major order, independent of the helper's own conversion:
    image 0 of data_batch_1 has planes R=10, G=20, B=30; image 1 has R=row, G=column, B=7."""
    if member == "data_batch_1":
        entry[b"data"][0] = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)])
        entry[b"data"][1] = np.concatenate([np.arange(1024) // 32, np.arange(1024) % 32, np.full(1024, 7)])


# --- the archive format ----------------------------------------------------------------------------------


def test_specs_match_torchvision():
    from torchvision.datasets import CIFAR10, CIFAR100

    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        spec = CIFAR_SPECS[name]
        assert (spec.url, spec.filename, spec.md5, spec.base_folder) == (
            cls.url,
            cls.filename,
            cls.tgz_md5,
            cls.base_folder,
        )
        assert spec.train == tuple(f for f, _ in cls.train_list)
        assert spec.test == tuple(f for f, _ in cls.test_list)
        assert (spec.meta, spec.classes_key) == (cls.meta["filename"], cls.meta["key"])
    assert (CIFAR_SPECS["cifar10"].labels_key, CIFAR_SPECS["cifar100"].labels_key) == (
        "labels",
        "fine_labels",
    )


def test_the_test_archive_is_python2_pickles_like_the_originals(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_archive(archive, "cifar10", per_class=1)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        raw = tar.extractfile("cifar-10-batches-py/data_batch_1").read()
    assert names[0] == "cifar-10-batches-py"
    assert sorted(names[1:]) == sorted(
        [
            f"cifar-10-batches-py/{m}"
            for m in ("batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6)))
        ]
    )
    assert raw[:2] == b"\x80\x02"  # protocol 2
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"cnumpy\ndtype\n" in raw
    assert b"U\x04data" in raw and b"_codecs" not in raw  # Python 2 str keys (SHORT_BINSTRING), not Py3 bytes
    entry = pickle.loads(raw, encoding="bytes")
    assert set(entry) == {b"batch_label", b"data", b"labels", b"filenames"}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_reads_the_test_archive(tmp_path, monkeypatch, name):
    """torchvision's own dataset class reads the synthetic archive: same layout, keys and pickle format.
    Its integrity check compares each file's md5 with the real dataset's, so that check alone is bypassed."""
    import torchvision.datasets.cifar as tv

    contents = write_cifar_archive(tmp_path / "a.tar.gz", name, per_class=2, num_classes=5, seed=3)
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        tar.extractall(tmp_path / "root", filter="data")
    monkeypatch.setattr(tv, "check_integrity", lambda *args, **kwargs: True)
    cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
    train, test = cls(tmp_path / "root", train=True), cls(tmp_path / "root", train=False)
    n = contents.num_train
    assert np.array_equal(train.data, contents.images[:n]) and np.array_equal(test.data, contents.images[n:])
    assert train.targets == contents.labels[:n].tolist() and test.targets == contents.labels[n:].tolist()
    assert tuple(train.classes) == contents.classes
    ours = load_cifar(name, 32, path=tmp_path / "a.tar.gz")
    assert np.array_equal(ours.images, np.concatenate([train.data, test.data]))
    assert ours.labels.tolist() == train.targets + test.targets


# --- reading -----------------------------------------------------------------------------------------------


def test_cifar10_archive_reads_back_exactly(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    contents = write_cifar_archive(archive, "cifar10", per_class=3, test_per_class=2, seed=1, edit=hand_rows)
    ds = load_cifar10(32, path=str(archive))
    assert ds.images.dtype == np.uint8 and ds.images.shape == (50, 32, 32, 3)
    assert ds.labels.dtype == np.int64
    assert ds.classes == (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )
    # channel-major decoding: planes R, G, B of 1024 values, rows of 32
    assert (ds.images[0] == (10, 20, 30)).all()
    y, x = np.mgrid[0:32, 0:32]
    assert np.array_equal(ds.images[1], np.stack([y, x, np.full_like(y, 7)], axis=-1))
    # everything else exactly as written, train batches then test
    assert np.array_equal(ds.images[2:], contents.images[2:])
    assert np.array_equal(ds.labels, contents.labels)
    assert np.bincount(ds.labels).tolist() == [5] * 10
    assert ds.rejected == ()


def test_pool_is_train_batches_in_order_then_test(tmp_path):
    order = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]

    def mark(member, entry):
        if member in order:  # every image of a batch gets the batch's number as its value
            entry[b"data"][:] = order.index(member) + 1

    archive = tmp_path / "a.tar.gz"
    contents = write_cifar_archive(archive, "cifar10", per_class=2, test_per_class=1, edit=mark)
    ds = load_cifar("cifar10", 32, path=archive)
    per_pixel = ds.images[:, 0, 0, 0].tolist()
    assert per_pixel == sorted(per_pixel) and set(per_pixel) == {1, 2, 3, 4, 5, 6}
    assert per_pixel.count(6) == 10 and contents.num_train == 20  # the test batch's 10 images come last
    # the archive's own member order does not matter: members are read in one pass, then ordered by name
    shuffled = tmp_path / "shuffled.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(shuffled, "w:gz") as dst:
        for info in reversed(src.getmembers()):
            dst.addfile(info, src.extractfile(info) if info.isfile() else None)
    again = load_cifar("cifar10", 32, path=shuffled)
    assert np.array_equal(again.images, ds.images) and np.array_equal(again.labels, ds.labels)


def test_cifar100_uses_fine_labels_and_names(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    contents = write_cifar_archive(archive, "cifar100", per_class=2, num_classes=30, seed=2)
    ds = load_cifar100(32, path=archive)
    assert ds.classes == tuple(f"fine_{i:03d}" for i in range(30))
    assert np.array_equal(ds.images, contents.images) and np.array_equal(ds.labels, contents.labels)
    assert ds.labels.max() == 29  # fine labels (coarse ones stop at 19)
    assert len(ds.images) == 30 * 2 + 30 * 1


def test_extracted_directory_and_its_parent(tmp_path):
    contents = write_cifar_archive(tmp_path / "a.tar.gz", "cifar10", per_class=2, seed=4)
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    for path in (tmp_path / "extracted", tmp_path / "extracted" / "cifar-10-batches-py"):
        ds = load_cifar("cifar10", 32, path=str(path))
        assert np.array_equal(ds.images, contents.images) and np.array_equal(ds.labels, contents.labels)
        assert ds.classes == contents.classes

    (tmp_path / "extracted" / "cifar-10-batches-py" / "data_batch_3").unlink()
    message = error_of(load_cifar, "cifar10", 32, path=tmp_path / "extracted")
    assert message == f"{tmp_path / 'extracted' / 'cifar-10-batches-py'}: missing data_batch_3"
    (tmp_path / "empty").mkdir()
    message = error_of(load_cifar, "cifar10", 32, path=tmp_path / "empty")
    assert (
        message.startswith(f"{tmp_path / 'empty'}: no cifar10 files here")
        and "cifar-10-batches-py" in message
    )


def test_resize_to_16(tmp_path):
    contents = write_cifar_archive(tmp_path / "a.tar.gz", "cifar10", per_class=1, edit=hand_rows)
    ds = load_cifar("cifar10", 16, path=tmp_path / "a.tar.gz")
    assert ds.images.shape == (20, 16, 16, 3)
    assert (ds.images[0] == (10, 20, 30)).all()  # a flat image stays flat
    assert np.array_equal(ds.images[2:], resize_rgb(contents.images[2:], 16))
    assert np.array_equal(ds.labels, contents.labels)


def test_uncompressed_tar_and_dot_slash_names(tmp_path):
    contents = write_cifar_archive(tmp_path / "a.tar.gz", "cifar10", per_class=1)
    plain = tmp_path / "plain.tar"
    with tarfile.open(tmp_path / "a.tar.gz") as src, tarfile.open(plain, "w") as dst:
        for info in src.getmembers():
            data = src.extractfile(info) if info.isfile() else None
            info.name = "./" + info.name
            dst.addfile(info, data)
    ds = load_cifar("cifar10", 32, path=plain)
    assert np.array_equal(ds.images, contents.images)


# --- errors -------------------------------------------------------------------------------------------------


def test_not_an_archive(tmp_path):
    for name, data in (("text.tar.gz", b"hello, not an archive"), ("empty.tar.gz", b"")):
        (tmp_path / name).write_bytes(data)
        message = error_of(load_cifar, "cifar10", 32, path=tmp_path / name)
        assert message.startswith(
            f"{tmp_path / name}: not a gzip/tar archive (expected the official cifar-10"
        )
    (tmp_path / "gz.tar.gz").write_bytes(gzip.compress(b"not a tar " * 200))
    message = error_of(load_cifar, "cifar10", 32, path=tmp_path / "gz.tar.gz")
    assert message.startswith(f"{tmp_path / 'gz.tar.gz'}: not a gzip/tar archive")


def test_truncated_archive(tmp_path):
    write_cifar_archive(tmp_path / "a.tar.gz", "cifar10", per_class=4)
    data = (tmp_path / "a.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    message = error_of(load_cifar, "cifar10", 32, path=tmp_path / "cut.tar.gz")
    assert message.startswith(f"{tmp_path / 'cut.tar.gz'}: corrupt or truncated archive")


def test_missing_member(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_archive(archive, "cifar10", per_class=1, omit=("data_batch_3",))
    assert (
        error_of(load_cifar, "cifar10", 32, path=archive)
        == f"{archive}: missing cifar-10-batches-py/data_batch_3"
    )
    write_cifar_archive(archive, "cifar100", per_class=1, omit=("meta",))
    assert error_of(load_cifar, "cifar100", 32, path=archive) == f"{archive}: missing cifar-100-python/meta"
    # a CIFAR-100 archive given as CIFAR-10
    message = error_of(load_cifar, "cifar10", 32, path=archive)
    assert message == f"{archive}: missing cifar-10-batches-py/data_batch_1"


def edit_batch(member_name, change):
    def edit(member, entry):
        if member == member_name:
            change(entry)

    return edit


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            lambda e: e.update({b"data": e[b"data"][:, :1024]}),
            "'data' must be a uint8 array of shape (N, 3072), found uint8 (2, 1024)",
        ),
        (lambda e: e.update({b"data": e[b"data"].astype(np.int32)}), "found int32 (2, 3072)"),
        (lambda e: e.update({b"data": e[b"data"].reshape(2, 32, 32, 3)}), "found uint8 (2, 32, 32, 3)"),
        (lambda e: e.update({b"data": [1, 2, 3]}), "found list"),
        (lambda e: e.pop(b"data"), "no 'data' in the batch"),
        (lambda e: e.pop(b"labels"), "no 'labels' in the batch"),
        (lambda e: e.update({b"labels": e[b"labels"][:1]}), "1 'labels' for 2 images in 'data'"),
        (
            lambda e: e.update({b"labels": [b"cat", b"dog"]}),
            "'labels' must be a list of integer class indices",
        ),
        (
            lambda e: e.update({b"labels": [0, 10]}),
            "label 10 is outside the 10 class names of batches.meta (expected 0..9)",
        ),
        (lambda e: e.update({b"labels": [-1, 0]}), "label -1 is outside the 10 class names"),
    ],
)
def test_bad_batch(tmp_path, change, expected):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_archive(archive, "cifar10", per_class=1, edit=edit_batch("data_batch_2", change))
    message = error_of(load_cifar, "cifar10", 32, path=archive)
    assert message.startswith(f"{archive}: cifar-10-batches-py/data_batch_2: ")
    assert expected in message


def test_bad_meta_and_bad_pickles(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_archive(
        archive, "cifar10", per_class=1, edit=edit_batch("batches.meta", lambda e: e.pop(b"label_names"))
    )
    message = error_of(load_cifar, "cifar10", 32, path=archive)
    assert (
        message
        == f"{archive}: cifar-10-batches-py/batches.meta: expected a list of class names under 'label_names'"
    )

    write_cifar_archive(archive, "cifar10", per_class=1, raw={"test_batch": b"garbage"})
    message = error_of(load_cifar, "cifar10", 32, path=archive)
    assert message.startswith(f"{archive}: cifar-10-batches-py/test_batch: not a readable CIFAR pickle")

    write_cifar_archive(archive, "cifar10", per_class=1, raw={"test_batch": py2_pickle([1, 2, 3])})
    message = error_of(load_cifar, "cifar10", 32, path=archive)
    assert message == f"{archive}: cifar-10-batches-py/test_batch: expected a pickled dict, found list"


def test_path_that_does_not_exist_and_unknown_name(tmp_path):
    message = error_of(load_cifar, "cifar10", 32, path=tmp_path / "nope.tar.gz")
    assert message.startswith(
        f"{tmp_path / 'nope.tar.gz'}: no such file or directory (expected the cifar-10-python"
    )
    assert "unknown CIFAR dataset 'cifar1000'" in error_of(load_cifar, "cifar1000", 32, path=tmp_path)


# --- the restricted unpickler -----------------------------------------------------------------------------


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refuses_to_unpickle_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": Evil(marker)}, protocol=2)
    assert pickle.loads(evil) and marker.exists()  # the payload is real: plain pickle runs it
    marker.unlink()

    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_archive(archive, "cifar10", per_class=1, raw={"data_batch_1": evil})
    message = error_of(load_cifar, "cifar10", 32, path=archive)
    assert message.startswith(
        f"{archive}: cifar-10-batches-py/data_batch_1: refusing to unpickle {os.system.__module__}.system"
    )
    assert not marker.exists()

    for payload, refused in (
        (pickle.dumps(eval), "builtins.eval"),
        (pickle.dumps(Path("x")), "pathlib.PosixPath"),
        (pickle.dumps(np.zeros(2, np.uint8), protocol=2), "_codecs.encode"),  # Python 3 spells bytes so
        (pickle.dumps(np.float64(1.0), protocol=4), "numpy._core.multiarray.scalar"),
    ):
        assert f"here: refusing to unpickle {refused}" in error_of(restricted_loads, payload, where="here")


def test_restricted_unpickler_allows_numpy_arrays_in_both_spellings():
    array = np.arange(3072 * 2, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    py2 = restricted_loads(py2_pickle({b"data": array, b"labels": [1, 2]}), where="py2")  # numpy.core...
    py3 = restricted_loads(pickle.dumps({"data": array}, protocol=4), where="py3")  # numpy._core...
    assert np.array_equal(py2[b"data"], array) and py2[b"labels"] == [1, 2]
    assert np.array_equal(py3["data"], array)


# --- where the archive comes from ---------------------------------------------------------------------------


@pytest.fixture
def http_dir(tmp_path):
    """A directory served over HTTP on 127.0.0.1 (so that torchvision's real downloader runs unchanged)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_uses_torchvision_with_its_md5_check(tmp_path, monkeypatch, http_dir):
    """The real download path (torchvision's download_url and its md5 check) against a local HTTP server."""
    root, base = http_dir
    served = root / "cifar-10-python.tar.gz"
    contents = write_cifar_archive(served, "cifar10", per_class=1, seed=5)
    md5 = hashlib.md5(served.read_bytes()).hexdigest()
    real = CIFAR_SPECS["cifar10"]
    url = f"{base}/cifar-10-python.tar.gz"
    cache = tmp_path / "cache"

    # the official md5 with other bytes: refused by torchvision's check
    monkeypatch.setitem(CIFAR_SPECS, "cifar10", dataclasses.replace(real, url=url))
    message = error_of(load_cifar, "cifar10", 32, cache_dir=cache)
    assert message.startswith(
        f"{cache / 'cifar-10-python.tar.gz'}: md5 {md5} does not match torchvision's {real.md5}"
    )

    monkeypatch.setitem(CIFAR_SPECS, "cifar10", dataclasses.replace(real, url=url, md5=md5))
    ds = load_cifar("cifar10", 32, cache_dir=cache)
    assert np.array_equal(ds.images, contents.images) and np.array_equal(ds.labels, contents.labels)
    assert (cache / "cifar-10-python.tar.gz").read_bytes() == served.read_bytes()
    served.unlink()  # a cached archive with the right md5 is not downloaded again
    assert np.array_equal(load_cifar("cifar10", 32, cache_dir=cache).labels, contents.labels)

    message = error_of(load_cifar, "cifar10", 32, cache_dir=tmp_path / "other")  # now a 404
    assert message.startswith(
        f"could not download {url} to {tmp_path / 'other' / 'cifar-10-python.tar.gz'}: "
    )


def test_s3_path_downloads_to_the_cache_then_reads_it(tmp_path, monkeypatch):
    """The s3:// branch without a server: resnet.data.s3.download_file is replaced by a local copy."""
    source = tmp_path / "bucket" / "cifar.tar.gz"
    contents = write_cifar_archive(source, "cifar100", per_class=1, num_classes=4)
    calls = []

    def download_file(uri, destination):
        calls.append((uri, Path(destination)))
        shutil.copyfile(source, destination)

    fake = types.ModuleType("resnet.data.s3")
    fake.download_file = download_file
    monkeypatch.setitem(sys.modules, "resnet.data.s3", fake)
    cache = tmp_path / "cache"
    ds = load_cifar("cifar100", 32, path="s3://bucket/some/prefix/cifar.tar.gz", cache_dir=cache)
    assert calls == [("s3://bucket/some/prefix/cifar.tar.gz", cache / "cifar.tar.gz")]
    assert np.array_equal(ds.images, contents.images) and ds.classes == contents.classes

    write_cifar_archive(source, "cifar100", per_class=1, omit=("test",))
    message = error_of(load_cifar, "cifar100", 32, path="s3://bucket/x/cifar.tar.gz", cache_dir=cache)
    assert (
        message
        == f"s3://bucket/x/cifar.tar.gz (downloaded to {cache / 'cifar.tar.gz'}): missing cifar-100-python/test"
    )
    for uri in ("s3://bucket/", "s3://bucket", "s3://bucket/dir/"):
        assert error_of(load_cifar, "cifar100", 32, path=uri, cache_dir=cache).startswith(
            f"{uri}: expected s3://bucket/key"
        )
    assert len(calls) == 2


def test_source_registry_reaches_the_loader(tmp_path):
    from resnet.data.sources import load_source

    contents = write_cifar_archive(tmp_path / "a.tar.gz", "cifar10", per_class=1)
    ds = load_source("cifar10", 32, path=str(tmp_path / "a.tar.gz"))
    assert np.array_equal(ds.images, contents.images)
