"""Test-set evaluation of a model file: accuracy, loss, per-class accuracy, per-image predictions. torch only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from resnet.data.loading import Normalize, eval_batches, load_prepared
from resnet.engine import evaluate, load_model_file
from resnet.errors import DataError, PipelineError


@dataclass(frozen=True)
class EvalReport:
    metrics: dict
    predictions: list[dict[str, str]]  # {"actual": class name, "predicted": class name} per test image
    data_hash: str


def evaluate_model_file(model_path: str | Path, data_dir: str | Path, batch_size: int = 256) -> EvalReport:
    if not Path(model_path).is_file():
        raise PipelineError(f"{model_path}: no such model file; run the tune stage first")
    model, meta = load_model_file(model_path)
    data = load_prepared(data_dir, splits=("test",))
    if list(meta["classes"]) != list(data.classes):
        raise DataError(f"{data_dir}: classes {data.classes} differ from the model's {meta['classes']}")
    # The model's own normalisation: the statistics of the data it was trained on.
    normalize = Normalize(tuple(meta["mean"]), tuple(meta["std"]))
    k = data.num_classes
    confusion = torch.zeros(k, k, dtype=torch.long)
    stats = evaluate(
        model,
        eval_batches(data.splits["test"], batch_size),
        normalize,
        device=torch.device("cpu"),
        confusion=confusion,
    )
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist()
    metrics = {
        "test_acc": stats.accuracy,
        "test_loss": stats.loss,
        "test_images": stats.count,
        "per_class_acc": {name: round(acc, 6) for name, acc in zip(data.classes, per_class, strict=True)},
    }
    predictions = [
        {"actual": data.classes[true], "predicted": data.classes[pred]}
        for true in range(k)
        for pred in range(k)
        for _ in range(int(confusion[true, pred]))
    ]
    return EvalReport(metrics, predictions, data.content_hash)
