"""ResNets written from scratch, following He et al., "Deep Residual Learning for Image Recognition" (2016).

The layout mirrors torchvision's ``models/resnet.py`` on purpose: module names, parameter/buffer names and
shapes of the ImageNet nets are identical to torchvision's, so a torchvision state dict loads with
``strict=True`` and gives the same outputs. The one deliberate deviation from the paper that torchvision also
makes is kept: the Bottleneck puts its stride on the 3x3 conv ("ResNet v1.5"), not on the first 1x1 conv.

The paper's CIFAR-10 nets (section 4.2, depth 6n+2) are here too, with the parameter-free "option A"
shortcut the paper used for them, so their parameter counts match the paper's table.

This module imports only torch and the standard library: it is used by training workers and by the
serving/benchmark code, which must not pull in torchvision, Ray or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "PadShortcut",
    "ResNet",
    "available_models",
    "build_model",
    "conv1x1",
    "conv3x3",
    "count_parameters",
    "flops_per_image",
    "load_torchvision_state_dict",
    "resnet18",
    "resnet18_cifar",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnet101",
    "resnet110",
    "resnet152",
]

Shortcut = Literal["projection", "pad"]
Stem = Literal["imagenet", "cifar"]
_SHORTCUTS = ("projection", "pad")
_STEMS = ("imagenet", "cifar")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1. No bias: every conv is followed by BN, whose shift makes a bias redundant."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (followed by BN)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """The paper's shortcut "option A": identity, subsampled by ``stride``, with zero channels appended.

    It has no parameters, which is why the CIFAR nets of section 4.2 have exactly the parameter counts of the
    paper's table. Subsampling keeps pixels (0, s, 2s, ...), the same positions a stride-s 1x1 conv reads,
    so the output grid lines up with the residual branch's stride-s 3x3 conv (padding 1).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"PadShortcut cannot reduce channels ({in_planes} -> {out_planes})")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_planes - self.in_planes
        if extra:
            # F.pad pads from the last dim backwards: (W_left, W_right, H_top, H_bottom, C_front, C_back).
            x = F.pad(x, (0, 0, 0, 0, 0, extra))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


def _make_shortcut(in_planes: int, out_planes: int, stride: int, shortcut: str) -> nn.Module | None:
    """None (plain identity) when shapes already agree, else a projection or a zero-padding shortcut."""
    if shortcut not in _SHORTCUTS:
        raise ValueError(f"shortcut must be one of {', '.join(_SHORTCUTS)}, got {shortcut!r}")
    if stride == 1 and in_planes == out_planes:
        return None
    if shortcut == "pad":
        return PadShortcut(in_planes, out_planes, stride)
    # Option B: 1x1 conv + BN. Sequential indices 0/1 give torchvision's "downsample.0"/"downsample.1" keys.
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR nets). The first conv carries the stride."""

    expansion: int = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "projection"
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _make_shortcut(in_planes, planes * self.expansion, stride, shortcut)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) block of ResNet-50/101/152.

    The stride sits on the 3x3 conv (conv2) as in torchvision ("ResNet v1.5"); the paper put it on conv1,
    which throws away 3/4 of the input before any spatial filtering. Parameter shapes are the same either way.
    """

    expansion: int = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "projection"
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _make_shortcut(in_planes, planes * self.expansion, stride, shortcut)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


class ResNet(nn.Module):
    """A ResNet: stem, ``len(layers)`` stages of residual blocks, global average pool, dropout, linear head.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks per stage; stage i is named ``layer{i+1}``.
        num_classes: output width of ``fc``.
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool, for ~224 px inputs) or ``"cifar"`` (3x3/1 conv, no
            pooling, for 32 px inputs). The CIFAR stem keeps a ``maxpool`` attribute (an ``nn.Identity``) so
            module names line up with the ImageNet layout.
        widths: base width of each stage (block output is ``width * block.expansion``); ``widths[0]`` is also
            the stem width.
        zero_init_residual: start every block's last BN gamma at 0, so each block begins as the identity
            (Goyal et al. 2017); helps large-batch training.
        dropout: dropout probability before ``fc``. ``nn.Dropout`` has no state, so it never changes the
            state dict keys.
        in_channels: input image channels.
        shortcut: ``"projection"`` (1x1 conv + BN where shapes change, option B; torchvision-compatible) or
            ``"pad"`` (parameter-free option A, used by the paper for CIFAR).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        stem: Stem = "imagenet",
        widths: Sequence[int] = (64, 128, 256, 512),
        zero_init_residual: bool = False,
        dropout: float = 0.0,
        in_channels: int = 3,
        shortcut: Shortcut = "projection",
    ) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        _check_dropout(dropout)
        if stem not in _STEMS:
            raise ValueError(f"stem must be one of {', '.join(_STEMS)}, got {stem!r}")
        if shortcut not in _SHORTCUTS:
            raise ValueError(f"shortcut must be one of {', '.join(_SHORTCUTS)}, got {shortcut!r}")
        if len(layers) == 0 or len(widths) != len(layers):
            raise ValueError(
                f"widths must have one entry per stage: layers={list(layers)}, widths={list(widths)}"
            )

        # Registration order matters: it fixes state_dict key order, which we keep equal to torchvision's.
        stem_width = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(in_channels, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        # A 32x32 CIFAR image cannot afford the 4x stem downsampling, so the pool becomes a no-op there.
        self.maxpool = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        )

        self.stage_names: list[str] = []
        in_planes = stem_width
        for i, (width, n_blocks) in enumerate(zip(widths, layers, strict=True)):
            # The first stage keeps resolution (the stem already downsampled); each later stage halves it
            # and widens, with the stride on the stage's first block.
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_planes, width, stride if j == 0 else 1, shortcut))
                in_planes = width * block.expansion
            name = f"layer{i + 1}"
            setattr(self, name, nn.Sequential(*blocks))
            self.stage_names.append(name)

        self.num_features = in_planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.num_features, num_classes)

        # He et al. 2015 init for ReLU nets; fan_out as in torchvision (and the paper's released models).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Zero gamma on the BN closing each residual branch: the block starts as (relu of) its shortcut.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and stages; returns the last stage's feature map (N, num_features, H', W')."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc`` by a freshly initialised Linear with ``num_classes`` outputs (same device/dtype)."""
        _check_num_classes(num_classes)
        old = self.fc
        self.fc = nn.Linear(self.num_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)


def _resnet(
    block: type[BasicBlock | Bottleneck], layers: Sequence[int], num_classes: int, **kwargs: Any
) -> ResNet:
    return ResNet(block, layers, num_classes, **kwargs)


def resnet18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-18 (ImageNet layout, 11.7M params at 1000 classes)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-34 (ImageNet layout)."""
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-50 (ImageNet layout, Bottleneck v1.5)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, **kwargs)


def resnet101(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-101 (ImageNet layout, Bottleneck v1.5)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes, **kwargs)


def resnet152(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-152 (ImageNet layout, Bottleneck v1.5)."""
    return _resnet(Bottleneck, [3, 8, 36, 3], num_classes, **kwargs)


def resnet18_cifar(num_classes: int = 10, **kwargs: Any) -> ResNet:
    """ResNet-18 stages and widths with the CIFAR stem (3x3/1 conv, 64 ch, no max pool) for 32 px inputs."""
    kwargs.setdefault("stem", "cifar")
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def _cifar_resnet(depth: int, num_classes: int, **kwargs: Any) -> ResNet:
    # Section 4.2: 6n+2 layers = stem conv + 3 stages x n blocks x 2 convs + fc, on 32/16/8 px maps
    # with 16/32/64 filters, and option A (zero-padding) shortcuts.
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    kwargs.setdefault("stem", "cifar")
    kwargs.setdefault("widths", (16, 32, 64))
    kwargs.setdefault("shortcut", "pad")
    return _resnet(BasicBlock, [n, n, n], num_classes, **kwargs)


def resnet20(num_classes: int = 10, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-20 (n=3), 0.27M params in the paper."""
    return _cifar_resnet(20, num_classes, **kwargs)


def resnet32(num_classes: int = 10, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-32 (n=5), 0.46M params in the paper."""
    return _cifar_resnet(32, num_classes, **kwargs)


def resnet44(num_classes: int = 10, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-44 (n=7), 0.66M params in the paper."""
    return _cifar_resnet(44, num_classes, **kwargs)


def resnet56(num_classes: int = 10, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-56 (n=9), 0.85M params in the paper."""
    return _cifar_resnet(56, num_classes, **kwargs)


def resnet110(num_classes: int = 10, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-110 (n=18), 1.7M params in the paper."""
    return _cifar_resnet(110, num_classes, **kwargs)


MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet18_cifar": resnet18_cifar,
}


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def build_model(
    name: str,
    num_classes: int,
    *,
    zero_init_residual: bool = False,
    dropout: float = 0.0,
    in_channels: int = 3,
) -> ResNet:
    """Build a registered model by name; raises ValueError for an unknown name or a bad argument."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(available_models())}")
    _check_num_classes(num_classes)
    _check_dropout(dropout)
    return MODELS[name](
        num_classes, zero_init_residual=zero_init_residual, dropout=dropout, in_channels=in_channels
    )


def load_torchvision_state_dict(
    model: ResNet, state_dict: Mapping[str, Tensor], *, strict_head: bool = True
) -> ResNet:
    """Load a torchvision ResNet state dict into ``model`` and return it.

    Every key must match by name and shape. With ``strict_head=False`` a classifier of another shape
    (fine-tuning to a new class count) is tolerated: ``fc.weight``/``fc.bias`` are skipped and the model
    keeps its freshly initialised head. Any other mismatch raises ValueError naming the offending keys.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    head = ("fc.weight", "fc.bias")
    mismatched = [k for k in own if own[k].shape != state_dict[k].shape]
    to_load = dict(state_dict)
    if not strict_head and any(k in head for k in mismatched):
        mismatched = [k for k in mismatched if k not in head]
        for k in head:
            to_load[k] = own[k]  # our own head, so the strict load below leaves it unchanged
    if mismatched:
        shapes = ", ".join(f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched)
        raise ValueError(f"state dict shapes do not match the model (given vs expected): {shapes}")
    model.load_state_dict(to_load, strict=True)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable (requires_grad) parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def flops_per_image(model: nn.Module, image_size: int) -> int:
    """Forward FLOPs for one ``image_size`` x ``image_size`` image, counting a multiply-accumulate as 2 FLOPs.

    Only convolutions and linear layers are counted (they are >99% of the work); BN, ReLU, pooling, the
    residual additions and biases are ignored. Per layer:

    - Conv2d: ``2 * Cin/groups * kh * kw * Cout * Hout * Wout``
    - Linear: ``2 * in_features * out_features``

    So this is 2x the "multiply-adds" figure the ResNet paper calls FLOPs (e.g. ResNet-50: ~4.1e9 MACs at
    224 px -> ~8.2e9 here). Measured with forward hooks on a batch-1 zero input; the model is run in eval
    mode (so BN running stats are untouched) and its training flag is restored afterwards.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        h_out, w_out = out.shape[-2:]
        total += 2 * (m.in_channels // m.groups) * kh * kw * m.out_channels * h_out * w_out

    def linear_hook(m: nn.Linear, _inp: tuple[Tensor, ...], _out: Tensor) -> None:
        nonlocal total
        total += 2 * m.in_features * m.out_features

    handles = []
    first_conv = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            first_conv = first_conv or m
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    if first_conv is None:
        raise ValueError("model has no Conv2d layer to infer the input channels from")
    param = next(model.parameters())
    x = torch.zeros(1, first_conv.in_channels, image_size, image_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(total)
