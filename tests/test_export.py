"""ONNX export and int8 quantization (resnet/export.py): ONNX Runtime's logits against PyTorch's at two batch
sizes, the metadata, int8 predictions against fp32, the dynamic fallback, refusals (unreadable model files, a
mismatching export, another dataset), and the `resnet-pipeline export` command.

A resnet20 at 16 px trained for a few dozen steps on a synthetic 3-class dataset (the class is the image's
brightest colour channel), so that its predictions mean something and int8 can be held to them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from resnet import export
from resnet.cli import main as cli_main
from resnet.data.loading import load_prepared
from resnet.data.prepare import write_prepared
from resnet.data.sources import RawDataset
from resnet.engine import save_model_file
from resnet.errors import PipelineError
from resnet.models import build_model
from resnet.predict import Classifier, load_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["red", "green", "blue"]
SIZE = 16


def colour_images(per_class: int, seed: int) -> RawDataset:
    """Noise, with one channel (the class) brighter on average: the fixture's resnet20 learns it in 40 steps."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    images = rng.integers(0, 150, (len(labels), SIZE, SIZE, 3))
    images[np.arange(len(labels)), :, :, labels] += rng.integers(40, 106, (len(labels), SIZE, SIZE))
    return RawDataset(images.astype(np.uint8), labels.astype(np.int64), tuple(CLASSES))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "colours"
    write_prepared(colour_images(40, seed=0), out, val=0.2, test=0.2, seed=0, source="synthetic")
    return out


@pytest.fixture(scope="module")
def model_file(prepared, tmp_path_factory):
    data = load_prepared(prepared, splits=("train",))
    train = data.splits["train"]
    torch.manual_seed(0)
    classifier = Classifier(build_model("resnet20", len(CLASSES)), data.mean, data.std)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.05, momentum=0.9)
    classifier.train()
    for step in range(40):
        idx = torch.randint(0, len(train), (32,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(
            classifier(train.images[idx].float() / 255), train.labels[idx]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    meta = {
        "model_name": "resnet20",
        "num_classes": len(CLASSES),
        "classes": data.classes,
        "image_size": SIZE,
        "mean": list(data.mean),
        "std": list(data.std),
        "data_hash": data.content_hash,
    }
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model_file(path, classifier.model, meta)
    return path


@pytest.fixture(scope="module")
def exported(model_file, tmp_path_factory) -> dict:
    return export.export_onnx(model_file, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def held_out(prepared):
    data = load_prepared(prepared, splits=("val", "test"))
    images = torch.cat([data.splits[s].images for s in ("val", "test")])
    labels = torch.cat([data.splits[s].labels for s in ("val", "test")])
    return images, labels


def test_onnx_logits_equal_pytorchs_at_batch_1_and_5(exported, model_file):
    assert exported["max_abs_diff"] <= exported["tolerance"] == export.ATOL
    exported_path = Path(exported["path"])
    assert exported["bytes"] == exported_path.stat().st_size
    assert exported["opset"] >= 18
    classifier, _ = load_classifier(model_file)
    session = export.ort_session(exported_path)
    (batch_dim, *rest) = session.get_inputs()[0].shape
    assert isinstance(batch_dim, str) and rest == [3, SIZE, SIZE]  # a symbolic batch dimension
    generator = torch.Generator().manual_seed(123)
    for batch in (1, 5):
        images = torch.rand(batch, 3, SIZE, SIZE, generator=generator)
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        with torch.inference_mode():
            expected = classifier(images).numpy()
        assert logits.shape == (batch, len(CLASSES))
        np.testing.assert_allclose(logits, expected, rtol=0, atol=export.ATOL)


def test_the_metadata_carries_the_classes_and_image_size(exported, model_file):
    custom = export.ort_session(exported["path"]).get_modelmeta().custom_metadata_map  # what a user sees
    assert json.loads(custom["classes"]) == CLASSES
    metadata = export.read_metadata(exported["path"])
    assert metadata["classes"] == CLASSES and metadata["image_size"] == SIZE
    assert metadata["model_name"] == "resnet20"
    assert metadata["data_hash"] == torch.load(model_file, weights_only=True)["meta"]["data_hash"]


def test_int8_predictions_agree_with_fp32(exported, prepared, held_out, tmp_path):
    train = load_prepared(prepared, splits=("train",)).splits["train"].images
    out = tmp_path / "model.int8.onnx"
    quantized = export.quantize_int8(exported["path"], out, train)
    assert quantized == {
        "path": str(out),
        "method": "static",
        "calibration_images": 72,
        "bytes": out.stat().st_size,
    }
    assert quantized["bytes"] < 0.5 * exported["bytes"]  # int8 weights, a scale per output channel
    metadata = export.read_metadata(out)
    assert metadata["classes"] == CLASSES and metadata["quantization"] == "int8 static"

    images, labels = held_out
    result = export.compare(exported["path"], out, images, labels, batch_size=8, runs=1)
    assert result["images"] == len(labels) == 48
    assert result["fp32"]["accuracy"] >= 0.9  # the fixture's model learnt its task
    assert result["agreement"] >= 0.9  # measured 1.0; calibrated on black images instead: 0.33
    assert abs(result["accuracy_change"]) <= 0.1
    assert result["size_ratio"] == quantized["bytes"] / exported["bytes"]
    assert result["fp32"]["latency_ms"] > 0 and result["int8"]["latency_ms"] > 0


def test_without_calibration_images_int8_is_dynamic(exported, held_out, tmp_path):
    out = tmp_path / "dynamic.onnx"
    quantized = export.quantize_int8(exported["path"], out, None)
    assert quantized["method"] == "dynamic" and quantized["reason"] == "no calibration images"
    images, labels = held_out
    assert export.compare(exported["path"], out, images, labels, batch_size=4, runs=1)["agreement"] >= 0.9


def test_a_mismatching_export_is_refused_and_not_written(exported, model_file, tmp_path, monkeypatch):
    """An exporter that gets the model wrong (here: the head's bias off by 0.5) is caught before writing."""
    wrong = onnx.load(exported["path"])
    bias = next(t for t in wrong.graph.initializer if t.name == "model.fc.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 0.5, bias.name))
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: SimpleNamespace(model_proto=wrong))
    out = tmp_path / "model.onnx"
    with pytest.raises(PipelineError, match=r"differ from PyTorch's by up to 5\.00e-01 \(tolerance 1e-04\)"):
        export.export_onnx(model_file, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content",
    [None, b"", b"not a model", "truncated", "other keys"],
    ids=["missing", "empty", "garbage", "truncated", "other-keys"],
)
def test_an_unreadable_model_file_is_a_pipeline_error_naming_it(content, model_file, tmp_path):
    path = tmp_path / "model.pt"
    if content == "truncated":
        content = model_file.read_bytes()[:1000]
    if content == "other keys":
        torch.save({"weights": {}}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(PipelineError) as caught:
        export.export_onnx(path, tmp_path / "out.onnx")
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("content", [None, b"", b"garbage"], ids=["missing", "empty", "garbage"])
def test_quantizing_what_is_not_an_onnx_file_is_a_pipeline_error(content, tmp_path):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(
        PipelineError, match=rf"^{re.escape(str(path))}: (no such ONNX file|not an ONNX model)"
    ):
        export.quantize_int8(path, tmp_path / "int8.onnx", None)
    assert not (tmp_path / "int8.onnx").exists()


def test_calibrating_on_another_dataset_is_refused_before_anything_is_written(model_file, tmp_path, capsys):
    other = tmp_path / "other"
    raw = colour_images(10, seed=1)
    write_prepared(
        RawDataset(raw.images, raw.labels, ("a", "b", "c")), other, val=0.2, test=0.2, seed=0, source="s"
    )
    with pytest.raises(PipelineError, match="not its dataset"):
        export.calibration_sample(other, model_file, 16)
    out = tmp_path / "export" / "model.onnx"
    argv = ["export", "--model", str(model_file), "--out", str(out), "--int8", "--data", str(other)]
    assert cli_main(argv) == 2
    assert "not its dataset" in capsys.readouterr().err
    assert not out.parent.exists()


def test_the_command_writes_the_onnx_and_int8_files(model_file, prepared, tmp_path, capsys):
    out = tmp_path / "export" / "model.onnx"
    argv = ["export", "--model", str(model_file), "--out", str(out), "--int8", "--data", str(prepared)]
    assert cli_main(argv) == 0
    int8 = tmp_path / "export" / "model.int8.onnx"
    assert out.is_file() and int8.is_file()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{out}: ") and "max |onnx - torch|" in lines[0]
    assert lines[1].startswith(f"{int8}: ") and "int8 static (calibrated on 72 train images)" in lines[1]


def test_the_command_exits_2_with_one_line_for_a_missing_model(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert cli_main(["export", "--model", str(missing), "--out", str(tmp_path / "m.onnx")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"resnet-pipeline export: error: {missing}: no such model file\n"
