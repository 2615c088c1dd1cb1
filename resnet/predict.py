"""Inference: the deployable model takes images as float [0, 1] (N, 3, H, W) and returns class logits. torch only.

Normalisation travels inside the model, so that whoever loads it from the registry needs no side information
beyond "pixels divided by 255".
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from resnet.data.loading import Normalize
from resnet.engine import load_model_file


class Classifier(nn.Module):
    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


def load_classifier(model_path: str | Path) -> tuple[Classifier, dict]:
    """A model file → (Classifier in eval mode, meta with class names)."""
    model, meta = load_model_file(model_path)
    return Classifier(model, tuple(meta["mean"]), tuple(meta["std"])).eval(), meta
