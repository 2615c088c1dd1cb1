"""Adapting a pretrained ResNet to a new task: head swap and which parameters train. torch only."""

from __future__ import annotations

from torch import nn


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """A fresh classifier when the class count differs; the pretrained head is kept when it already fits."""
    if model.fc.out_features != num_classes:
        model.reset_classifier(num_classes)
    return model


def apply_strategy(model: nn.Module, strategy: str) -> bool:
    """Freeze parameters for `strategy`; returns whether BatchNorm statistics must stay frozen too.

    - `full`: every parameter trains, BN statistics update.
    - `linear_probe`: only the head trains; the backbone, BN running statistics included, is a fixed feature
      extractor (otherwise train-mode BN would still drift the "frozen" features).
    """
    if strategy == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return False
    if strategy == "linear_probe":
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("fc."))
        return True
    raise ValueError(f"unknown fine-tuning strategy {strategy!r}: expected full or linear_probe")
