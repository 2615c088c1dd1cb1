"""BatchAugment: the crop/flip recipe unchanged by default, per-image policies and erasing equal to torchvision's
public transforms called image by image, mixup/cutmix targets, reproducibility, loss helpers, validation."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from resnet.data.augment import FIELDS, BatchAugment, hard_labels, loss_fn
from resnet.data.loading import random_crop_flip

NUM_CLASSES = 10


def batch(n: int = 32, size: int = 32, seed: int = 0, low: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(low, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return images, torch.arange(n) % NUM_CLASSES


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


FULL = dict(hflip=True, policy="trivialaugment", random_erasing=0.5, mixup_alpha=0.2, cutmix_alpha=1.0)


@pytest.mark.parametrize("hflip", [False, True])
def test_defaults_are_random_crop_flip_over_255_without_the_slow_path(hflip, monkeypatch):
    images, labels = batch()
    expected_gen = gen(3)
    expected = random_crop_flip(images, padding=4, hflip=hflip, generator=expected_gen).float() / 255
    monkeypatch.setattr(torch.random, "fork_rng", lambda *a, **k: pytest.fail("fast path left the fast path"))
    aug = BatchAugment(num_classes=NUM_CLASSES, hflip=hflip)
    assert not aug.soft_targets
    generator = gen(3)
    out, targets = aug(images, labels, generator)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert targets is labels
    # The generator advanced exactly as random_crop_flip alone advances it: the next epoch's crops are unchanged.
    assert torch.equal(generator.get_state(), expected_gen.get_state())


def test_the_training_loop_and_crop_flip_alone_do_not_import_torchvision():
    """torchvision (with the torch._dynamo it pulls in) costs seconds of CPU to import, in every Ray worker and
    Train controller that unpickles the training loop: only the options that use its transforms load it."""
    code = (
        "import sys, resnet.distributed; from resnet.data.augment import BatchAugment; "
        "BatchAugment(num_classes=10); assert 'torchvision' not in sys.modules; "
        "BatchAugment(num_classes=10, random_erasing=0.5); assert 'torchvision' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_crop_no_flip_is_the_image_over_255():
    images, labels = batch()
    out, _ = BatchAugment(num_classes=NUM_CLASSES, crop_padding=0)(images, labels, gen(0))
    assert torch.equal(out, images.float() / 255)


def test_same_generator_state_same_output_different_seed_different_output():
    images, labels = batch()
    aug = BatchAugment(num_classes=NUM_CLASSES, **FULL)
    a_images, a_targets = aug(images, labels, gen(7))
    b_images, b_targets = aug(images, labels, gen(7))
    c_images, _ = aug(images, labels, gen(8))
    assert torch.equal(a_images, b_images) and torch.equal(a_targets, b_targets)
    assert not torch.equal(a_images, c_images)


def test_global_rng_is_neither_used_nor_changed():
    images, labels = batch()
    aug = BatchAugment(num_classes=NUM_CLASSES, **FULL)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first, _ = aug(images, labels, gen(5))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    second, _ = aug(images, labels, gen(5))
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    "options",
    [
        dict(policy="trivialaugment"),
        dict(policy="randaugment"),
        dict(policy="randaugment", randaugment_num_ops=3, randaugment_magnitude=30, hflip=True),
        dict(random_erasing=0.5, hflip=True),
        FULL,
    ],
    ids=["trivialaugment", "randaugment", "randaugment-3-30", "erasing", "full"],
)
def test_bit_identical_to_the_public_transforms_called_image_by_image(options):
    images, labels = batch(n=256)
    aug = BatchAugment(num_classes=NUM_CLASSES, **options)
    applied = {"BatchAugment": set(), "reference": set()}
    if aug._policy is not None:
        apply = aug._policy._apply_image_or_video_transform

        def recording(image, name, *args, **kwargs):
            applied[caller].add(name)
            return apply(image, name, *args, **kwargs)

        aug._policy._apply_image_or_video_transform = recording
    for seed in range(2):
        caller = "BatchAugment"
        got = aug(images, labels, gen(seed))
        caller = "reference"
        want = aug.per_image_reference(images, labels, gen(seed))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if aug._policy is not None:  # every op of the policy's space was exercised (Identity needs no call)
        assert applied["reference"] == set(aug._policy._AUGMENTATION_SPACE)
        assert applied["BatchAugment"] == applied["reference"] - {"Identity"}


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_policies_vary_per_image_and_keep_dtype_shape_and_range(policy):
    one, _ = batch(n=1)
    images, labels = one.expand(64, -1, -1, -1).contiguous(), torch.zeros(64, dtype=torch.long)
    out, targets = BatchAugment(num_classes=NUM_CLASSES, crop_padding=0, policy=policy)(
        images, labels, gen(0)
    )
    assert out.dtype == torch.float32 and out.shape == images.shape and torch.equal(targets, labels)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal((out * 255).round() / 255, out)  # still uint8 levels: the policy ran on uint8
    distinct = torch.unique(out.flatten(1), dim=0)
    assert len(distinct) > 20  # one op for the whole batch would give at most one distinct image
    assert (out != images.float() / 255).flatten(1).any(1).sum() > 32


def test_random_erasing_one_zeroes_one_rectangle_per_image_and_zero_erases_nothing():
    images, labels = batch(n=64, low=1)  # no zero pixels before erasing
    base = images.float() / 255
    out, _ = BatchAugment(num_classes=NUM_CLASSES, crop_padding=0, random_erasing=1.0)(images, labels, gen(0))
    for image, original in zip(out, base, strict=True):
        zero = image == 0
        assert torch.equal(zero, zero[:1].expand_as(zero))  # all channels erased alike
        mask = zero[0]
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert len(rows) and len(cols)
        assert torch.equal(rows, torch.arange(rows[0], rows[-1] + 1))
        assert torch.equal(cols, torch.arange(cols[0], cols[-1] + 1))
        box = torch.zeros_like(mask)
        box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
        assert torch.equal(mask, box)
        assert 0.01 <= mask.float().mean() <= 0.34  # RandomErasing's default scale (0.02, 0.33), rounded
        assert torch.equal(image[:, ~mask], original[:, ~mask])
    kept, _ = BatchAugment(num_classes=NUM_CLASSES, crop_padding=0, random_erasing=0.0)(
        images, labels, gen(0)
    )
    assert torch.equal(kept, base)


def test_random_erasing_leaves_the_crops_and_flips_as_they_were():
    images, labels = batch(n=16, low=1)
    base = random_crop_flip(images, padding=4, hflip=True, generator=gen(4)).float() / 255
    out, _ = BatchAugment(num_classes=NUM_CLASSES, hflip=True, random_erasing=1.0)(images, labels, gen(4))
    assert bool(((out == base) | (out == 0)).all())
    assert bool((out != base).flatten(1).any(1).all())


def two_hot(targets: torch.Tensor, labels: torch.Tensor) -> float:
    """Checks that each row is lam * onehot(label) + (1 - lam) * onehot(previous label); returns lam."""
    assert targets.dtype == torch.float32 and targets.shape == (len(labels), NUM_CLASSES)
    torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)))
    lam = float(targets[0, labels[0]])
    one_hot = F.one_hot(labels, NUM_CLASSES).float()
    torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.roll(1, 0))
    assert ((targets > 0).sum(1) == 2).all()  # exactly two classes (consecutive labels differ)
    return lam


def test_mixup_targets_and_images_are_the_same_convex_mix():
    images, labels = batch(n=8)
    aug = BatchAugment(num_classes=NUM_CLASSES, crop_padding=0, mixup_alpha=1.0)
    assert aug.soft_targets
    lams = set()
    for seed in range(3):
        out, targets = aug(images, labels, gen(seed))
        lam = two_hot(targets, labels)
        assert 0 < lam < 1
        x = images.float() / 255
        torch.testing.assert_close(out, lam * x + (1 - lam) * x.roll(1, 0), rtol=0, atol=1e-6)
        lams.add(round(lam, 6))
    assert len(lams) == 3  # lam is drawn per batch


def cutmix_region(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """The (H, W) mask of pixels taken from the partner image, or None if `out` is not a cutmix of `x`."""
    partner = x.roll(1, 0)
    from_partner = (out == partner).all(1).all(0)
    if not bool(((out == x) | (out == partner)).all()):
        return None
    assert bool(((out == partner) | ~from_partner).all())
    return from_partner


def test_cutmix_pastes_one_box_of_the_partner_and_weights_targets_by_its_area():
    n = 8
    g = gen(0)
    # Image i takes values in [20 i, 20 i + 19]: no pixel of an image equals the same pixel of its partner.
    images = (torch.arange(n).view(n, 1, 1, 1) * 20 + torch.randint(0, 20, (n, 3, 32, 32), generator=g)).to(
        torch.uint8
    )
    labels = torch.arange(n) % NUM_CLASSES
    x = images.float() / 255
    aug = BatchAugment(num_classes=NUM_CLASSES, crop_padding=0, cutmix_alpha=1.0)
    pasted = 0
    for seed in range(4):
        out, targets = aug(images, labels, gen(seed))
        region = cutmix_region(out, x)
        assert region is not None
        lam = two_hot(targets, labels) if region.any() else float(targets[0, labels[0]])
        fraction = float(region.float().mean())
        assert lam == pytest.approx(1 - fraction, abs=1e-6)
        if region.any():
            pasted += 1
            rows, cols = region.any(1).nonzero().flatten(), region.any(0).nonzero().flatten()
            assert int(region.sum()) == len(rows) * len(cols)  # a box
            assert len(rows) == int(rows[-1] - rows[0] + 1) and len(cols) == int(cols[-1] - cols[0] + 1)
    assert pasted >= 3


def test_mixup_and_cutmix_together_pick_one_per_batch():
    images = torch.stack([torch.full((3, 16, 16), 10 * i, dtype=torch.uint8) for i in range(8)])
    images += torch.randint(0, 10, images.shape, generator=gen(0), dtype=torch.uint8)
    labels = torch.arange(8)
    x = images.float() / 255
    aug = BatchAugment(num_classes=NUM_CLASSES, crop_padding=0, mixup_alpha=1.0, cutmix_alpha=1.0)
    kinds = []
    for seed in range(12):
        out, targets = aug(images, labels, gen(seed))
        two_hot(targets, labels)
        kinds.append("cutmix" if cutmix_region(out, x) is not None else "mixup")
    assert set(kinds) == {"mixup", "cutmix"}


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_fn_matches_cross_entropy_for_hard_and_one_hot_targets(label_smoothing):
    logits = torch.randn(16, NUM_CLASSES, generator=gen(0))
    labels = torch.randint(0, NUM_CLASSES, (16,), generator=gen(1))
    hard = loss_fn(logits, labels, label_smoothing)
    assert torch.equal(hard, F.cross_entropy(logits, labels, label_smoothing=label_smoothing))
    one_hot = F.one_hot(labels, NUM_CLASSES).float()
    torch.testing.assert_close(loss_fn(logits, one_hot, label_smoothing), hard)
    # Soft targets are linear: a 0.3/0.7 mix of two labels gives the same mix of their losses.
    other = (labels + 1) % NUM_CLASSES
    mixed = 0.3 * one_hot + 0.7 * F.one_hot(other, NUM_CLASSES).float()
    expected = 0.3 * hard + 0.7 * loss_fn(logits, other, label_smoothing)
    torch.testing.assert_close(loss_fn(logits, mixed, label_smoothing), expected)
    # Targets are cast to the logits' dtype.
    assert loss_fn(logits.double(), one_hot, label_smoothing).dtype == torch.float64


def test_hard_labels():
    labels = torch.tensor([3, 1, 4])
    assert hard_labels(labels) is labels
    soft = 0.6 * F.one_hot(labels, NUM_CLASSES).float() + 0.4 * F.one_hot(labels.roll(1), NUM_CLASSES).float()
    assert torch.equal(hard_labels(soft), labels)


def test_from_config_reads_the_fields_by_name():
    from resnet.config import AugmentConfig

    aug = BatchAugment.from_config(AugmentConfig(), NUM_CLASSES)
    assert repr(aug) == repr(BatchAugment(num_classes=NUM_CLASSES))
    values = dict(
        crop_padding=2,
        hflip=True,
        policy="randaugment",
        randaugment_num_ops=3,
        randaugment_magnitude=12,
        random_erasing=0.25,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
    )
    assert set(values) == set(FIELDS)
    aug = BatchAugment.from_config(SimpleNamespace(**values), 7)
    assert aug.num_classes == 7 and aug.soft_targets
    assert {name: getattr(aug, name) for name in FIELDS} == values
    assert aug._policy.num_ops == 3 and aug._policy.magnitude == 12


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("policy", "autoaugment"),
        ("random_erasing", -0.1),
        ("random_erasing", 1.5),
        ("random_erasing", math.nan),
        ("mixup_alpha", -1.0),
        ("mixup_alpha", math.nan),
        ("cutmix_alpha", -0.5),
        ("cutmix_alpha", math.inf),
        ("crop_padding", -1),
        ("randaugment_num_ops", -1),
        ("randaugment_magnitude", 31),
        ("num_classes", 0),
    ],
)
def test_invalid_options_raise_value_error_naming_the_field(field, value):
    options = {"num_classes": NUM_CLASSES, field: value}
    with pytest.raises(ValueError, match=field) as err:
        BatchAugment(**options)
    if field == "policy":
        assert all(repr(name) in str(err.value) for name in ("none", "trivialaugment", "randaugment"))


def test_refuses_images_that_are_not_uint8_batches():
    images, labels = batch(n=2)
    aug = BatchAugment(num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="uint8"):
        aug(images.float(), labels, gen(0))
    with pytest.raises(ValueError, match="uint8"):
        aug(images[0], labels, gen(0))
