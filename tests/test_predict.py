"""`resnet-pipeline predict` (resnet/predict.py) and the MLflow model of resnet/serving.py loaded in process.

A tiny model (resnet20, 3 classes, 16 px) saved as the training stages save theirs; a folder of PNG/JPEG files
of several sizes plus a corrupt one; a real SQLite MLflow store for models:/ URIs. Every prediction is checked
against the Classifier on the same file decoded by `decode_image` (the prepare stage's decoding).
"""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet.data.images import decode_image
from resnet.engine import save_model_file
from resnet.models import build_model
from resnet.predict import load_classifier, main

pytestmark = pytest.mark.usefixtures("one_thread", "quiet")

CLASSES = ["circle", "square", "triangle"]
SIZE = 16
# name → (width, height, format): non-square ones exercise the resize policy
IMAGES = {
    "a/red.png": (24, 16, "PNG"),
    "a/wide.jpg": (40, 18, "JPEG"),
    "b/square.png": (16, 16, "PNG"),
    "b/deeper/tall.JPG": (12, 30, "JPEG"),
    "gray.png": (20, 20, "L"),
}
CORRUPT = "b/corrupt.png"


@pytest.fixture
def quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_PROGRESS", "0")  # no progress bar in the captured stderr
    monkeypatch.chdir(tmp_path)  # whatever MLflow might create in the working directory stays out of the repo


def tiny_model_file(path: Path, **meta) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet20", len(CLASSES))
    torch.nn.init.normal_(model.fc.weight, std=2.0)  # decisive, different probabilities per image
    base = {
        "model_name": "resnet20",
        "num_classes": len(CLASSES),
        "classes": CLASSES,
        "image_size": SIZE,
        "resize": "center_crop",
        "mean": [0.5, 0.4, 0.3],
        "std": [0.25, 0.25, 0.25],
        "data_hash": "0" * 64,
    }
    save_model_file(path, model, {k: v for k, v in (base | meta).items() if v is not None})
    return path


def image_bytes(width: int, height: int, kind: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "L":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        kind = "PNG"
    else:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pixels[: height // 2] //= 3  # some structure, so that resizing policies differ
        image = Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "photos"
    for seed, (name, (width, height, kind)) in enumerate(IMAGES.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(image_bytes(width, height, kind, seed))
    (root / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    (root / "notes.txt").write_text("not an image extension: not looked at")
    (root / ".hidden.png").write_bytes(b"hidden: not looked at")
    return root


def reference(model_file: Path, files: list[Path], resize: str = "center_crop") -> np.ndarray:
    """The Classifier's probabilities on the files as the prepare stage decodes them."""
    classifier, _ = load_classifier(model_file)
    images = np.stack([decode_image(f.read_bytes(), image_size=SIZE, resize=resize) for f in files])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return torch.softmax(classifier(pixels), dim=1).numpy()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def assert_rows_match(rows, model_file: Path, k: int, resize: str = "center_crop") -> None:
    probs = reference(model_file, [Path(row["file"]) for row in rows], resize)
    for row, expected in zip(rows, probs, strict=True):
        order = np.argsort(-expected, kind="stable")[:k]
        assert [row[f"class_{i + 1}"] for i in range(k)] == [CLASSES[j] for j in order], row["file"]
        got = [float(row[f"prob_{i + 1}"]) for i in range(k)]
        assert got == pytest.approx(expected[order], abs=2e-6), row["file"]
        assert got == sorted(got, reverse=True) and sum(got) <= 1 + 1e-5


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- a model file ----------------------------------------------------------------------------------------------


def test_a_folder_is_predicted_as_prepare_decodes_and_the_corrupt_file_is_skipped(
    model_file, folder, tmp_path, capsys
):
    out = tmp_path / "predictions.csv"
    code, stdout, stderr = run(capsys, model_file, folder, "--out", out, "--top-k", 2, "--batch-size", 2)
    assert code == 0, stderr
    columns, rows = read_csv(out)
    assert columns == ["file", "class_1", "prob_1", "class_2", "prob_2"]
    assert {row["file"] for row in rows} == {str(folder / name) for name in IMAGES}  # recursive, any case
    assert [row["file"] for row in rows] == sorted(row["file"] for row in rows)
    assert_rows_match(rows, model_file, k=2)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and str(folder / CORRUPT) in lines[0] and "truncated" in lines[0], stderr
    assert stdout.strip().splitlines()[-1] == f"predict: 5 images → {out} (1 unreadable, skipped)"


def test_top_k_beyond_the_classes_gives_every_class_summing_to_one(model_file, folder, tmp_path, capsys):
    out = tmp_path / "all.csv"
    code, _, _ = run(capsys, model_file, folder / "a" / "red.png", "--out", out, "--top-k", 10)
    assert code == 0
    columns, rows = read_csv(out)
    assert columns == ["file", *(f"{c}_{i}" for i in (1, 2, 3) for c in ("class", "prob"))]
    assert len(rows) == 1 and sorted(rows[0][f"class_{i}"] for i in (1, 2, 3)) == CLASSES
    assert sum(float(rows[0][f"prob_{i}"]) for i in (1, 2, 3)) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("resize", ["pad", "stretch", None])
def test_the_models_resize_policy_is_used_and_center_crop_without_one(folder, tmp_path, capsys, resize):
    model = tiny_model_file(tmp_path / "model.pt", resize=resize)
    wide = folder / "a" / "wide.jpg"
    out = tmp_path / "p.csv"
    assert run(capsys, model, wide, "--out", out, "--top-k", 3)[0] == 0
    _, rows = read_csv(out)
    assert_rows_match(rows, model, k=3, resize=resize or "center_crop")


def test_a_list_file_names_files_and_folders_and_a_missing_listed_file_is_skipped(
    model_file, folder, tmp_path, capsys
):
    listing = tmp_path / "list.txt"
    missing = tmp_path / "gone.png"
    listing.write_text(f"# inputs\n{folder / 'gray.png'}\n\n{folder / 'a'}\n{missing}\n")
    out = tmp_path / "listed.csv"
    code, stdout, stderr = run(capsys, model_file, f"@{listing}", folder / "gray.png", "--out", out)
    assert code == 0, stderr
    _, rows = read_csv(out)
    assert [row["file"] for row in rows] == [
        str(folder / "gray.png"),  # once, though named twice
        str(folder / "a" / "red.png"),
        str(folder / "a" / "wide.jpg"),
    ]
    assert_rows_match(rows, model_file, k=3)
    assert stderr.strip() == f"resnet-pipeline predict: skipped {missing}: no such file"
    assert "(1 unreadable, skipped)" in stdout


def test_no_readable_image_is_an_error_and_writes_nothing(model_file, folder, tmp_path, capsys):
    out = tmp_path / "none.csv"
    code, stdout, stderr = run(capsys, model_file, folder / CORRUPT, "--out", out)
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert (
        lines[-1].startswith("resnet-pipeline predict: error: none of the 1 input files") and len(lines) == 2
    )
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temporary file left either


@pytest.mark.parametrize(
    ("model", "inputs", "message"),
    [
        ("{tmp}/no-such/model.pt", ["{folder}"], "{tmp}/no-such/model.pt: no such model file"),
        ("{model}", ["{tmp}/nowhere"], "{tmp}/nowhere: no such file or directory"),
        ("{model}", ["@{tmp}/list.txt"], "@{tmp}/list.txt: no such list file"),
        ("{folder}/notes.txt", ["{folder}"], "{folder}/notes.txt: not a model file of this project"),
    ],
)
def test_a_missing_model_or_input_is_one_line_and_exit_2(
    model_file, folder, tmp_path, capsys, model, inputs, message
):
    def fill(text: str) -> str:
        return text.format(tmp=tmp_path, folder=folder, model=model_file)

    out = tmp_path / "p.csv"
    code, stdout, stderr = run(capsys, fill(model), *map(fill, inputs), "--out", out)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith(f"resnet-pipeline predict: error: {fill(message)}")
    assert not out.exists()


def test_an_output_that_cannot_be_written_is_one_line(model_file, folder, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    code, _, stderr = run(capsys, model_file, folder / "gray.png", "--out", tmp_path / "taken")
    assert code == 2 and stderr.startswith(
        f"resnet-pipeline predict: error: {tmp_path / 'taken'}: cannot write"
    )
    assert stderr.count("\n") == 1 and [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_the_cli_lists_and_runs_predict(model_file, folder, tmp_path, capsys):
    from resnet.cli import main as cli_main

    out = tmp_path / "cli.csv"
    assert cli_main(["predict", str(model_file), str(folder / "b"), "--out", str(out)]) == 0
    assert len(read_csv(out)[1]) == 2
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "predict" in capsys.readouterr().out


# --- a registered model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_file) -> dict:
    """A SQLite store with the model registered as tiny-model version 1 (@champion) by resnet.serving."""
    import mlflow
    import mlflow.pytorch
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow.tracking import MlflowClient

    from resnet import serving

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setattr(tracking_utils, "_tracking_uri", None)
        client = MlflowClient(uri)
        experiment = client.create_experiment("predict", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            onnx = root / "model.onnx"
            onnx.write_bytes(b"an ONNX file travels with the version")
            info = serving.log_model(model_file, registered_model_name="tiny-model", extra_files=[onnx])
        with mlflow.start_run(experiment_id=experiment):
            # As resnet/registry.py logged versions before resnet.serving: the pytorch flavour alone, the class
            # names in its metadata, the image size only in its signature.
            classifier, _ = load_classifier(model_file)
            mlflow.pytorch.log_model(
                classifier,
                name="model",
                input_example=np.zeros((2, 3, SIZE, SIZE), dtype=np.float32),
                registered_model_name="old-style",
                metadata={"classes": CLASSES, "input": "float32 RGB in [0, 1], shape (N, 3, H, W)"},
                pip_requirements=["torch"],
            )
        client.set_registered_model_alias("tiny-model", "champion", info.registered_model_version)
    params = root / "params.yaml"
    params.write_text(f"mlflow:\n  tracking_uri: {uri}\n")
    return {"uri": uri, "params": params, "info": info}


@pytest.fixture
def in_store(store, monkeypatch):
    """MLflow's own default pointed at the store (as `mlflow.*.load_model("models:/…")` needs)."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    return store


def test_a_registered_model_predicts_as_its_model_file(store, model_file, folder, tmp_path, capsys):
    assert int(store["info"].registered_model_version) == 1
    for uri in ("models:/tiny-model@champion", "models:/tiny-model/1", f"models:/{store['info'].model_id}"):
        out = tmp_path / "registered.csv"
        code, stdout, stderr = run(capsys, uri, folder, "--out", out, "--params", store["params"])
        assert code == 0, stderr
        assert f"predict: 5 images → {out} (1 unreadable, skipped)" in stdout
        _, rows = read_csv(out)
        assert {row["file"] for row in rows} == {str(folder / name) for name in IMAGES}
        assert_rows_match(rows, model_file, k=3)


def test_a_version_logged_before_resnet_serving_predicts_from_its_signature(
    store, model_file, folder, tmp_path, capsys
):
    out = tmp_path / "old.csv"
    code, _, stderr = run(
        capsys, "models:/old-style/1", folder / "a", "--out", out, "--params", store["params"]
    )
    assert code == 0, stderr
    _, rows = read_csv(out)
    assert len(rows) == 2
    assert_rows_match(rows, model_file, k=3)  # 16 px from the signature, center_crop by default


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "models:/tiny-model@nope",
            "models:/tiny-model@nope: registered model 'tiny-model' has no alias @nope",
        ),
        ("models:/tiny-model/7", "models:/tiny-model/7: registered model 'tiny-model' has no version 7"),
        (
            "models:/no-such-model@champion",
            "models:/no-such-model@champion: no registered model 'no-such-model'",
        ),
        ("models:/tiny-model", "models:/tiny-model: expected models:/NAME@ALIAS or models:/NAME/VERSION"),
        ("runs:/0123/model", "runs:/0123/model: expected models:/NAME@ALIAS or models:/NAME/VERSION"),
        ("models:/m-0123", "models:/m-0123: no logged model 'm-0123'"),
    ],
)
def test_an_unknown_registered_model_alias_or_version_is_one_line(
    store, folder, tmp_path, capsys, uri, message
):
    out = tmp_path / "p.csv"
    code, stdout, stderr = run(capsys, uri, folder, "--out", out, "--params", store["params"])
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith(f"resnet-pipeline predict: error: {message}"), stderr
    assert not out.exists()


def test_no_store_is_an_error_and_creates_none(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run(capsys, "models:/tiny-model@champion", folder, "--out", "p.csv")
    assert code == 2 and "no MLflow store at" in stderr and stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_logged_model_has_both_flavours_a_signature_and_an_example(in_store, model_file):
    import mlflow
    import mlflow.pytorch

    uri = "models:/tiny-model@champion"
    info = mlflow.models.get_model_info(uri)
    assert set(info.flavors) == {"pytorch", "python_function"}
    assert info.flavors["python_function"]["loader_module"] == "resnet.serving"
    assert info.signature is not None and [p.name for p in info.signature.params.params] == ["top_k"]
    assert info.saved_input_example_info["serving_input_path"] == "serving_input_example.json"
    assert info.metadata["classes"] == CLASSES and info.metadata["image_size"] == SIZE
    assert info.metadata["resize"] == "center_crop"
    assert info.flavors["pytorch"]["extra_files"] == [{"path": "extra_files/model.onnx"}]
    onnx = Path(mlflow.artifacts.download_artifacts(f"{uri}/extra_files/model.onnx"))
    assert onnx.read_bytes() == b"an ONNX file travels with the version"
    pixels = torch.rand(3, 3, SIZE, SIZE)
    classifier, _ = load_classifier(model_file)
    with torch.no_grad():
        assert torch.allclose(mlflow.pytorch.load_model(uri)(pixels), classifier(pixels), atol=1e-5)


def test_the_pyfunc_takes_images_and_tensors_and_refuses_malformed_input(in_store, model_file, folder):
    import mlflow
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model("models:/tiny-model@champion")
    files = [folder / "a" / "wide.jpg", folder / "gray.png"]
    expected = reference(model_file, files)
    encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
    for data in ({"image": encoded}, np.array(encoded), [f.read_bytes() for f in files]):
        frame = model.predict(data)
        assert list(frame.columns) == ["class", "probability", "probabilities"]
        for (_, row), probs in zip(frame.iterrows(), expected, strict=True):
            assert row["class"] == CLASSES[int(probs.argmax())]
            assert [row["probabilities"][c] for c in CLASSES] == pytest.approx(probs, abs=1e-5)
            assert list(row["probabilities"].values()) == sorted(row["probabilities"].values(), reverse=True)

    pixels = np.random.default_rng(0).random((2, 3, SIZE, SIZE), dtype=np.float32)
    classifier, _ = load_classifier(model_file)
    with torch.no_grad():
        tensor_expected = torch.softmax(classifier(torch.from_numpy(pixels)), 1).numpy()
    frame = model.predict(pixels, params={"top_k": 1})
    assert [len(p) for p in frame["probabilities"]] == [1, 1]
    assert frame["probability"].to_numpy() == pytest.approx(tensor_expected.max(1), abs=1e-5)

    for bad, words in [
        ({"image": ["%%% not base64 %%%"]}, "image 0 (0-based): not valid base64"),
        ({"image": [encoded[0], base64.b64encode(b"hello").decode()]}, "image 1 (0-based): not an image"),
        (pixels[:, :, :8], f"shape (N, 3, {SIZE}, {SIZE}) for this model; got shape (2, 3, 8, {SIZE})"),
        (pixels * 255, "values in [0, 1]"),
        ({"pixels": [1]}, "got keys ['pixels']"),
    ]:
        with pytest.raises(MlflowException, match=None) as caught:
            model.predict(bad)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE" and words in caught.value.message


# --- S3 --------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_an_s3_prefix_is_predicted(model_file, folder, s3_env, tmp_path, capsys):
    import uuid

    from resnet.data import s3

    prefix = f"predict-{uuid.uuid4().hex[:12]}"
    client = s3.s3_client()
    uploads = {"x/red.png": "a/red.png", "x/y/square.png": "b/square.png", "bad.png": CORRUPT}
    for key, name in uploads.items():
        client.put_object(Bucket="data", Key=f"{prefix}/{key}", Body=(folder / name).read_bytes())
    client.put_object(Bucket="data", Key=f"{prefix}/readme.txt", Body=b"not an image extension")
    out = tmp_path / "s3.csv"
    code, stdout, stderr = run(capsys, model_file, f"s3://data/{prefix}", "--out", out)
    assert code == 0, stderr
    _, rows = read_csv(out)
    assert [row["file"] for row in rows] == [
        f"s3://data/{prefix}/x/red.png",
        f"s3://data/{prefix}/x/y/square.png",
    ]
    probs = reference(model_file, [folder / "a/red.png", folder / "b/square.png"])
    for row, expected in zip(rows, probs, strict=True):
        assert row["class_1"] == CLASSES[int(expected.argmax())]
        assert float(row["prob_1"]) == pytest.approx(expected.max(), abs=2e-6)
    assert f"skipped s3://data/{prefix}/bad.png: truncated" in stderr
    assert "(1 unreadable, skipped)" in stdout
