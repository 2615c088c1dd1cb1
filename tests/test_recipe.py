"""The training recipe, piece by piece: optimiser, LR schedules, gradient accumulation and clipping, mixed
precision, channels_last, torch.compile, EMA, early stopping, seeding, full-state resume, dropout and the
config fields that drive them. Every test asserts on values (LRs, weights, norms), not merely on "it ran".

Kept fast on a busy 2-core CPU: one intra-op thread, 16 px images, resnet20 or smaller models. fp16 on CPU
runs a slow reference convolution backward (~50x fp32 for resnet20), so fp16 runs use `tiny_resnet`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import random
import time

import numpy as np
import pytest
import torch
from test_engine import CPU, NO_AUGMENT, bright_vs_dark, make_stepper, tiny_data
from torch import nn

from resnet.config import ConfigError, FinetuneConfig, PretrainConfig, parse_config
from resnet.data.augment import BatchAugment
from resnet.data.loading import Normalize
from resnet.engine import (
    EarlyStopping,
    ModelEma,
    Stepper,
    TrainState,
    autocast,
    build_optimizer,
    build_scheduler,
    evaluate,
    fit,
    rng_state,
    seed_everything,
    set_determinism,
    set_rng_state,
    train_epoch,
)
from resnet.finetune import FinetunePlan
from resnet.models import BasicBlock, ResNet, build_model

TIMING_KEYS = ("images_per_sec", "epoch_seconds")
# A linear probe: only the head trains and every BN layer keeps its running statistics.
LINEAR_PROBE = FinetuneConfig(epochs=8, lr=1e-9, strategy="linear_probe")


pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(**changes) -> PretrainConfig:
    """A validated recipe: test_engine's OPTIM (resnet20, 3 epochs, batch 16, lr 0.05) plus `changes`."""
    return PretrainConfig(
        **(
            {"model": "resnet20", "epochs": 3, "batch_size": 16, "lr": 0.05, "seed": 0}
            | {"warmup_epochs": 0, "channels_last": False}  # not pretrain's defaults: what these tests assume
            | changes
        )
    )


def tiny_resnet(dropout: float = 0.0) -> ResNet:
    """One 8-wide basic block: BN (with its integer num_batches_tracked), dropout and fc, and ~50x cheaper
    than resnet20 under CPU fp16."""
    return ResNet(BasicBlock, [1], num_classes=2, stem="cifar", widths=(8,), dropout=dropout)


def bn_free() -> nn.Module:
    """No BatchNorm: its batch statistics depend on the micro-batch size, which accumulation must not."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def run_fit(model: nn.Module, optim, *, resume=None, finetune=None, round_trip=False):
    """fit on tiny_data; returns (returned model, per-epoch metrics, per-epoch states). States are deep
    copies (fit hands over live tensors), or with `round_trip` what `torch.save(asdict(state))` +
    `torch.load(weights_only=True)` gives back, as the Ray checkpoint does. `finetune` (a FinetuneConfig):
    fit with the plan it describes for `model`."""
    seen: list[dict] = []
    states: list[TrainState] = []

    def on_epoch_end(metrics, state):
        seen.append(metrics)
        if round_trip:
            buffer = io.BytesIO()
            torch.save(dataclasses.asdict(state), buffer)
            buffer.seek(0)
            states.append(TrainState(**torch.load(buffer, weights_only=True)))
        else:
            states.append(copy.deepcopy(state))

    returned = fit(
        model,
        tiny_data(),
        optim,
        NO_AUGMENT,
        device=CPU,
        resume=resume,
        plan=FinetunePlan.from_config(model, finetune) if finetune is not None else None,
        on_epoch_end=on_epoch_end,
    )
    return returned, seen, states


def without_timings(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [name for name, tensor in a.items() if not torch.equal(tensor, b[name])]
    assert differing == []


# ---------------------------------------------------------------- optimiser


def assert_decay_groups(optimizer: torch.optim.Optimizer, model: nn.Module, weight_decay: float) -> None:
    assert len(optimizer.param_groups) == 2
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == weight_decay and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) == {id(p) for p in model.parameters() if p.ndim >= 2}
    assert ids(no_decay) == {id(p) for p in model.parameters() if p.ndim <= 1}
    assert id(model.conv1.weight) in ids(decay) and id(model.fc.weight) in ids(decay)
    assert {id(model.bn1.weight), id(model.bn1.bias), id(model.fc.bias)} <= ids(no_decay)


def test_sgd_from_config_with_momentum_and_nesterov():
    model = build_model("resnet20", 2)
    optimizer = build_optimizer(model, recipe(momentum=0.8, nesterov=True, weight_decay=1e-3, lr=0.3))
    assert type(optimizer) is torch.optim.SGD
    for group in optimizer.param_groups:
        assert (group["lr"], group["momentum"], group["nesterov"]) == (0.3, 0.8, True)
    assert_decay_groups(optimizer, model, 1e-3)

    plain = build_optimizer(model, recipe(momentum=0.8, nesterov=False))
    assert all(g["nesterov"] is False and g["momentum"] == 0.8 for g in plain.param_groups)
    # torch refuses nesterov without momentum; the recipe quietly means plain SGD then
    no_momentum = build_optimizer(model, recipe(momentum=0.0, nesterov=True))
    assert all(g["nesterov"] is False and g["momentum"] == 0.0 for g in no_momentum.param_groups)


def test_adamw_from_config_with_betas():
    model = build_model("resnet20", 2)
    optimizer = build_optimizer(
        model, recipe(optimizer="adamw", betas=(0.8, 0.95), weight_decay=0.05, lr=1e-3)
    )
    assert type(optimizer) is torch.optim.AdamW
    for group in optimizer.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["lr"] == 1e-3
    # the groups' own weight decay, not AdamW's default 0.01 on everything
    assert_decay_groups(optimizer, model, 0.05)


# ---------------------------------------------------------------- schedules


def stepped_lrs(optimizer: torch.optim.Optimizer, optim, steps_per_epoch: int) -> list[list[float]]:
    """[lrs used by optimiser step 0, step 1, ..., the last step, then after the run], per group."""
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch)
    lrs = [scheduler.get_last_lr()]
    for _ in range(optim.epochs * steps_per_epoch):
        optimizer.step()
        scheduler.step()
        assert [g["lr"] for g in optimizer.param_groups] == scheduler.get_last_lr()
        lrs.append(scheduler.get_last_lr())
    return lrs


def one_param_sgd(lr: float, momentum: float = 0.9) -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr, momentum=momentum)


def test_cosine_with_warmup_rises_linearly_peaks_and_ends_at_zero():
    optim = recipe(epochs=5, warmup_epochs=1, lr=0.4, schedule="cosine")
    lrs = [g[0] for g in stepped_lrs(one_param_sgd(optim.lr), optim, steps_per_epoch=4)]
    assert len(lrs) == 21
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # linear warmup over the first epoch's 4 steps
    assert max(lrs) == pytest.approx(0.4) and lrs[4] == pytest.approx(0.4)
    decay = lrs[4:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert lrs[12] == pytest.approx(0.2)  # half way through the 16 decay steps: cos(pi/2)
    assert lrs[5] == pytest.approx(0.2 * (1 + math.cos(math.pi / 16)))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_multiplies_by_gamma_every_step_epochs_after_warmup():
    optim = recipe(epochs=7, warmup_epochs=1, lr=1.0, schedule="step", lr_step_epochs=2, lr_step_gamma=0.1)
    lrs = [g[0] for g in stepped_lrs(one_param_sgd(optim.lr), optim, steps_per_epoch=3)]
    warmup = [1 / 3, 2 / 3, 1.0]  # the first epoch's 3 steps, the last at the peak
    # then 2 epochs (6 steps) at each level: epochs 2-3, 4-5, 6-7, and the value after the run
    expected = warmup + [1.0] * 6 + [0.1] * 6 + [0.01] * 6 + [0.001]
    assert lrs == pytest.approx(expected)


def test_step_schedule_without_warmup_and_constant_schedules():
    step = recipe(epochs=4, lr=0.2, schedule="step", lr_step_epochs=1, lr_step_gamma=0.5)
    assert [g[0] for g in stepped_lrs(one_param_sgd(0.2), step, 2)] == pytest.approx(
        [0.2, 0.2, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]
    )
    constant = recipe(epochs=3, lr=0.2, schedule="constant")
    assert [g[0] for g in stepped_lrs(one_param_sgd(0.2), constant, 2)] == pytest.approx([0.2] * 7)
    warm = recipe(epochs=3, warmup_epochs=1, lr=0.2, schedule="constant")
    assert [g[0] for g in stepped_lrs(one_param_sgd(0.2), warm, 4)] == pytest.approx(
        [0.05, 0.1, 0.15] + [0.2] * 10
    )


@pytest.mark.parametrize("warmup_epochs, peak_step", [(2, 19), (0, 29)], ids=["warmup", "default-30pct"])
def test_onecycle_starts_at_lr_over_25_peaks_after_the_rise_and_ends_near_lr_over_25e4(
    warmup_epochs, peak_step
):
    optim = recipe(epochs=10, warmup_epochs=warmup_epochs, lr=0.5, schedule="onecycle", momentum=0.85)
    optimizer = one_param_sgd(optim.lr, momentum=0.85)
    lrs = [g[0] for g in stepped_lrs(optimizer, optim, steps_per_epoch=10)]
    assert lrs[0] == pytest.approx(0.5 / 25)
    # the peak: the last step of the warmup epochs (as for the linear warmups), or of the first 30%
    assert max(lrs) == pytest.approx(0.5) and lrs[peak_step] == pytest.approx(0.5)
    assert int(np.argmax(lrs)) in (peak_step - 1, peak_step, peak_step + 1)
    rise, fall = lrs[: peak_step + 1], lrs[peak_step:100]
    assert all(a < b for a, b in zip(rise, rise[1:], strict=False))
    assert all(a > b for a, b in zip(fall, fall[1:], strict=False))
    assert lrs[99] == pytest.approx(0.5 / 25 / 1e4)  # the LR of the last optimiser step
    # After the run (what fit reports as "lr") torch extrapolates the cosine one step past its end: small, but
    # not the final LR (here ~1e-4 against 2e-6).
    assert lrs[99] < lrs[100] < 0.5 / 25 / 10
    # cycle_momentum=False: momentum is what the config says throughout
    assert optimizer.param_groups[0]["momentum"] == 0.85


def test_onecycle_leaves_adamw_betas_alone():
    optim = recipe(epochs=2, lr=0.01, schedule="onecycle", optimizer="adamw", betas=(0.7, 0.9))
    optimizer = build_optimizer(nn.Linear(3, 2), optim)
    stepped_lrs(optimizer, optim, steps_per_epoch=5)
    assert all(g["betas"] == (0.7, 0.9) for g in optimizer.param_groups)


@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle", "constant"])
def test_groups_with_different_lrs_keep_their_ratio(schedule):
    optim = recipe(epochs=6, warmup_epochs=1, lr=0.1, schedule=schedule, lr_step_epochs=2, lr_step_gamma=0.3)
    optimizer = torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(2))], "lr": 0.1}, {"params": [nn.Parameter(torch.zeros(2))]}],
        lr=0.025,  # the second group's (a layer-wise decayed LR): a quarter of the first
        momentum=0.9,
    )
    lrs = stepped_lrs(optimizer, optim, steps_per_epoch=3)
    assert lrs[0][0] > 0
    ratios = [second / first for first, second in lrs[:-1]]  # (onecycle's extrapolated last step aside)
    assert ratios == pytest.approx([0.25] * len(ratios), rel=1e-9)
    assert max(first for first, _ in lrs) == pytest.approx(0.1)


# ---------------------------------------------------------------- gradient accumulation


def run_train_epoch(model: nn.Module, batches, stepper: Stepper):
    return train_epoch(
        model,
        batches,
        stepper,
        Normalize((0.47,) * 3, (0.25,) * 3),
        BatchAugment(num_classes=2, crop_padding=0),
        device=CPU,
        generator=torch.Generator().manual_seed(0),
    )


def chunks(images: torch.Tensor, labels: torch.Tensor, sizes: list[int]):
    start, out = 0, []
    for size in sizes:
        out.append((images[start : start + size], labels[start : start + size]))
        start += size
    return out


ACCUMULATION_RECIPE = recipe(lr=0.2, momentum=0.9, weight_decay=1e-3, schedule="constant")


def test_accumulating_micro_batches_equals_one_big_batch():
    data = bright_vs_dark(32)
    torch.manual_seed(0)
    start = bn_free()
    big, micro, naive = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)

    big_stepper = make_stepper(big, ACCUMULATION_RECIPE, accumulate_steps=1)
    run_train_epoch(big, chunks(data.images, data.labels, [16, 16]), big_stepper)
    micro_stepper = make_stepper(micro, ACCUMULATION_RECIPE, accumulate_steps=2)
    run_train_epoch(micro, chunks(data.images, data.labels, [8, 8, 8, 8]), micro_stepper)
    assert big_stepper.scheduler.last_epoch == micro_stepper.scheduler.last_epoch == 2  # two updates each
    for a, b in zip(big.parameters(), micro.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # control: four updates on micro-batches of 8 is a different trajectory, well beyond the tolerance
    run_train_epoch(
        naive,
        chunks(data.images, data.labels, [8, 8, 8, 8]),
        make_stepper(naive, ACCUMULATION_RECIPE, accumulate_steps=1),
    )
    moved = sum(
        float((a - b).detach().abs().max()) for a, b in zip(big.parameters(), naive.parameters(), strict=True)
    )
    assert moved > 1e-3


@pytest.mark.parametrize(
    "micro_batches, accumulate_steps, same_as", [(3, 2, [16, 8]), (5, 3, [24, 16])], ids=["3-by-2", "5-by-3"]
)
def test_short_last_group_is_rescaled_to_the_mean_of_its_micro_batches(
    micro_batches, accumulate_steps, same_as
):
    data = bright_vs_dark(8 * micro_batches)
    torch.manual_seed(1)
    start = bn_free()
    grouped, big = copy.deepcopy(start), copy.deepcopy(start)
    grouped_stepper = make_stepper(grouped, ACCUMULATION_RECIPE, accumulate_steps)
    run_train_epoch(grouped, chunks(data.images, data.labels, [8] * micro_batches), grouped_stepper)
    run_train_epoch(big, chunks(data.images, data.labels, same_as), make_stepper(big, ACCUMULATION_RECIPE, 1))
    assert grouped_stepper.scheduler.last_epoch == 2
    for a, b in zip(grouped.parameters(), big.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_last_update_of_a_short_group_is_exactly_its_mean_gradient():
    """SGD with lr 1 and no momentum or decay: the update is minus the gradient it used."""
    data = bright_vs_dark(24)
    plain = recipe(lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant")
    torch.manual_seed(2)
    model = bn_free()
    batches = chunks(data.images, data.labels, [8, 8, 8])
    normalize = Normalize((0.47,) * 3, (0.25,) * 3)

    stepper = make_stepper(model, plain, accumulate_steps=2)
    run_train_epoch(model, batches[:2], stepper)  # one full group
    before = [p.detach().clone() for p in model.parameters()]
    reference = copy.deepcopy(model)
    images, labels = batches[2]
    nn.functional.cross_entropy(reference(normalize(images)), labels).backward()
    run_train_epoch(model, batches[2:], stepper)  # the last group: a single micro-batch of 2
    for after, was, ref in zip(model.parameters(), before, reference.parameters(), strict=True):
        torch.testing.assert_close(was - after, ref.grad, rtol=1e-5, atol=1e-7)


def test_fit_with_accumulation_equals_fit_with_the_whole_batch():
    """Through fit: micro-batches of 8 × 2 follow the run with batches of 16 (same shuffled order, same
    number of scheduler steps, so the cosine schedule lines up too)."""
    torch.manual_seed(3)
    start = bn_free()
    one, _, one_seen = run_fit(copy.deepcopy(start), recipe(epochs=2, accumulate_steps=1))
    two, _, two_seen = run_fit(copy.deepcopy(start), recipe(epochs=2, accumulate_steps=2))
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert one_seen[-1].scheduler["last_epoch"] == two_seen[-1].scheduler["last_epoch"] == 8  # 4 per epoch


# ---------------------------------------------------------------- gradient clipping


def reference_grads(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    clone = copy.deepcopy(model)
    nn.functional.cross_entropy(clone(images), labels).backward()
    return [p.grad for p in clone.parameters()]


@pytest.mark.parametrize("clip", [0.05, 1e6], ids=["clipped", "under-the-limit"])
@pytest.mark.parametrize("fp16_scaler", [False, True], ids=["fp32", "fp16-scaled"])
def test_clipping_bounds_the_update_and_records_the_norm_before_clipping(clip, fp16_scaler):
    data = bright_vs_dark(16)
    images = Normalize((0.47,) * 3, (0.25,) * 3)(data.images)
    torch.manual_seed(4)
    model = bn_free()
    grads = reference_grads(model, images, data.labels)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert norm > 0.05  # so that the small limit does clip

    plain = recipe(lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant", grad_clip_norm=clip)
    # a scaled loss (×1024) must be unscaled before clipping: the limit is on the true gradient
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=fp16_scaler)
    stepper = make_stepper(model, plain, accumulate_steps=1, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    stepper.backward(nn.functional.cross_entropy(model(images), data.labels))
    stepper.step(1)

    assert stepper.grad_norms == [pytest.approx(norm, rel=1e-5)]
    deltas = [was - p.detach() for was, p in zip(before, model.parameters(), strict=True)]
    moved = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in deltas])))
    scale = min(1.0, clip / norm)
    assert moved <= min(clip, norm) * (1 + 1e-5)
    assert moved == pytest.approx(min(clip, norm), rel=1e-4)
    for delta, grad in zip(deltas, grads, strict=True):  # the direction is the gradient's
        torch.testing.assert_close(delta, grad * scale, rtol=1e-4, atol=1e-8)


def test_fit_reports_the_mean_grad_norm_only_when_clipping():
    torch.manual_seed(0)
    _, clipped, _ = run_fit(build_model("resnet20", 2), recipe(epochs=1, grad_clip_norm=0.5))
    assert math.isfinite(clipped[0]["grad_norm"]) and clipped[0]["grad_norm"] > 0
    torch.manual_seed(0)
    _, unclipped, _ = run_fit(build_model("resnet20", 2), recipe(epochs=1))
    assert "grad_norm" not in unclipped[0]


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize(
    "precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_autocast_on_cpu_runs_convolutions_in_the_precision(precision, dtype):
    conv = nn.Conv2d(3, 4, 3)
    with autocast(CPU, precision):
        assert torch.is_autocast_enabled("cpu") == (precision != "fp32")
        out = conv(torch.rand(1, 3, 8, 8))
    assert out.dtype == dtype
    assert conv.weight.dtype == torch.float32  # the weights themselves stay fp32


@pytest.mark.parametrize(
    "precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_fit_trains_and_validates_in_the_precision(precision, dtype):
    torch.manual_seed(0)
    model = tiny_resnet()
    seen_dtypes: set[torch.dtype] = set()
    model.conv1.register_forward_hook(lambda module, inputs, output: seen_dtypes.add(output.dtype))
    _, seen, states = run_fit(model, recipe(epochs=1, precision=precision))
    assert seen_dtypes == {dtype}  # training and validation forwards alike
    assert all(math.isfinite(seen[0][key]) for key in ("train_loss", "val_loss"))
    if precision == "fp16":  # the GradScaler was on, and its state is part of the checkpoint
        assert states[0].scaler is not None and states[0].scaler["scale"] > 1
    else:
        assert states[0].scaler is None


# ---------------------------------------------------------------- channels_last


def test_fit_with_channels_last_keeps_the_format_and_learns():
    torch.manual_seed(0)
    model = build_model("resnet20", 2)
    fed_channels_last: list[bool] = []
    model.conv1.register_forward_pre_hook(
        lambda module, inputs: fed_channels_last.append(
            inputs[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    returned, seen, _ = run_fit(model, recipe(channels_last=True))
    convs = [m for m in returned.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not all(c.weight.is_contiguous() for c in convs)  # really NHWC, not merely compatible
    assert fed_channels_last and all(fed_channels_last)  # train and val batches were NHWC too
    assert seen[-1]["val_acc"] >= 0.9


# ---------------------------------------------------------------- torch.compile


def test_fit_with_compile_trains_and_returns_the_plain_module():
    """Inductor on a busy 2-core CPU: ~15 s with a warm inductor cache, ~60 s cold, even for this tiny
    BN-free model (resnet20 or tiny_resnet: ~110 s cold). Kept: pyproject has no `slow` marker."""
    torch.manual_seed(0)
    start = bn_free()
    model = copy.deepcopy(start)
    started = time.perf_counter()
    returned, seen, states = run_fit(model, recipe(epochs=1, compile=True))
    print(f"compile=True, 1 epoch: {time.perf_counter() - started:.1f} s")
    assert returned is model
    assert all(not key.startswith("_orig_mod.") for key in returned.state_dict())
    assert states[0].model.keys() == start.state_dict().keys()  # the checkpoint has plain keys too
    # the compiled run computes what the eager one does (up to kernel fusion's rounding)
    eager, eager_seen, _ = run_fit(copy.deepcopy(start), recipe(epochs=1))
    for key in ("train_loss", "val_loss", "val_acc"):
        assert seen[0][key] == pytest.approx(eager_seen[0][key], rel=1e-4, abs=1e-6), key
    for a, b in zip(returned.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- EMA


def test_ema_decay_ramps_up_as_min_decay_and_1_plus_n_over_10_plus_n():
    model = nn.Linear(1, 1, bias=False)
    ema = ModelEma(model, decay=0.5)
    effective = []
    for _ in range(12):
        with torch.no_grad():  # averaging 0 (EMA) with 1 (live) gives 1 - decay
            ema.module.weight.fill_(0.0)
            model.weight.fill_(1.0)
        ema.update(model)
        effective.append(1.0 - float(ema.module.weight))
    expected = [min(0.5, (1 + n) / (10 + n)) for n in range(1, 13)]
    assert effective == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(2 / 11) and expected[-1] == 0.5 and ema.updates == 12


def test_ema_weights_are_the_exact_lerp_and_integer_buffers_are_copied():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEma(model, decay=0.6)
    assert ema.module is not model and not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(1, 11):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(8, 3))  # moves running_mean/var; num_batches_tracked counts n
        ema.update(model)
        decay = min(0.6, (1 + n) / (10 + n))
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                expected[key] = expected[key] * decay + value * (1 - decay)
            else:
                expected[key] = value.clone()
        for key, value in ema.module.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6, msg=f"{key} after {n}")
    counter = ema.module.state_dict()["1.num_batches_tracked"]
    assert counter.dtype == torch.int64 and int(counter) == 10  # a copy, not an average of 0..10
    assert not torch.equal(ema.module[0].weight, model[0].weight)  # the weights are averaged

    restored = ModelEma(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), decay=0.6)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 10
    assert_same_weights(restored.module.state_dict(), ema.module.state_dict())


def test_fit_with_ema_returns_and_validates_the_average():
    torch.manual_seed(0)
    model = build_model("resnet20", 2)
    returned, seen, states = run_fit(model, recipe(ema_decay=0.9))
    assert returned is not model and isinstance(returned, type(model))
    assert states[-1].ema is not None and states[-1].ema["updates"] == 12  # 4 updates × 3 epochs
    assert_same_weights(returned.state_dict(), states[-1].ema["module"])
    assert_same_weights(model.state_dict(), states[-1].model)  # the input model holds the live weights
    assert not torch.equal(returned.fc.weight, model.fc.weight)
    # val_* is the EMA's, live_val_* the live model's
    data = tiny_data()
    normalize = Normalize(data.mean, data.std)
    averaged = evaluate(returned, data.val_batches(256), normalize, device=CPU)
    live = evaluate(model, data.val_batches(256), normalize, device=CPU)
    assert (seen[-1]["val_acc"], seen[-1]["val_loss"]) == pytest.approx((averaged.accuracy, averaged.loss))
    assert (seen[-1]["live_val_acc"], seen[-1]["live_val_loss"]) == pytest.approx((live.accuracy, live.loss))
    assert all("live_val_acc" in m and "live_val_loss" in m for m in seen)
    assert seen[-1]["live_val_acc"] >= 0.9


def test_fit_without_ema_returns_the_model_and_no_live_metrics():
    torch.manual_seed(0)
    model = tiny_resnet()
    returned, seen, states = run_fit(model, recipe(epochs=1))
    assert returned is model and states[0].ema is None
    assert "live_val_acc" not in seen[0]


# ---------------------------------------------------------------- early stopping


def test_early_stopping_max_mode_with_min_delta_and_patience():
    stopping = EarlyStopping(patience=2, mode="max", min_delta=0.01)
    decisions = [stopping.step(v) for v in (0.5, 0.505, 0.52, 0.52, 0.525)]
    # 0.505 gains less than min_delta; 0.52 improves (resets); 0.52 and 0.525 do not: stop
    assert decisions == [False, False, False, False, True]
    assert stopping.best == 0.52 and stopping.epochs_without_improvement == 2


def test_early_stopping_min_mode_and_its_state_round_trip():
    stopping = EarlyStopping(patience=3, mode="min", min_delta=0.01)
    assert [stopping.step(v) for v in (1.0, 0.95, 0.945, 2.0)] == [False, False, False, False]
    assert stopping.best == 0.95 and stopping.epochs_without_improvement == 2
    resumed = EarlyStopping(patience=3, mode="min", min_delta=0.01)
    resumed.load_state_dict(stopping.state_dict())
    assert resumed.step(0.9) is False and resumed.best == 0.9  # an improvement resets the count
    assert [resumed.step(0.9) for _ in range(3)] == [False, False, True]
    assert stopping.step(0.95) is True  # the original: third epoch without improvement


def test_early_stopping_patience_zero_never_stops():
    stopping = EarlyStopping(patience=0, mode="max")
    assert not any(stopping.step(0.5 - i / 1000) for i in range(100))
    assert stopping.best == 0.5 and stopping.epochs_without_improvement == 99


def test_fit_stops_early_when_the_metric_stops_improving_and_a_stopped_run_resumes_to_nothing():
    """lr 1e-9 on a linear probe (frozen backbone, BN statistics included): the validation accuracy cannot
    change, so the first epoch is the best and the run must stop after patience + 1 = 3 of its 8 epochs."""
    optim = recipe(epochs=8, lr=1e-9, early_stopping_patience=2)
    torch.manual_seed(0)
    model = build_model("resnet20", 2)
    initial = copy.deepcopy(model.state_dict())
    _, seen, states = run_fit(model, optim, finetune=LINEAR_PROBE, round_trip=True)
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    assert len({m["val_acc"] for m in seen}) == 1
    assert [s.stopped for s in states] == [False, False, True]
    assert states[-1].early_stopping == {"best": seen[0]["val_acc"], "epochs_without_improvement": 2}

    fresh = build_model("resnet20", 2)
    returned, after, _ = run_fit(fresh, optim, finetune=LINEAR_PROBE, resume=states[-1])
    assert after == [] and returned is fresh
    assert_same_weights(fresh.state_dict(), model.state_dict())

    # resumed from epoch 2, the restored counter stops it after one more epoch
    resumed = build_model("resnet20", 2)
    _, after, resumed_states = run_fit(resumed, optim, finetune=LINEAR_PROBE, resume=states[1])
    assert [m["epoch"] for m in after] == [3] and resumed_states[-1].stopped
    # the backbone, BN running statistics included, is bit-identical to the start before and after the resume
    # (at lr 1e-9 the head's bias steps may round away; its weight moves)
    for weights in (model.state_dict(), resumed.state_dict()):
        moved = [name for name, tensor in weights.items() if not torch.equal(tensor, initial[name])]
        assert "fc.weight" in moved and set(moved) <= {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("metric, best", [("val_loss", min), ("val_acc", max)])
def test_fit_tracks_the_best_value_of_the_configured_metric_in_its_direction(metric, best):
    torch.manual_seed(0)
    _, seen, states = run_fit(build_model("resnet20", 2), recipe(metric=metric, early_stopping_patience=5))
    values = [m[metric] for m in seen]
    assert len(set(values)) > 1  # the metric moved, so the direction matters
    for epoch, state in enumerate(states, start=1):
        assert state.early_stopping["best"] == best(values[:epoch])


def test_fit_without_patience_runs_every_epoch():
    torch.manual_seed(0)
    _, seen, states = run_fit(build_model("resnet20", 2), recipe(epochs=4, lr=1e-9), finetune=LINEAR_PROBE)
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4] and not any(s.stopped for s in states)


# ---------------------------------------------------------------- seeding and determinism


def disturb_global_generators() -> None:
    random.random()
    np.random.rand(3)
    torch.rand(5)


def test_fit_with_the_same_seed_is_bit_identical_and_another_seed_differs():
    """Dropout draws from the global generators: fit seeds them, whatever state they were left in."""
    results = []
    for seed, disturb in ((0, False), (0, True), (1, False)):
        torch.manual_seed(0)
        model = build_model("resnet20", 2, dropout=0.5)
        if disturb:
            disturb_global_generators()
        results.append(run_fit(model, recipe(epochs=2, seed=seed, dropout=0.5))[0].state_dict())
    assert_same_weights(results[0], results[1])
    assert not torch.equal(results[0]["fc.weight"], results[2]["fc.weight"])


def draw() -> tuple:
    return random.random(), tuple(np.random.standard_normal(3)), tuple(np.random.rand(2)), torch.rand(4)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    seed_everything(123)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's legacy state: it must survive too
    assert np.random.get_state()[3] == 1
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = draw()
    assert draw() != expected  # the generators moved on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = draw()
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(7)
    first = draw()
    disturb_global_generators()
    seed_everything(7)
    again = draw()
    assert again[:3] == first[:3] and torch.equal(again[3], first[3])
    seed_everything(8)
    assert draw()[0] != first[0]


def test_set_determinism_switches_the_global_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    try:
        set_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        set_determinism(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:]


# ---------------------------------------------------------------- accumulation under DDP


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group: enough for DDP to all-reduce (with itself) through its comm hooks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def count_all_reduces(compiled: bool) -> list[int]:
    """Buckets all-reduced while train_epoch runs 4 micro-batches with accumulate_steps=2 (2 updates)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    data = bright_vs_dark(32)
    torch.manual_seed(0)
    model = bn_free()
    ddp = nn.parallel.DistributedDataParallel(model)
    reduced: list[int] = []

    def hook(state, bucket):
        state.append(bucket.index())
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(reduced, hook)
    net = torch.compile(ddp, backend="eager") if compiled else ddp  # fit: torch.compile(DDP(model))
    stepper = make_stepper(model, ACCUMULATION_RECIPE, accumulate_steps=2)
    run_train_epoch(net, chunks(data.images, data.labels, [8, 8, 8, 8]), stepper)
    assert stepper.scheduler.last_epoch == 2
    return reduced


def test_ddp_all_reduces_only_on_the_micro_batch_that_completes_an_update(gloo_group):
    assert count_all_reduces(compiled=False) == [0, 0]  # one bucket (a tiny model), once per update


def test_compiled_ddp_all_reduces_only_on_the_micro_batch_that_completes_an_update(gloo_group):
    # torch.compile wraps the DDP module; train_epoch must still find it to skip the sync
    assert count_all_reduces(compiled=True) == [0, 0]


# ---------------------------------------------------------------- full-state resume


def test_resume_with_the_whole_recipe_through_a_weights_only_round_trip_is_bit_identical():
    """Dropout (global RNG), EMA (average and update count), clipping, accumulation with fp16 (the
    GradScaler's scale and growth tracker), momentum and the schedule: 3 epochs in one go equal 1 epoch,
    a checkpoint written and read back as the Ray checkpoint is, and 2 more epochs in a fresh model."""
    optim = recipe(
        epochs=3, dropout=0.2, ema_decay=0.9, grad_clip_norm=1.0, accumulate_steps=2, precision="fp16"
    )
    torch.manual_seed(0)
    model = tiny_resnet(dropout=0.2)
    ema, seen, states = run_fit(model, optim, round_trip=True)
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    assert states[0].scaler is not None and states[0].ema is not None and states[0].rng is not None
    assert states[0].scaler["_growth_tracker"] > 0  # the scaler state is not the default one

    torch.manual_seed(99)  # other initial weights: everything must come from the checkpoint
    fresh = tiny_resnet(dropout=0.2)
    resumed_ema, resumed_seen, resumed_states = run_fit(fresh, optim, resume=states[0], round_trip=True)
    assert [m["epoch"] for m in resumed_seen] == [2, 3]
    assert without_timings(resumed_seen) == without_timings(seen[1:])  # every metric, grad_norm included
    assert_same_weights(fresh.state_dict(), model.state_dict())  # live weights and BN buffers
    assert_same_weights(resumed_ema.state_dict(), ema.state_dict())  # the average
    final, resumed_final = states[-1], resumed_states[-1]
    assert resumed_final.scaler == final.scaler and resumed_final.ema["updates"] == final.ema["updates"] == 12
    assert resumed_final.scheduler == final.scheduler
    assert resumed_final.early_stopping == final.early_stopping
    for a, b in zip(
        resumed_final.optimizer["state"].values(), final.optimizer["state"].values(), strict=True
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


@pytest.mark.parametrize("schedule", ["onecycle", "step"])
def test_resume_round_trip_for_the_other_schedules(schedule):
    optim = recipe(epochs=3, schedule=schedule, warmup_epochs=1, lr_step_epochs=1, lr_step_gamma=0.5)
    torch.manual_seed(0)
    model = bn_free()
    _, seen, states = run_fit(model, optim, round_trip=True)
    fresh = bn_free()
    _, resumed_seen, _ = run_fit(fresh, optim, resume=states[0], round_trip=True)
    assert without_timings(resumed_seen) == without_timings(seen[1:])
    assert_same_weights(fresh.state_dict(), model.state_dict())


# ---------------------------------------------------------------- dropout


def test_dropout_is_before_the_classifier_and_active_only_in_training():
    model = build_model("resnet20", 2, dropout=0.4)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.4
    assert build_model("resnet20", 2).dropout.p == 0.0
    features = torch.randn(6, model.num_features)
    model.train()
    assert not torch.equal(model.fc(model.dropout(features)), model.fc(model.dropout(features)))
    images = torch.rand(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(images), model(images))
    # the state dict does not depend on dropout: checkpoints load across dropout settings
    assert model.state_dict().keys() == build_model("resnet20", 2).state_dict().keys()


def test_the_jobs_put_the_configured_dropout_in_the_model(tmp_path):
    """fit takes the model as built; the Ray jobs build it (pretrain) or load it (finetune) with the
    recipe's dropout."""
    from resnet.distributed import TrainJob, build_job_model

    pretrain = PretrainConfig(model="resnet20", dropout=0.3)
    model, name, plan = build_job_model(
        TrainJob(data_dir=str(tmp_path), optim=pretrain.model_dump(), augment={}), num_classes=2
    )
    assert (model.dropout.p, name, plan) == (0.3, "resnet20", None)

    start = build_model("resnet20", 3)
    finetune = FinetuneConfig(dropout=0.25, strategy="lp_ft", epochs=3, lp_epochs=2)
    job = TrainJob(
        data_dir=str(tmp_path),
        optim=finetune.model_dump(),
        augment={},
        kind="finetune",
        init_weights={"model_name": "resnet20", "model": start.state_dict()},
    )
    model, name, plan = build_job_model(job, num_classes=3)
    assert (model.dropout.p, name, model.fc.out_features) == (0.25, "resnet20", 3)
    assert_same_weights(model.state_dict(), start.state_dict())
    # the plan is the configured strategy's, over the job's own model
    assert [(g.name, g.start_epoch) for g in plan.groups] == [
        ("head", 0),
        ("layer3", 2),
        ("layer2", 2),
        ("layer1", 2),
        ("stem", 2),
    ]
    assert plan.groups[0].modules == (model.fc,)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"pretrain": {"precision": "fp8"}}, "pretrain.precision"),
        ({"finetune": {"optimizer": "rmsprop"}}, "finetune.optimizer"),
        ({"pretrain": {"betas": [0.9, 1.5]}}, "pretrain.betas"),
        ({"pretrain": {"betas": [-0.1, 0.9]}}, "pretrain.betas"),
        ({"pretrain": {"schedule": "linear"}}, "pretrain.schedule"),
        ({"pretrain": {"epochs": 3, "warmup_epochs": 3}}, "pretrain.warmup_epochs"),
        ({"pretrain": {"lr_step_gamma": 0}}, "pretrain.lr_step_gamma"),
        ({"pretrain": {"dropout": 1.0}}, "pretrain.dropout"),
        ({"pretrain": {"label_smoothing": 1.0}}, "pretrain.label_smoothing"),
        ({"pretrain": {"grad_clip_norm": -1}}, "pretrain.grad_clip_norm"),
        ({"pretrain": {"accumulate_steps": 0}}, "pretrain.accumulate_steps"),
        ({"pretrain": {"accumulate_steps": True}}, "pretrain.accumulate_steps"),
        ({"pretrain": {"ema_decay": 1.0}}, "pretrain.ema_decay"),
        ({"pretrain": {"momentum": 1.0}}, "pretrain.momentum"),
        ({"finetune": {"metric": "train_loss"}}, "finetune.metric"),
        ({"finetune": {"early_stopping_patience": -1}}, "finetune.early_stopping_patience"),
        ({"finetune": {"early_stopping_min_delta": -0.1}}, "finetune.early_stopping_min_delta"),
        ({"pretrain": {"batch_size": 3, "accumulate_steps": 2}}, "pretrain.batch_size"),
        (
            {"ray": {"num_workers": 4}, "finetune": {"batch_size": 3}, "tune": {"workers_per_trial": None}},
            "finetune.batch_size",
        ),
        ({"ray": {"placement_strategy": "BOGUS"}}, "ray.placement_strategy"),
        ({"ray": {"gpus_per_worker": 0}}, "ray.gpus_per_worker"),
        ({"ray": {"max_failures": -2}}, "ray.max_failures"),
        ({"ray": {"checkpoints_to_keep": 0}}, "ray.checkpoints_to_keep"),
    ],
)
def test_config_rejects_bad_recipe_values_naming_the_key(raw, key):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "params.yaml")
    message = str(caught.value)
    assert message.startswith(f"params.yaml: {key}: ") and "\n" not in message


def test_config_batch_check_counts_workers_times_accumulation():
    with pytest.raises(ConfigError, match=r"pretrain\.batch_size: .*\(3 × 2 = 6\).*got 5"):
        parse_config({"ray": {"num_workers": 3}, "pretrain": {"batch_size": 5, "accumulate_steps": 2}})
    cfg = parse_config({"ray": {"num_workers": 3}, "pretrain": {"batch_size": 6, "accumulate_steps": 2}})
    assert cfg.pretrain.batch_size == 6


def test_config_accepts_the_whole_recipe():
    cfg = parse_config(
        {
            "pretrain": {
                "optimizer": "adamw",
                "betas": [0.8, 0.99],
                "momentum": 0.0,
                "nesterov": True,
                "weight_decay": 0.05,
                "schedule": "onecycle",
                "epochs": 5,
                "warmup_epochs": 1,
                "lr_step_epochs": 2,
                "lr_step_gamma": 0.5,
                "label_smoothing": 0.1,
                "dropout": 0.2,
                "grad_clip_norm": 1.0,
                "accumulate_steps": 4,
                "batch_size": 64,
                "precision": "bf16",
                "channels_last": True,
                "compile": True,
                "ema_decay": 0.999,
                "metric": "val_loss",
                "early_stopping_patience": 3,
                "early_stopping_min_delta": 0.001,
                "deterministic": True,
            },
            "ray": {
                "placement_strategy": "STRICT_SPREAD",
                "gpus_per_worker": 0.5,
                "max_failures": -1,
                "checkpoints_to_keep": 3,
            },
        }
    )
    assert cfg.pretrain.betas == (0.8, 0.99) and cfg.pretrain.mode == "min"
    assert cfg.pretrain.precision == "bf16" and cfg.pretrain.accumulate_steps == 4
    assert (cfg.ray.placement_strategy, cfg.ray.max_failures) == ("STRICT_SPREAD", -1)
    defaults = parse_config({})
    assert (defaults.pretrain.optimizer, defaults.pretrain.schedule, defaults.pretrain.precision) == (
        "sgd",
        "cosine",
        "fp32",
    )
    assert defaults.finetune.mode == "max" and defaults.ray.placement_strategy == "PACK"
