"""Fine-tuning strategies: which layers of a pretrained ResNet train in which epoch, and at what LR. torch only.

The network is split top-down into layer groups: the head (`fc`, depth 0), the stages from the last to the
first (layer4 ... layer1 on ImageNet nets, layer3 ... layer1 on the CIFAR nets; depth 1..n) and the stem
(conv1 + bn1, depth n+1). A `FinetunePlan` gives each group the epoch it starts training and an LR scale:

- full: every group from epoch 0.
- linear_probe: the head only, for the whole run: the backbone is a fixed feature extractor.
- lp_ft (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): the head alone for `lp_epochs`,
  then every group. The head is already fitted when the backbone starts moving, so its early, large,
  random-head gradients do not distort the pretrained features.
- gradual (Howard & Ruder 2018, ULMFiT): the head alone for `lp_epochs`, then one more stage every
  `unfreeze_epochs`, top-down; the stem starts with the first stage.
- `lr_decay` (discriminative / layer-wise LR decay): a group at depth d trains at `lr × lr_decay^d`: the
  generic early features move least.
- `backbone_warmup_epochs`: each backbone group's LR rises linearly from 0 over that many epochs from the epoch
  it starts training; the head starts at full LR.
- `freeze_bn`: every BatchNorm keeps its pretrained running statistics (eval mode) and its scale and shift.
  The BN layers of a group that is not training are always kept so, whatever `freeze_bn` says: in train mode
  they would update their statistics and drift a "frozen" backbone's features.

Every parameter is in the optimiser from the start, in groups by layer group; a group that does not train yet
has `requires_grad=False` (no gradient, so the optimiser leaves it, and its momentum, untouched) and an LR
factor of 0. The engine asks the plan at each epoch which parameters train (`apply`) and which BN layers stay
in eval mode (`frozen_norms`), and multiplies each optimiser group's LR by `lr_factor` at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

NEVER = 1 << 30  # the start epoch of a group that never trains


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """A fresh classifier when the class count differs; the pretrained head is kept when it already fits."""
    if model.fc.out_features != num_classes:
        model.reset_classifier(num_classes)
    return model


def layer_groups(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(name, modules) top-down: head, last stage ... first stage, stem. Covers every parameter once."""
    groups = [("head", [model.fc])]
    groups += [(name, [getattr(model, name)]) for name in reversed(model.stage_names)]
    groups.append(("stem", [model.conv1, model.bn1]))
    covered = [id(p) for _, modules in groups for module in modules for p in module.parameters()]
    if sorted(covered) != sorted(id(p) for p in model.parameters()) or len(set(covered)) != len(covered):
        raise ValueError("the layer groups must hold every parameter of the model exactly once")
    return groups


def start_epochs(strategy: str, depths: list[int], *, lp_epochs: int, unfreeze_epochs: int) -> list[int]:
    """The first epoch (0-based) each group trains in, for groups at `depths` (0 = head; the stem is last)."""
    stages = max(depths) - 1  # the stem's depth is stages + 1
    starts = []
    for depth in depths:
        if depth == 0 or strategy == "full":
            starts.append(0)
        elif strategy == "linear_probe":
            starts.append(NEVER)
        elif strategy == "lp_ft":
            starts.append(lp_epochs)
        elif strategy == "gradual":
            starts.append(lp_epochs + (min(depth, stages) - 1) * unfreeze_epochs)
        else:
            raise ValueError(
                f"unknown fine-tuning strategy {strategy!r}: expected full, linear_probe, lp_ft or gradual"
            )
    return starts


@dataclass(frozen=True)
class LayerGroup:
    name: str
    depth: int
    modules: tuple[nn.Module, ...]
    start_epoch: int  # the first epoch it trains in (NEVER: a linear probe's backbone)
    lr_scale: float  # lr_decay ** depth

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules for p in module.parameters()]

    def norms(self) -> list[nn.Module]:
        return [m for module in self.modules for m in module.modules() if _is_norm(m)]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class FinetunePlan:
    groups: tuple[LayerGroup, ...]
    freeze_bn: bool = False
    backbone_warmup_epochs: int = 0

    @classmethod
    def from_config(cls, model: nn.Module, optim) -> FinetunePlan:
        """The plan a `FinetuneConfig` describes, for `model`."""
        named = layer_groups(model)
        depths = list(range(len(named)))
        starts = start_epochs(
            optim.strategy, depths, lp_epochs=optim.lp_epochs, unfreeze_epochs=optim.unfreeze_epochs
        )
        groups = tuple(
            LayerGroup(name, depth, tuple(modules), start, optim.lr_decay**depth)
            for (name, modules), depth, start in zip(named, depths, starts, strict=True)
        )
        return cls(groups, optim.freeze_bn, optim.backbone_warmup_epochs)

    def trains(self, group: LayerGroup, epoch: int) -> bool:
        return epoch >= group.start_epoch

    def backbone_epochs(self, epochs: int) -> int:
        """Of the first `epochs` epochs, how many trained some backbone group (not the head alone): the
        clock on which a scheduler compares trials whose head-only phases differ in length."""
        first = min((g.start_epoch for g in self.groups if g.depth > 0), default=NEVER)
        return max(0, epochs - first)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser groups: per layer group, its conv/linear weights (decayed) and its BN parameters and
        biases (not decayed), at `lr × lr_scale`. Every parameter, trainable yet or not."""
        out = []
        for group in self.groups:
            params = group.parameters()
            for decayed in (True, False):
                chosen = [p for p in params if (p.ndim > 1) == decayed]
                if chosen:
                    out.append(
                        {
                            "params": chosen,
                            "weight_decay": weight_decay if decayed else 0.0,
                            "lr": lr * group.lr_scale,
                            "name": group.name,
                        }
                    )
        return out

    def lr_factor(self, name: str, steps_per_epoch: int) -> Callable[[int], float]:
        """The LR multiplier of layer group `name` at optimiser step s (on top of the schedule's): 0 before the
        group trains, then its warmup ramp (backbone groups), then 1."""
        group = next(g for g in self.groups if g.name == name)
        start = min(group.start_epoch, NEVER) * steps_per_epoch
        warmup = self.backbone_warmup_epochs * steps_per_epoch if group.depth > 0 else 0

        def factor(step: int) -> float:
            if step < start:
                return 0.0
            return min(1.0, (step - start + 1) / warmup) if warmup else 1.0

        return factor

    def apply(self, model: nn.Module, epoch: int) -> tuple[str, ...]:
        """Set `requires_grad` for `epoch`; returns the names of the groups that train in it. BN parameters
        never train with `freeze_bn`."""
        training = []
        for group in self.groups:
            trains = self.trains(group, epoch)
            for param in group.parameters():
                param.requires_grad_(trains)
            if trains:
                training.append(group.name)
            if self.freeze_bn:
                for norm in group.norms():
                    for param in norm.parameters():
                        param.requires_grad_(False)
        return tuple(training)

    def frozen_norms(self, epoch: int) -> list[nn.Module]:
        """The BN layers to keep in eval mode during `epoch`."""
        return [
            norm
            for group in self.groups
            if self.freeze_bn or not self.trains(group, epoch)
            for norm in group.norms()
        ]
