"""Scoring a model on a prepared dataset's test split: the evaluate stage's metrics and the register stage's
paired comparison. torch, numpy and scikit-learn only.

The model is scored as it is deployed: the `Classifier` (normalisation inside) on float pixels in [0, 1].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm

from resnet.data.loading import PreparedData, load_prepared
from resnet.errors import DataError, PipelineError

CALIBRATION_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017 (On Calibration of Modern NNs)


@dataclass(frozen=True)
class Scores:
    """A model's class probabilities for every test image, in the split's order."""

    classes: list[str]
    labels: np.ndarray  # int (N,)
    probs: np.ndarray  # float (N, K)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.labels


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def class_probabilities(
    classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """Softmax of `classifier` (in eval mode: a loaded model file, or the graph MLflow's pt2 flavour exported
    in eval mode, which refuses `.eval()`) on uint8 NCHW `images` (divided by 255, as every user does)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].float() / 255
            out.append(torch.softmax(classifier(batch).float(), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def score(classifier: torch.nn.Module, classes: list[str], data: PreparedData, split: str = "test") -> Scores:
    if list(classes) != list(data.classes):
        raise DataError(f"the dataset's classes {data.classes} differ from the model's {list(classes)}")
    part = data.splits[split]
    return Scores(list(classes), part.labels.numpy(), class_probabilities(classifier, part.images))


def load_test_split(data_dir: str | Path, model_meta: dict, model_path: str | Path) -> PreparedData:
    """The test split of `data_dir`, refusing a model trained on other data: a model's recorded data hash must
    be this dataset's, or its test images may include the model's training images (another split)."""
    data = load_prepared(data_dir, splits=("test",))
    recorded = model_meta.get("data_hash")
    if recorded and recorded != data.content_hash:
        raise DataError(
            f"{model_path}: trained on data {recorded[:12]}…, but {data_dir} is {data.content_hash[:12]}…; "
            "score it on the dataset it was trained on (its test split is held out from that data only)"
        )
    return data


def score_model_file(model_path: str | Path, data_dir: str | Path) -> tuple[Scores, dict, PreparedData]:
    from resnet.predict import load_classifier

    if not Path(model_path).is_file():
        raise PipelineError(f"{model_path}: no such model file; run the tune stage first")
    classifier, meta = load_classifier(model_path)
    data = load_test_split(data_dir, meta, model_path)
    return score(classifier, meta["classes"], data), meta, data


def calibration(scores: Scores, bins: int = CALIBRATION_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error and the reliability table: per confidence bin, the images in it, their mean
    confidence and their accuracy. ECE = Σ_bins (n_bin / N) · |accuracy − confidence|."""
    confidence = scores.probs.max(1)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # (lo, hi] bins, 0 in the first
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        row = {
            "bin_low": b / bins,
            "bin_high": (b + 1) / bins,
            "images": count,
            "confidence": 0.0,
            "accuracy": 0.0,
        }
        if count:
            row["confidence"] = float(confidence[inside].mean())
            row["accuracy"] = float(scores.correct[inside].mean())
            ece += count / len(confidence) * abs(row["accuracy"] - row["confidence"])
        rows.append(row)
    return ece, rows


def summary_metrics(scores: Scores) -> dict:
    """Top-1/top-5 accuracy, log loss, ECE, macro and weighted precision/recall/F1, and the per-class report."""
    k = len(scores.classes)
    labels = list(range(k))
    report = skm.classification_report(
        scores.labels,
        scores.predicted,
        labels=labels,
        target_names=scores.classes,
        output_dict=True,
        zero_division=0,
    )
    ece, _ = calibration(scores)
    top5 = (
        skm.top_k_accuracy_score(scores.labels, scores.probs, k=5, labels=labels) if k > 5 else 1.0
    )  # with 5 classes or fewer every image's label is among the top 5
    out = {
        "test_acc": float(skm.accuracy_score(scores.labels, scores.predicted)),
        "test_top5_acc": float(top5),
        "test_loss": float(skm.log_loss(scores.labels, scores.probs, labels=labels)),
        "test_ece": float(ece),
        "test_images": len(scores.labels),
    }
    for average in ("macro", "weighted"):
        for key, name in (("precision", "precision"), ("recall", "recall"), ("f1-score", "f1")):
            out[f"test_{name}_{average}"] = float(report[f"{average} avg"][key])
    out["per_class"] = {
        name: {
            "precision": round(report[name]["precision"], 6),
            "recall": round(report[name]["recall"], 6),
            "f1": round(report[name]["f1-score"], 6),
            "support": int(report[name]["support"]),
        }
        for name in scores.classes
    }
    return out


def classification_report_text(scores: Scores) -> str:
    return skm.classification_report(
        scores.labels,
        scores.predicted,
        labels=list(range(len(scores.classes))),
        target_names=scores.classes,
        digits=4,
        zero_division=0,
    )


def confusion(scores: Scores) -> np.ndarray:
    return skm.confusion_matrix(scores.labels, scores.predicted, labels=list(range(len(scores.classes))))


def worst_errors(scores: Scores, n: int = 16) -> np.ndarray:
    """Indices of the misclassified images the model was most sure of, most confident first."""
    wrong = np.flatnonzero(~scores.correct)
    return wrong[np.argsort(-scores.probs[wrong].max(1), kind="stable")][:n]
