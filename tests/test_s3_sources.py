"""Datasets from S3 through the prepare stage, against the session's real SeaweedFS server: an image folder with
odd and broken files, a CIFAR archive, and each way S3 access fails (one line, exit 2, nothing written)."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from cifar_archive import write_cifar_archive
from PIL import Image

from resnet.cli import main
from resnet.data import s3
from resnet.data.loading import load_prepared
from resnet.errors import DataError

pytestmark = pytest.mark.integration


def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_shapes_tree(root: Path) -> dict[str, str]:
    """Two classes of 12×12 images, several in modes that need converting, plus one broken file of each kind.
    Returns {relative path: expected reject reason} for the broken ones."""
    rng = np.random.default_rng(0)
    for index, cls in enumerate(("circles", "squares")):
        (root / cls / "nested").mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            pixels[..., index] = 255  # the class shows in one channel
            (root / cls / f"rgb{i}.png").write_bytes(_png(Image.fromarray(pixels)))
        rgb = Image.fromarray(np.full((12, 12, 3), 40 + 100 * index, dtype=np.uint8))
        (root / cls / "gray.png").write_bytes(_png(rgb.convert("L")))
        (root / cls / "rgba.png").write_bytes(_png(rgb.convert("RGBA")))
        (root / cls / "palette.gif").write_bytes(_png(rgb.convert("P")))
        (root / cls / "nested" / "cmyk.jpg").write_bytes(_jpeg(rgb.convert("CMYK")))
        sixteen = Image.fromarray(np.full((12, 12), 257 * (40 + 100 * index), dtype=np.uint16))
        (root / cls / "deep16.png").write_bytes(_png(sixteen))
    broken = {
        "circles/empty.png": "zero-byte",
        "circles/notes.jpg": "not an image",
        "squares/cut.jpg": "truncated",
        "squares/tiny.png": "too small",
    }
    (root / "circles/empty.png").write_bytes(b"")
    (root / "circles/notes.jpg").write_text("these are not pixels\n")
    whole = _jpeg(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (root / "squares/cut.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "squares/tiny.png").write_bytes(_png(Image.new("RGB", (4, 4))))
    return broken


def _write_params(work: Path, datasets: dict) -> Path:
    params = work / "params.yaml"
    first = next(iter(datasets))  # the training stages must name a dataset of the file
    params.write_text(
        yaml.safe_dump({"datasets": datasets, "pretrain": {"dataset": first}, "finetune": {"dataset": first}})
    )
    return params


def _prepare(work: Path, params: Path, name: str) -> int:
    return main(
        [
            "prepare",
            "--params",
            str(params),
            "--dataset",
            name,
            "--out",
            str(work / "prepared" / name),
            "--metrics",
            str(work / "metrics" / f"{name}.json"),
        ]
    )


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def test_an_image_folder_in_s3_is_ingested_like_the_same_folder_on_disk(s3_env, tmp_path, prefix):
    tree = tmp_path / "tree"
    broken = write_shapes_tree(tree)
    s3.upload_directory(tree, f"s3://data/{prefix}/shapes")
    common = {"source": "imagefolder", "image_size": 16, "min_size": 8, "max_rejected": 0.25}
    common |= {"split": {"val": 0.15, "test": 0.15}, "shard_size": 8}
    params = _write_params(
        tmp_path,
        {
            "remote": common | {"path": f"s3://data/{prefix}/shapes"},
            "local": common | {"path": str(tree)},
        },
    )
    assert _prepare(tmp_path, params, "remote") == 0
    assert _prepare(tmp_path, params, "local") == 0

    remote = json.loads((tmp_path / "prepared/remote/manifest.json").read_text())
    local = json.loads((tmp_path / "prepared/local/manifest.json").read_text())
    assert remote["classes"] == ["circles", "squares"]
    # 11 usable images per class (6 RGB, gray, RGBA, palette, CMYK, 16-bit); 4 files rejected, for their reasons.
    assert sum(remote["counts"][s]["per_class"]["circles"] for s in ("train", "val", "test")) == 11
    assert remote["scanned"] == 26
    assert {r["file"]: r["reason"] for r in remote["rejected"]} == {
        f"s3://data/{prefix}/shapes/{path}": reason for path, reason in broken.items()
    }
    assert {r["file"]: r["reason"] for r in local["rejected"]} == broken
    # Same bytes in, same prepared bytes out, wherever they were read from.
    assert remote["content_hash"] == local["content_hash"]
    assert remote["files"] == local["files"]
    metrics = json.loads((tmp_path / "metrics/remote.json").read_text())
    assert metrics["rejected"] == 4 and metrics["images"]["train"] + metrics["images"]["val"] == 22 - 4

    data = load_prepared(tmp_path / "prepared/remote")
    images = data.splits["train"].images
    assert images.shape[1:] == (3, 16, 16)
    # The converted files (uniform grey 40 or 140 in every mode) arrive as RGB grey; the class channel is 255
    # in the random ones. Either way every training image of class k is brighter in channel k than chance.
    labels = data.splits["train"].labels
    for k in (0, 1):
        assert images[labels == k][:, k].float().mean() > 100


def test_a_cifar_archive_in_s3_is_downloaded_and_prepared(s3_env, tmp_path, prefix, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    expected = write_cifar_archive(archive, "cifar10", per_class=5, num_classes=10, seed=3)
    s3.upload_file(archive, f"s3://data/{prefix}/cifar-10-python.tar.gz")
    monkeypatch.chdir(tmp_path)  # the download cache (data/downloads) is relative to the project
    params = _write_params(
        tmp_path,
        {
            "cifar": {
                "source": "cifar10",
                "path": f"s3://data/{prefix}/cifar-10-python.tar.gz",
                "shard_size": 50,
            }
        },
    )
    assert _prepare(tmp_path, params, "cifar") == 0
    manifest = json.loads((tmp_path / "prepared/cifar/manifest.json").read_text())
    total = sum(manifest["counts"][s]["total"] for s in ("train", "val", "test"))
    assert total == len(expected.labels) and manifest["rejected"] == []
    assert manifest["classes"] == list(expected.classes)
    assert (tmp_path / "data/downloads/cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()


@pytest.mark.parametrize(
    ("problem", "uri", "message"),
    [
        ("no bucket", "s3://no-such-bucket-here/shapes", "s3://no-such-bucket-here/shapes: no such bucket"),
        ("denied", "s3://dvc/shapes", "s3://dvc/shapes: access denied"),
        (
            "empty prefix",
            "s3://data/{prefix}/nothing",
            "s3://data/{prefix}/nothing: no objects under this prefix",
        ),
    ],
)
def test_s3_failures_are_one_line_exit_2_and_write_nothing(
    s3_server, s3_env, tmp_path, prefix, capsys, problem, uri, message
):
    if problem == "denied":  # the read-only identity may read the `data` bucket only
        for name, value in s3_server.reader_env().items():
            s3_env.setenv(name, value)
        s3.s3_client.cache_clear()
    uri, message = uri.format(prefix=prefix), message.format(prefix=prefix)
    params = _write_params(tmp_path, {"shapes": {"source": "imagefolder", "path": uri}})
    assert _prepare(tmp_path, params, "shapes") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "metrics").exists()


def test_too_many_rejected_files_fail_the_stage_and_keep_the_previous_output(
    s3_env, tmp_path, prefix, capsys
):
    tree = tmp_path / "tree"
    write_shapes_tree(tree)
    s3.upload_directory(tree, f"s3://data/{prefix}/shapes")
    dataset = {"source": "imagefolder", "path": f"s3://data/{prefix}/shapes", "image_size": 16}
    params = _write_params(tmp_path, {"shapes": dataset | {"max_rejected": 0.2}})
    assert _prepare(tmp_path, params, "shapes") == 0
    before = sorted(p.read_bytes() for p in (tmp_path / "prepared/shapes").iterdir())

    params = _write_params(tmp_path, {"shapes": dataset | {"max_rejected": 0.1}})
    assert _prepare(tmp_path, params, "shapes") == 2
    err = capsys.readouterr().err
    assert "4 of 26 files rejected" in err and "more than max_rejected=0.1" in err
    assert sorted(p.read_bytes() for p in (tmp_path / "prepared/shapes").iterdir()) == before
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == ["shapes"]  # no temporary left behind


def test_a_prepared_dataset_in_s3_loads_exactly_like_the_local_copy(s3_env, tmp_path, prefix):
    from resnet.data.prepare import read_manifest, write_prepared
    from resnet.data.sources import load_source

    raw = load_source("fractals", 16, num_classes=3, per_class=20, points=300)
    write_prepared(raw, tmp_path / "fractals", val=0.2, test=0.2, seed=0, source="fractals", shard_size=10)
    uri = f"s3://data/{prefix}/prepared/fractals"
    s3.upload_directory(tmp_path / "fractals", uri)
    assert read_manifest(uri) == read_manifest(tmp_path / "fractals")
    local, remote = load_prepared(tmp_path / "fractals"), load_prepared(uri)
    assert remote.content_hash == local.content_hash and remote.classes == local.classes
    for name in ("train", "val", "test"):
        assert remote.splits[name].images.equal(local.splits[name].images)
        assert remote.splits[name].labels.equal(local.splits[name].labels)
    with pytest.raises(DataError, match=f"{uri}-missing/manifest.json: no such object"):
        read_manifest(f"{uri}-missing")
