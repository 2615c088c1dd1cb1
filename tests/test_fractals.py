"""The `fractals` source: formula-driven IFS classes, fully determined by the seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from resnet.cli import main
from resnet.config import ConfigError, parse_config
from resnet.data.fractals import sample_ifs
from resnet.data.prepare import read_shard, split_files
from resnet.data.sources import load_source


def test_same_seed_same_bytes_other_seed_other_images():
    first = load_source("fractals", 24, num_classes=3, per_class=5, seed=7, points=400)
    again = load_source("fractals", 24, num_classes=3, per_class=5, seed=7, points=400)
    other = load_source("fractals", 24, num_classes=3, per_class=5, seed=8, points=400)
    assert first.images.tobytes() == again.images.tobytes()
    assert not np.array_equal(first.images, other.images)


def test_shapes_labels_and_every_image_drawn():
    data = load_source("fractals", 32, num_classes=4, per_class=6, points=500)
    assert data.images.shape == (24, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.classes == ("ifs000", "ifs001", "ifs002", "ifs003")
    assert np.bincount(data.labels).tolist() == [6, 6, 6, 6]
    drawn = (data.images.max(axis=3) > 0).reshape(24, -1).sum(axis=1)
    assert (drawn >= 10).all()  # an attractor, not a blank canvas
    assert (drawn < 32 * 32 * 0.8).all()  # and not a filled one


def test_images_of_a_class_vary_and_classes_differ():
    data = load_source("fractals", 32, num_classes=2, per_class=4, points=800)
    masks = (data.images.max(axis=3) > 0).astype(float)
    assert not np.array_equal(masks[0], masks[1])  # jitter, colour and placement differ within a class
    # Two different IFS cover the canvas differently on average.
    assert not np.allclose(masks[:4].mean(0), masks[4:].mean(0))


def test_sampled_maps_are_contractive():
    rng = np.random.default_rng(0)
    for _ in range(20):
        matrices, offsets = sample_ifs(rng)
        assert 2 <= len(matrices) <= 4 and offsets.shape == (len(matrices), 2)
        assert max(np.linalg.svd(m, compute_uv=False)[0] for m in matrices) < 0.85


def test_config_selects_and_validates_the_source():
    datasets = {"digits": {"source": "digits"}, "fractals": {"source": "fractals"}}
    cfg = parse_config(
        {"datasets": datasets | {"fractals": {"source": "fractals", "fractals": {"num_classes": 5}}}}
    )
    assert cfg.dataset("fractals").source_options() == {
        "num_classes": 5,
        "per_class": 40,
        "seed": 0,
        "points": 1500,
        "jitter": 0.1,
    }
    assert parse_config({}).dataset("digits").source_options() == {}
    assert parse_config({}).dataset("fractals").source_options()["num_classes"] == 50
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"datasets": datasets | {"fractals": {"source": "fractals", "fractals": {"num_classes": 1}}}}
        )
    assert str(info.value) == (
        "params.yaml: datasets.fractals.fractals.num_classes: Input should be greater than or equal to 2 (got 1)"
    )


def test_prepare_stage_builds_fractals(tmp_path, repo_root, capsys):
    out, metrics = tmp_path / "prepared", tmp_path / "fractals.json"
    argv = ["prepare", "--params", str(repo_root / "params.yaml"), "--dataset", "fractals"]
    argv += ["--out", str(out), "--metrics", str(metrics)]
    overrides = ["image_size=16", "fractals.num_classes=3", "fractals.per_class=20", "fractals.points=300"]
    overrides += ["shard_size=5"]
    assert main(argv + [arg for o in overrides for arg in ("-S", f"datasets.fractals.{o}")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "fractals" and manifest["classes"] == ["ifs000", "ifs001", "ifs002"]
    assert manifest["image_shape"] == [16, 16, 3]
    # 20 per class, 10% val and test (params.yaml): 2 + 2 + 16 per class
    assert {s: manifest["counts"][s]["total"] for s in ("train", "val", "test")} == {
        "train": 48,
        "val": 6,
        "test": 6,
    }
    assert len(split_files(manifest, "train")) == 10 and len(split_files(manifest, "val")) == 2
    images, labels = read_shard(out / split_files(manifest, "train")[0])
    assert images.shape == (5, 16, 16, 3) and set(labels.tolist()) <= {0, 1, 2}
    assert json.loads(metrics.read_text())["images"] == {"train": 48, "val": 6, "test": 6}
    assert "prepare fractals: fractals at 16px" in capsys.readouterr().out
