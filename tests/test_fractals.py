"""The `fractals` source: formula-driven IFS classes, fully determined by the seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from resnet.cli import main
from resnet.config import ConfigError, parse_config
from resnet.data.fractals import sample_ifs
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
    cfg = parse_config({"data": {"source": "fractals", "fractals": {"num_classes": 5, "per_class": 10}}})
    assert cfg.data.source_options()["num_classes"] == 5
    assert parse_config({}).data.source_options() == {}
    with pytest.raises(ConfigError, match=r"data\.fractals\.num_classes"):
        parse_config({"data": {"fractals": {"num_classes": 1}}})


def test_prepare_stage_builds_fractals(tmp_path, repo_root):
    out = tmp_path / "prepared"
    argv = ["prepare", "--params", str(repo_root / "params.yaml"), "--out", str(out)]
    overrides = ["data.source=fractals", "data.image_size=16", "data.fractals.num_classes=3"]
    overrides += ["data.fractals.per_class=20", "data.fractals.points=300"]
    assert main(argv + [arg for o in overrides for arg in ("-S", o)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "fractals" and manifest["classes"] == ["ifs000", "ifs001", "ifs002"]
    assert sum(manifest["counts"][s]["total"] for s in ("train", "val", "test")) == 60
