"""Training-time batch augmentation in torchvision's classification-reference order. torch + torchvision only.

    pad-and-crop + flip (uint8, batched)  →  TrivialAugmentWide / RandAugment per image (uint8)
    →  float in [0, 1]  →  RandomErasing per image (value 0)  →  MixUp or CutMix on the batch

A torchvision v2 transform called on a batched (N, C, H, W) tensor draws its random parameters once and applies
the same op to every image, so the per-image steps draw parameters per image. They draw them exactly as the v2
transforms do, in the same order, from the same (seeded) RNG, and so give bit-for-bit the output of calling the
public transforms image by image (tests/test_augment.py checks this), only faster: the policy step applies
each sampled (op, magnitude) once to the group of images that drew it, and erasing zeroes the rectangles in
place (benchmarks/augment_speed.py measures both against the plain loop).

Everything random is determined by the `generator` passed in: the v2 transforms draw from torch's global CPU
RNG, so they run inside `torch.random.fork_rng` with that RNG seeded from `generator`, which leaves the
caller's global RNG as it was. With every option off except crop/flip, the output is `random_crop_flip(...)`
as float / 255, with no per-image loop and `generator` advanced exactly as before.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from resnet.data.loading import random_crop_flip

if TYPE_CHECKING:
    from torchvision.transforms import v2

POLICIES = ("none", "trivialaugment", "randaugment")
# The attributes `BatchAugment.from_config` reads (the fields of the config's augment section).
FIELDS = (
    "crop_padding",
    "hflip",
    "policy",
    "randaugment_num_ops",
    "randaugment_magnitude",
    "random_erasing",
    "mixup_alpha",
    "cutmix_alpha",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class BatchAugment:
    """uint8 (N, 3, H, W) images + int64 labels → float32 images in [0, 1] + targets.

    Targets are the int64 labels, or (N, num_classes) float32 soft targets whose rows sum to 1 when mixup or
    cutmix is on (`soft_targets`). The caller normalises the images afterwards (`Normalize` accepts [0, 1]).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        crop_padding: int = 4,
        hflip: bool = False,
        policy: str = "none",
        randaugment_num_ops: int = 2,
        randaugment_magnitude: int = 9,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ):
        if not _is_int(num_classes) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not _is_int(crop_padding) or crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative integer, got {crop_padding!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}; got {policy!r}")
        if not _is_int(randaugment_num_ops) or randaugment_num_ops < 0:
            raise ValueError(
                f"randaugment_num_ops must be a non-negative integer, got {randaugment_num_ops!r}"
            )
        if not _is_int(randaugment_magnitude) or not 0 <= randaugment_magnitude <= 30:
            raise ValueError(
                f"randaugment_magnitude must be an integer in [0, 30] (RandAugment's 31 magnitude bins), "
                f"got {randaugment_magnitude!r}"
            )
        # `not (a <= x <= b)` rather than `x < a or x > b`, so that NaN is refused too.
        if not 0.0 <= random_erasing <= 1.0:
            raise ValueError(f"random_erasing is a probability and must be in [0, 1], got {random_erasing!r}")
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not 0.0 <= alpha < float("inf"):
                raise ValueError(f"{name} must be >= 0 (0 turns it off), got {alpha!r}")

        self.num_classes = num_classes
        self.crop_padding = crop_padding
        self.hflip = bool(hflip)
        self.policy = policy
        self.randaugment_num_ops = randaugment_num_ops
        self.randaugment_magnitude = randaugment_magnitude
        self.random_erasing = float(random_erasing)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)

        self._policy: v2.TrivialAugmentWide | v2.RandAugment | None = None
        self._erasing: v2.RandomErasing | None = None
        self._mix: v2.Transform | None = None
        if policy == "none" and self.random_erasing == 0 and self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            return  # crop and flip only: torchvision is not needed, nor imported (3 s of CPU in every Ray worker)
        from torchvision.transforms import v2

        if policy == "trivialaugment":
            self._policy = v2.TrivialAugmentWide()
        elif policy == "randaugment":
            self._policy = v2.RandAugment(num_ops=randaugment_num_ops, magnitude=randaugment_magnitude)
        self._erasing = v2.RandomErasing(p=self.random_erasing, value=0) if self.random_erasing > 0 else None
        mixers = []
        if self.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=self.mixup_alpha, num_classes=num_classes))
        if self.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=self.cutmix_alpha, num_classes=num_classes))
        self._mix = None if not mixers else mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int) -> BatchAugment:
        """From any object with the attributes in `FIELDS` (the config's augment section)."""
        return cls(num_classes=num_classes, **{name: getattr(cfg, name) for name in FIELDS})

    @property
    def soft_targets(self) -> bool:
        """Whether targets come back as (N, num_classes) probabilities (mixup/cutmix on) or int64 labels."""
        return self._mix is not None

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in ("num_classes", *FIELDS))
        return f"{type(self).__name__}({args})"

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        images = random_crop_flip(images, padding=self.crop_padding, hflip=self.hflip, generator=generator)
        if self._policy is None and self._erasing is None and self._mix is None:
            return images.float().div_(255.0), labels
        # Drawn after the crop/flip, so that turning an option on leaves the crops and flips as they were.
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed CUDA, which fork_rng does not restore.
            torch.default_generator.manual_seed(seed)
            if self._policy is not None:
                images = self._apply_policy(images)
            images = images.float().div_(255.0)
            if self._erasing is not None:
                images = self._erase(images)
            if self._mix is not None:
                images, labels = self._mix(images, labels.long())  # one_hot wants int64
        return images, labels

    def per_image_reference(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same pipeline the straightforward way, each public v2 transform called on one image at a time.
        `__call__` returns bit-identical results faster; tests hold it to this, the benchmark times both."""
        images = random_crop_flip(images, padding=self.crop_padding, hflip=self.hflip, generator=generator)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            if self._policy is not None:
                images = torch.stack([self._policy(image) for image in images])
            images = images.float() / 255
            if self._erasing is not None:
                images = torch.stack([self._erasing(image) for image in images])
            if self._mix is not None:
                images, labels = self._mix(images, labels)
        return images, labels

    def _apply_policy(self, images: torch.Tensor) -> torch.Tensor:
        """TrivialAugmentWide / RandAugment on each image of uint8 `images`, as `policy(image)` image by image.

        The draws below are the v2 transforms' own (`_get_random_item`, magnitude bin, sign), in their order,
        image after image; the ops are torchvision's, applied with the same parameters to every image of a
        group, which for these per-image ops (pixel maps, per-image statistics, affine warps, 3x3 blur) is the
        same as applying them to each image alone.
        """
        policy = self._policy
        assert policy is not None
        n, _, height, width = images.shape
        space = policy._AUGMENTATION_SPACE
        names = tuple(space)
        bins = policy.num_magnitude_bins
        tables = {name: magnitudes(bins, height, width) for name, (magnitudes, _) in space.items()}
        trivial = self.policy == "trivialaugment"
        num_stages = 1 if trivial else policy.num_ops

        stages: list[dict[tuple[str, float], list[int]]] = [defaultdict(list) for _ in range(num_stages)]
        for index in range(n):
            for stage in stages:
                name = names[int(torch.randint(len(names), ()))]
                table, signed = tables[name], space[name][1]
                magnitude = 0.0
                if table is not None:
                    bin_ = int(torch.randint(bins, ())) if trivial else policy.magnitude
                    magnitude = float(table[bin_])
                    if signed and torch.rand(()) <= 0.5:
                        magnitude *= -1
                stage[name, magnitude].append(index)

        out = images.clone()
        for stage in stages:
            for (name, magnitude), members in stage.items():
                if name == "Identity":
                    continue
                idx = torch.tensor(members)
                out[idx] = policy._apply_image_or_video_transform(
                    out[idx], name, magnitude, interpolation=policy.interpolation, fill=policy._fill
                )
        return out

    def _erase(self, images: torch.Tensor) -> torch.Tensor:
        """RandomErasing(p, value=0) on each image of float `images` (a tensor of ours: erased in place)."""
        erasing = self._erasing
        assert erasing is not None
        for index in range(len(images)):
            if torch.rand(1) >= erasing.p:  # the draw `_RandomApplyTransform.forward` makes first
                continue
            params = erasing.make_params([images[index]])
            if params["v"] is not None:  # None: no box fitted in 10 tries, the image is left as it is
                i, j, h, w = params["i"], params["j"], params["h"], params["w"]
                images[index, :, i : i + h, j : j + w] = 0.0
        return images


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy against int64 labels (N,) or soft targets (N, C) on the logits' device.

    For probabilities torch smooths the target as `target * (1 - ls) + ls / C`, which for a one-hot row is
    exactly what it does for the hard label, so the two kinds of target give the same loss.
    """
    if targets.is_floating_point():
        targets = targets.to(logits.dtype)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Labels for accuracy counting: the heaviest class of soft targets, int64 labels as they are."""
    return targets.argmax(1) if targets.ndim == 2 else targets
