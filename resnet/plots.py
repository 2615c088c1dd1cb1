"""The evaluation's figures as PNG files (matplotlib, no display needed): confusion matrices, the reliability
diagram, the most confident mistakes, training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and Ray nodes

import matplotlib.pyplot as plt  # noqa: E402  -- after the backend is chosen
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def confusion_png(matrix: np.ndarray, classes: Sequence[str], path: str | Path, *, normalize: bool) -> Path:
    """Rows: actual class, columns: predicted; `normalize` divides each row by its images (recall per class)."""
    values = matrix / matrix.sum(1, keepdims=True).clip(min=1) if normalize else matrix
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(values, display_labels=list(classes)).plot(
        ax=ax, values_format=".2f" if normalize else "d", colorbar=False, include_values=len(classes) <= 20
    )
    ax.set_title("Confusion matrix, normalised by actual class" if normalize else "Confusion matrix (images)")
    return _save(fig, path)


def reliability_png(rows: Sequence[Mapping], ece: float, path: str | Path) -> Path:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(5, 5))
    width = rows[0]["bin_high"] - rows[0]["bin_low"]
    lows = [r["bin_low"] for r in rows]
    ax.bar(lows, [r["accuracy"] for r in rows], width=width, align="edge", edgecolor="k", label="accuracy")
    gaps = [r["confidence"] - r["accuracy"] if r["images"] else 0 for r in rows]
    bottoms = [r["accuracy"] for r in rows]
    ax.bar(lows, gaps, bottom=bottoms, width=width, align="edge", color="r", alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(
        xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"Reliability (ECE {ece:.4f})"
    )
    ax.legend(loc="upper left")
    return _save(fig, path)


def image_grid_png(images: np.ndarray, titles: Sequence[str], path: str | Path, *, columns: int = 4) -> Path:
    """uint8 NCHW images in a grid, one title each (an empty figure says there is nothing to show)."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    if not len(images):
        axes[0, 0].text(0.5, 0.5, "no misclassified test image", ha="center", va="center")
    return _save(fig, path)


def curves_png(histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: str | Path) -> Path:
    """Loss (left) and accuracy (right) per epoch: {run label: {metric: [(epoch, value), ...]}}."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for label, metrics in histories.items():
        for name, points in sorted(metrics.items()):
            if not points:
                continue
            ax = loss_ax if name.endswith("loss") else acc_ax
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", label=f"{label} {name}")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)
