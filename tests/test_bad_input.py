"""The bad-input matrix: every case runs the command a user runs (in this process, through `resnet.cli.main`) and
must end with exit code 2, exactly one line on stderr naming the input and what was expected, no traceback (but
with `--debug`), and nothing written where the command writes its outputs.

Each case is a row of docs/RELIABILITY.md (tests/test_reliability_doc.py checks the table against CASES)."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from test_predict import tiny_model_file

from resnet.cli import main


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, as RELIABILITY.md lists it
    argv: tuple[str, ...]  # the command after `resnet-pipeline`; {dir} is the case's directory
    expect: str  # a fragment of the one line: the input named, and what was expected
    params: dict | None = None  # params.yaml written into {dir} (else none)
    files: dict[str, bytes] = field(default_factory=dict)  # more files in {dir}
    outputs: tuple[str, ...] = ("out",)  # what must not exist afterwards


def _png(size: int = 12) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(classes: dict[str, list[bytes]]) -> dict[str, bytes]:
    return {f"images/{cls}/{i}.png": data for cls, images in classes.items() for i, data in enumerate(images)}


def _only(name: str, dataset: dict) -> dict:
    """Params whose one dataset is `dataset`, which pretraining and fine-tuning both use."""
    return {"datasets": {name: dataset}, "pretrain": {"dataset": name}, "finetune": {"dataset": name}}


def _imagefolder(**extra) -> dict:
    return _only("photos", {"source": "imagefolder", "path": "images", **extra})


def _tar_with(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


PREPARE = ("prepare", "--params", "{dir}/params.yaml", "--out", "{dir}/out", "--metrics", "{dir}/out.json")
GOOD = [_png()] * 3
CASES = [
    # ---- params
    Case("unknown-key", "params: an unknown top-level key", PREPARE, "colour", {"colour": 1}),
    Case(
        "unknown-nested-key",
        "params: an unknown key in a section",
        PREPARE,
        "pretrain.epochz",
        {"pretrain": {"epochz": 3}},
    ),
    Case("wrong-type", "params: a wrong type", PREPARE, "pretrain.epochs", {"pretrain": {"epochs": "two"}}),
    Case(
        "bool-for-int",
        "params: true for a number",
        PREPARE,
        "pretrain.epochs",
        {"pretrain": {"epochs": True}},
    ),
    Case("out-of-range", "params: a value out of range", PREPARE, "pretrain.lr", {"pretrain": {"lr": -1}}),
    Case("unknown-model", "params: an unknown model", PREPARE, "resnet7", {"pretrain": {"model": "resnet7"}}),
    Case(
        "unknown-optimizer",
        "params: an unknown optimizer",
        PREPARE,
        "pretrain.optimizer",
        {"pretrain": {"optimizer": "adam"}},
    ),
    Case(
        "unknown-schedule",
        "params: an unknown LR schedule",
        PREPARE,
        "pretrain.schedule",
        {"pretrain": {"schedule": "linear"}},
    ),
    Case(
        "warmup-too-long",
        "params: warmup as long as training",
        PREPARE,
        "pretrain.warmup_epochs",
        {"pretrain": {"epochs": 2, "warmup_epochs": 2}},
    ),
    Case(
        "contradictory-space",
        "params: a search space with low above high",
        PREPARE,
        "tune.search_space.lr",
        {"tune": {"search_space": {"lr": {"distribution": "loguniform", "low": 0.1, "high": 0.01}}}},
    ),
    Case(
        "space-unknown-key",
        "params: a search space over a key a trial cannot use",
        PREPARE,
        "tune.search_space: unknown key(s) epochz",
        {"tune": {"search_space": {"epochz": {"distribution": "choice", "values": [1, 2]}}}},
    ),
    Case(
        "unknown-placement",
        "params: an unknown Ray placement strategy",
        PREPARE,
        "ray.placement_strategy",
        {"ray": {"placement_strategy": "EVERYWHERE"}},
    ),
    Case(
        "bad-dataset-name",
        "params: a dataset name that is no directory name",
        PREPARE,
        "Bad Name",
        {"datasets": {"Bad Name": {"source": "digits"}}},
    ),
    Case(
        "imagefolder-without-path",
        "params: an image folder dataset without a path",
        PREPARE,
        "datasets.photos.path",
        _only("photos", {"source": "imagefolder"}),
    ),
    Case("params-missing", "params: the file missing", PREPARE, "params.yaml"),
    Case(
        "params-not-yaml",
        "params: a file that is not YAML",
        PREPARE,
        "params.yaml",
        files={"params.yaml": b"pretrain: [epochs: 2\n"},
    ),
    Case(
        "override-unknown-key",
        "params: an override of an unknown key",
        (*PREPARE, "-S", "pretrain.nope=1"),
        "pretrain.nope",
        {},
    ),
    # ---- datasets
    Case(
        "folder-missing",
        "data: the image folder missing",
        PREPARE,
        "images: no such directory",
        _imagefolder(),
    ),
    Case(
        "folder-empty",
        "data: an image folder without class folders",
        PREPARE,
        "no class directories",
        _imagefolder(),
        files={"images/README": b"nothing here"},
    ),
    Case(
        "single-class",
        "data: one class only",
        PREPARE,
        "found 1 class (cats)",
        _imagefolder(),
        files=_folder({"cats": GOOD}),
    ),
    Case(
        "empty-class",
        "data: an empty class folder",
        PREPARE,
        "images/dogs: empty class directory",
        _imagefolder(),
        files=_folder({"cats": GOOD}) | {"images/dogs/.keep": b""},
    ),
    Case(
        "all-corrupt",
        "data: every image corrupt",
        PREPARE,
        "images/cats",
        _imagefolder(),
        files=_folder({"cats": [b"not a png"] * 3, "dogs": [b"\x89PNG broken"] * 3}),
    ),
    Case(
        "too-many-rejected",
        "data: more images too small than max_rejected allows",
        PREPARE,
        "max_rejected",
        _imagefolder(min_size=10),
        files=_folder({"cats": [_png(4)] * 3 + GOOD, "dogs": GOOD}),
    ),
    Case(
        "cifar-archive-missing",
        "data: a CIFAR archive path that does not exist",
        PREPARE,
        "cifar.tar.gz",
        _only("c", {"source": "cifar10", "path": "cifar.tar.gz"}),
    ),
    Case(
        "cifar-archive-wrong",
        "data: a CIFAR archive without the CIFAR batches",
        PREPARE,
        "cifar.tar.gz",
        _only("c", {"source": "cifar10", "path": "cifar.tar.gz"}),
        files={"cifar.tar.gz": _tar_with("readme.txt", b"hello")},
    ),
    Case(
        "cifar-archive-pickle-code",
        "data: a CIFAR batch that pickles code (the restricted unpickler refuses it)",
        PREPARE,
        "data_batch_1",
        _only("c", {"source": "cifar10", "path": "cifar.tar.gz"}),
        files={
            "cifar.tar.gz": _tar_with("cifar-10-batches-py/data_batch_1", b"cos\nsystem\n(S'echo owned'\ntR.")
        },
    ),
    # ---- model files
    Case(
        "model-missing",
        "model: the file missing",
        ("evaluate", "--model", "{dir}/nope.pt", "--data", "{dir}", "--metrics", "{dir}/out"),
        "nope.pt",
        {},
    ),
    Case(
        "model-truncated",
        "model: a truncated file",
        ("evaluate", "--model", "{dir}/model.pt", "--data", "{dir}", "--metrics", "{dir}/out"),
        "model.pt",
        {},
        files={"model.pt": b"PK\x03\x04truncated"},
    ),
    Case(
        "model-not-a-model",
        "model: a file that is not a model",
        ("predict", "{dir}/model.pt", "{dir}", "--out", "{dir}/out"),
        "model.pt",
        None,
        files={"model.pt": b"hello, I am text"},
    ),
    Case(
        "model-tampered",
        "model: a file whose weights were altered after it was written (its saved sha256 no longer matches)",
        ("predict", "{dir}/model.pt", "{dir}", "--out", "{dir}/out"),
        "model.pt: its weights do not match the sha256 saved with them",
        None,
        files={"model.pt": b"@tampered"},
    ),
    Case(
        "predict-no-images",
        "predict: an input with no images",
        ("predict", "{dir}/model.pt", "{dir}/empty", "--out", "{dir}/out"),
        "empty",
        None,
        files={"model.pt": b"@model", "empty/.keep": b""},
    ),
    Case(
        "registered-model-missing",
        "MLflow: a registered model that does not exist",
        (
            "predict",
            "models:/nobody@champion",
            "{dir}",
            "--out",
            "{dir}/out",
            "--params",
            "{dir}/params.yaml",
        ),
        "nobody",
        {"mlflow": {"tracking_uri": "sqlite:///{dir}/mlflow.db"}},
    ),
    Case(
        "export-missing-model",
        "export: the model file missing",
        ("export", "--model", "{dir}/nope.pt", "--out", "{dir}/out"),
        "nope.pt",
        None,
    ),
]


def _format(value, directory: Path):
    if isinstance(value, str):
        return value.replace("{dir}", str(directory))
    if isinstance(value, dict):
        return {k: _format(v, directory) for k, v in value.items()}
    return value


def _write(case: Case, directory: Path) -> None:
    if case.params is not None:
        (directory / "params.yaml").write_text(yaml.safe_dump(_format(case.params, directory)))
    for name, data in case.files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if data == b"@model":
            tiny_model_file(path)
        elif data == b"@tampered":  # one weight changed, the meta (and its digest) kept
            blob = torch.load(tiny_model_file(path), weights_only=True)
            blob["model"]["fc.bias"][0] += 1.0
            torch.save(blob, path)
        else:
            path.write_bytes(data)


def _run(case: Case, directory: Path, capsys, *extra: str) -> tuple[int, str, str]:
    argv = [_format(arg, directory) for arg in case.argv]
    code = main([*argv, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_matrix_has_at_least_30_distinct_cases():
    assert len(CASES) >= 30 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESNET_PROGRESS", "0")  # progress bars share stderr with the error line
    monkeypatch.delenv("RESNET_DEBUG", raising=False)
    _write(case, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, _, err = _run(case, tmp_path, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and case.expect in err, err
    assert err.startswith("resnet-pipeline "), err
    assert not [name for name in case.outputs if (tmp_path / name).exists()]
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "mlflow.db")
    assert after == [p for p in before if p.name != "mlflow.db"]  # nothing written, nothing left half-done


def test_debug_adds_the_traceback_before_the_same_line(tmp_path, capsys, monkeypatch):
    case = next(case for case in CASES if case.id == "single-class")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RESNET_DEBUG", raising=False)
    _write(case, tmp_path)
    _, _, line = _run(case, tmp_path, capsys)
    code, _, err = _run(case, tmp_path, capsys, "--debug")
    assert code == 2 and err.startswith("Traceback (most recent call last):") and err.endswith(line)
    assert "DataError" in err


def test_resnet_debug_in_the_environment_is_debug(tmp_path, capsys, monkeypatch):
    case = next(case for case in CASES if case.id == "unknown-key")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESNET_DEBUG", "1")
    _write(case, tmp_path)
    code, _, err = _run(case, tmp_path, capsys)
    assert code == 2 and err.startswith("Traceback (most recent call last):")
    assert (
        err.splitlines()[-1].startswith("resnet-pipeline prepare: error: ")
        and "colour" in err.splitlines()[-1]
    )
