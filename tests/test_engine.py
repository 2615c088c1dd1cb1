"""The plain-PyTorch training loop, schedules, model files, fine-tuning strategies, evaluation and inference."""

from __future__ import annotations

import copy
import math
import os
import stat

import pytest
import torch

from resnet.config import AugmentConfig, FinetuneConfig, PretrainConfig
from resnet.data.augment import BatchAugment
from resnet.data.loading import Normalize, PreparedData, Split
from resnet.engine import (
    EpochStats,
    Stepper,
    TrainState,
    build_optimizer,
    build_scheduler,
    fit,
    load_model_file,
    param_groups,
    prefetch,
    save_model_file,
    set_train_mode,
    train_epoch,
    warmup_cosine,
)
from resnet.finetune import FinetunePlan, replace_head, start_epochs
from resnet.models import build_model
from resnet.pretrained import WEIGHTS_DIGEST, state_dict_digest

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def bright_vs_dark(n: int = 64, size: int = 16, seed: int = 0) -> Split:
    """Two classes a ResNet separates in a few steps: dark and bright noisy images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels.view(-1, 1, 1, 1) == 1, 180.0, 60.0)
    images = (base + torch.randn(n, 3, size, size, generator=g) * 20).clamp(0, 255).to(torch.uint8)
    return Split(images, labels)


def tiny_data() -> PreparedData:
    splits = {
        "train": bright_vs_dark(64),
        "val": bright_vs_dark(32, seed=1),
        "test": bright_vs_dark(32, seed=2),
    }
    return PreparedData(["dark", "bright"], (0.47,) * 3, (0.25,) * 3, "hash", splits)


OPTIM = PretrainConfig(
    model="resnet20", epochs=3, batch_size=16, lr=0.05, seed=0, warmup_epochs=0, channels_last=False
)
NO_AUGMENT = AugmentConfig(crop_padding=0, hflip=False)


def make_stepper(model: torch.nn.Module, optim, accumulate_steps: int, *, scaler=None) -> Stepper:
    optimizer = build_optimizer(model, optim)
    return Stepper(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, optim, steps_per_epoch=100),
        scaler=scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False),
        accumulate_steps=accumulate_steps,
        grad_clip_norm=optim.grad_clip_norm,
    )


def train(epochs_seen: list, resume: TrainState | None = None, states: dict | None = None):
    torch.manual_seed(0)
    model = build_model("resnet20", 2)

    def on_epoch_end(metrics, state):
        epochs_seen.append(metrics)
        if states is not None:
            states[metrics["epoch"]] = copy.deepcopy(state)  # its tensors are the live ones

    return fit(model, tiny_data(), OPTIM, NO_AUGMENT, device=CPU, resume=resume, on_epoch_end=on_epoch_end)


def test_epoch_stats_arithmetic():
    stats = EpochStats()
    stats.add(torch.tensor(2.0), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    stats.add(torch.tensor(1.0), torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    assert stats.count == 3 and stats.correct == 2
    assert stats.loss == pytest.approx((2 * 2 + 1) / 3) and stats.accuracy == pytest.approx(2 / 3)
    assert stats.all_reduce() is stats  # no process group: unchanged


def test_epoch_stats_count_soft_targets_by_their_largest_class():
    stats = EpochStats()
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    mixed = torch.tensor([[0.7, 0.3, 0.0], [0.6, 0.0, 0.4], [0.0, 0.45, 0.55]])  # heaviest: 0, 0, 2
    stats.add(torch.tensor(0.5), logits, mixed)
    assert (stats.count, stats.correct) == (3, 2)
    stats.add(torch.tensor(0.5), logits, torch.tensor([0, 1, 1]))  # hard labels as before
    assert (stats.count, stats.correct) == (6, 4) and stats.loss == pytest.approx(0.5)


class _CollectiveCalled(Exception):
    """Stops a spied collective (the meta device has no data to read back)."""


def test_epoch_stats_all_reduce_sums_a_tensor_on_the_training_device(monkeypatch):
    """NCCL reduces only CUDA tensors: the end-of-epoch all-reduce must use a tensor on the device the model
    trains on, never a host copy. The meta device stands in for a GPU: any copy to the CPU fails there."""
    import resnet.engine as engine

    seen: list[torch.Tensor] = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor)
        raise _CollectiveCalled

    monkeypatch.setattr(engine.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(engine.dist, "all_reduce", all_reduce)
    meta = torch.device("meta")
    stats = EpochStats(meta)
    logits = torch.zeros(4, 10, device=meta)
    stats.add(torch.zeros((), device=meta), logits, torch.zeros(4, dtype=torch.long, device=meta))
    with pytest.raises(_CollectiveCalled):
        stats.all_reduce()
    assert [(t.device, t.dtype, tuple(t.shape)) for t in seen] == [(meta, torch.float64, (3,))]


def test_every_collective_of_an_epoch_uses_the_model_device(monkeypatch, tmp_path):
    """A whole training epoch and a validation pass under a (one-process) process group: every tensor handed to
    a collective is on the device the model is on, and the reduced metrics are what was counted."""
    import torch.distributed as dist

    import resnet.engine as engine

    calls: list[tuple[str, torch.device]] = []
    real_all_reduce = dist.all_reduce

    def spy_all_reduce(tensor, *args, **kwargs):
        calls.append(("all_reduce", tensor.device))
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(engine.dist, "all_reduce", spy_all_reduce)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model("resnet20", 2)
        net = torch.nn.parallel.DistributedDataParallel(model)
        stepper = make_stepper(model, OPTIM, accumulate_steps=1)
        data = tiny_data()
        normalize = Normalize(data.mean, data.std)
        batches = data.train_epoch(16, epoch=0, seed=0)
        trained = train_epoch(
            net,
            batches,
            stepper,
            normalize,
            BatchAugment(num_classes=2, crop_padding=0),
            device=CPU,
            generator=torch.Generator().manual_seed(0),
        )
        from resnet.engine import evaluate

        validated = evaluate(model, data.val_batches(256), normalize, device=CPU)
    finally:
        dist.destroy_process_group()
    device = next(model.parameters()).device
    assert calls == [("all_reduce", device), ("all_reduce", device)]
    assert (trained.count, validated.count) == (64, 32)


def test_prefetch_yields_every_item_in_order_and_raises_the_producer_error():
    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))

    def failing():
        yield 1
        raise ValueError("decode failed")

    out = []
    with pytest.raises(ValueError, match="decode failed"):
        for item in prefetch(failing(), depth=2):
            out.append(item)
    assert out == [1]
    partial = prefetch(iter(range(1000)), depth=2)
    assert next(partial) == 0
    partial.close()  # the consumer stops early: the producer thread ends instead of blocking


def test_training_with_prefetched_batches_is_bit_identical():
    """The background thread only moves augmentation ahead in time: same seeded draws, same weights."""

    def weights_after_epoch(prefetch_batches: int) -> dict:
        torch.manual_seed(0)
        model = build_model("resnet20", 2)
        stepper = make_stepper(model, OPTIM, accumulate_steps=1)
        data = tiny_data()
        stats = train_epoch(
            model,
            data.train_epoch(16, epoch=0, seed=0),
            stepper,
            Normalize(data.mean, data.std),
            BatchAugment(num_classes=2, crop_padding=4, hflip=True, mixup_alpha=0.2),
            device=CPU,
            generator=torch.Generator().manual_seed(0),
            prefetch_batches=prefetch_batches,
        )
        return model.state_dict() | {"loss": torch.tensor(stats.loss)}

    inline, ahead = weights_after_epoch(0), weights_after_epoch(2)
    assert inline.keys() == ahead.keys()
    assert all(torch.equal(inline[key], ahead[key]) for key in inline)


def test_warmup_then_cosine_schedule():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)
    assert [factor(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    after = [factor(s) for s in range(10, 101)]
    assert after[0] == pytest.approx(1.0) and after[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert factor(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_warmup_zero_starts_at_full_rate():
    factor = warmup_cosine(total_steps=4, warmup_steps=0)
    assert [factor(s) for s in range(5)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    )
    assert factor(10) == pytest.approx(0.0, abs=1e-12)  # clamped past the end


def test_param_groups_classify_every_parameter_by_kind():
    model = build_model("resnet20", 10)
    decay, no_decay = (set(id(p) for p in g["params"]) for g in param_groups(model, 1e-4))
    for name, param in model.named_parameters():
        is_norm_or_bias = name.endswith(".bias") or ".bn" in f".{name}" or name.startswith("bn")
        assert (id(param) in no_decay) == is_norm_or_bias, name
        assert (id(param) in decay) == (not is_norm_or_bias), name
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_no_weight_decay_on_norm_and_bias():
    model = build_model("resnet20", 10)
    model.conv1.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 5e-4)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert id(model.layer1[0].conv1.weight) in ids(decay["params"]) and id(model.fc.weight) in ids(
        decay["params"]
    )
    assert {id(model.bn1.weight), id(model.bn1.bias), id(model.fc.bias)} <= ids(no_decay["params"])
    assert id(model.conv1.weight) not in ids(decay["params"]) | ids(no_decay["params"])
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0


def test_fit_refuses_a_batch_that_does_not_split_into_equal_micro_batches():
    model = build_model("resnet20", 2)
    optim = OPTIM.model_copy(update={"batch_size": 33, "accumulate_steps": 2})
    with pytest.raises(
        ValueError, match=r"batch_size 33 is not a multiple of world_size × accumulate_steps \(1 × 2\)"
    ):
        fit(model, tiny_data(), optim, NO_AUGMENT, device=CPU)


def test_fit_learns_and_reports_every_epoch():
    seen: list = []
    train(seen)
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    assert seen[-1]["train_loss"] < seen[0]["train_loss"]
    assert seen[-1]["val_acc"] >= 0.9
    assert seen[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reaches 0 at the last step


def test_resume_continues_after_the_saved_epoch_with_the_same_result():
    seen, states = [], {}
    uninterrupted = train(seen, states=states)
    resumed_seen: list = []
    resumed = train(resumed_seen, resume=states[1])
    assert [m["epoch"] for m in resumed_seen] == [2, 3]
    # Bit-identical, not merely close: everything random in an epoch (shuffle, augmentation) is seeded from
    # (seed, epoch, rank), and the state restores weights, BN buffers, momentum and the schedule position.
    resumed_state = resumed.state_dict()
    assert resumed_state.keys() == uninterrupted.state_dict().keys()
    differing = [n for n, t in uninterrupted.state_dict().items() if not torch.equal(resumed_state[n], t)]
    assert differing == []
    # the metrics of the resumed epochs are the uninterrupted run's too
    for a, b in zip(resumed_seen, seen[1:], strict=True):
        assert (a["epoch"], a["train_loss"], a["val_acc"], a["lr"]) == (
            b["epoch"],
            b["train_loss"],
            b["val_acc"],
            b["lr"],
        )


def test_resume_from_the_last_epoch_trains_nothing_more():
    seen, states = [], {}
    uninterrupted = train(seen, states=states)
    after: list = []
    resumed = train(after, resume=states[3])
    assert after == []
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_train_state_handed_to_on_epoch_end_holds_live_tensors():
    """Documented in fit(): the callback must save or copy the state, not keep it."""
    kept: dict = {}
    torch.manual_seed(0)
    model = build_model("resnet20", 2)
    fit(
        model,
        tiny_data(),
        OPTIM,
        NO_AUGMENT,
        device=CPU,
        on_epoch_end=lambda m, s: kept.update({m["epoch"]: s}),
    )
    # the state "after epoch 1" has been trained on through epoch 3
    assert torch.equal(kept[1].model["fc.weight"], model.fc.weight.detach())
    assert kept[1].epoch == 1 and kept[3].epoch == 3


def _fit_once(augment) -> list[dict]:
    seen: list = []
    torch.manual_seed(0)
    optim = PretrainConfig(model="resnet20", epochs=2, batch_size=16, lr=0.05, seed=0)
    fit(
        build_model("resnet20", 2),
        tiny_data(),
        optim,
        augment,
        device=CPU,
        on_epoch_end=lambda m, s: seen.append(m),
    )
    return seen


@pytest.mark.parametrize(
    "augment",
    [
        AugmentConfig(crop_padding=2, mixup_alpha=0.4),
        BatchAugment(num_classes=2, crop_padding=0, mixup_alpha=0.2, cutmix_alpha=1.0),
    ],
    ids=["mixup-config", "mixup-cutmix-batchaugment"],
)
def test_fit_with_soft_targets_reports_accuracies_in_the_unit_interval(augment):
    seen = _fit_once(augment)
    assert [m["epoch"] for m in seen] == [1, 2]
    for metrics in seen:
        assert 0.0 <= metrics["train_acc"] <= 1.0 and 0.0 <= metrics["val_acc"] <= 1.0
        assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
        assert metrics["images_per_sec"] > 0
    as_batch = augment if isinstance(augment, BatchAugment) else BatchAugment.from_config(augment, 2)
    assert as_batch.soft_targets  # the loss and the accuracy did see (N, 2) probabilities
    assert seen[-1]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_fit_takes_any_data_with_the_prepared_data_interface():
    """What engine.fit asks of its data (a streaming source answers the same): the schedule's length comes
    from train_steps, the batches from train_epoch and val_batches."""
    data = tiny_data()
    calls: list = []

    class Streamed:
        mean, std, num_classes = data.mean, data.std, data.num_classes

        def train_steps(self, batch_size, world_size=1):
            calls.append(("train_steps", batch_size, world_size))
            return data.train_steps(batch_size, world_size)

        def train_epoch(self, batch_size, *, epoch, seed, rank=0, world_size=1):
            calls.append(("train_epoch", batch_size, epoch))
            return data.train_epoch(batch_size, epoch=epoch, seed=seed, rank=rank, world_size=world_size)

        def val_batches(self, batch_size, *, rank=0, world_size=1):
            calls.append(("val_batches", batch_size, rank))
            return data.val_batches(batch_size, rank=rank, world_size=world_size)

    seen: list = []
    torch.manual_seed(0)
    fit(
        build_model("resnet20", 2),
        Streamed(),
        OPTIM,
        NO_AUGMENT,
        device=CPU,
        on_epoch_end=lambda m, s: seen.append(m),
    )
    assert calls == [
        ("train_steps", 16, 1),
        *[c for e in range(3) for c in (("train_epoch", 16, e), ("val_batches", 256, 0))],
    ]
    assert seen[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # 4 steps per epoch, as train_steps said
    expected: list = []
    train(expected)
    assert [m["train_loss"] for m in seen] == [m["train_loss"] for m in expected]  # same as PreparedData


def model_meta(**changes) -> dict:
    """What the stages store beside a 2-class resnet20's weights."""
    return {
        "model_name": "resnet20",
        "num_classes": 2,
        "classes": ["a", "b"],
        "mean": [0.5] * 3,
        "std": [0.2] * 3,
    } | changes


def test_model_file_bytes_depend_only_on_weights_and_meta(tmp_path):
    """DVC compares outputs by their bytes: saving the same model twice (each through its own temporary file)
    must give identical files, or an unchanged stage output would re-run everything downstream."""
    torch.manual_seed(0)
    model = build_model("resnet20", 2)
    save_model_file(tmp_path / "a" / "model.pt", model, model_meta())
    save_model_file(tmp_path / "b" / "model.pt", model, model_meta())
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


def test_model_file_round_trip(tmp_path):
    model = build_model("resnet20", 2)
    meta = model_meta(mean=[0.5] * 3, std=[0.2] * 3)
    save_model_file(tmp_path / "m.pt", model, meta)
    loaded, loaded_meta = load_model_file(tmp_path / "m.pt")
    meta |= {WEIGHTS_DIGEST: state_dict_digest(model.state_dict())}  # what every load checks
    assert loaded_meta == meta and not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert torch.load(tmp_path / "m.pt", weights_only=True)["meta"] == meta
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left


def test_model_file_round_trip_keeps_trained_bn_buffers(tmp_path):
    model = build_model("resnet20", 3)
    model.train()
    model(torch.rand(4, 3, 8, 8))  # non-default running statistics and num_batches_tracked
    meta = {"model_name": "resnet20", "num_classes": 3, "classes": ["a", "b", "c"], "mean": [0.1] * 3}
    save_model_file(tmp_path / "sub" / "m.pt", model, meta)
    loaded, loaded_meta = load_model_file(tmp_path / "sub" / "m.pt")
    assert loaded_meta == meta | {WEIGHTS_DIGEST: state_dict_digest(model.state_dict())}
    assert all(not m.training for m in loaded.modules())
    assert int(loaded.bn1.num_batches_tracked) == 1
    assert torch.equal(loaded.bn1.running_var, model.bn1.running_var)
    assert loaded.fc.out_features == 3


def test_model_file_has_the_usual_permissions(tmp_path):
    save_model_file(
        tmp_path / "m.pt", build_model("resnet20", 2), {"model_name": "resnet20", "num_classes": 2}
    )
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.pt").stat().st_mode) == 0o666 & ~umask


def test_linear_probe_trains_only_the_head_and_freezes_bn_statistics():
    model = build_model("resnet20", 2)
    plan = FinetunePlan.from_config(model, FinetuneConfig(epochs=2, lr=0.1, strategy="linear_probe"))
    assert plan.apply(model, 0) == ("head",)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    frozen = plan.frozen_norms(0)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(frozen) == len(norms) > 0 and {id(m) for m in frozen} == {id(m) for m in norms}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_train_mode(model, frozen)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = bright_vs_dark(8)
    loss = torch.nn.functional.cross_entropy(model(batch.images.float() / 255), batch.labels)
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc.weight", "fc.bias"}  # BN running statistics included: unchanged

    # control: the same forward pass in plain train mode does move the running statistics
    set_train_mode(model)
    model(batch.images.float() / 255)
    assert not torch.equal(model.bn1.running_mean, before["bn1.running_mean"])

    full = FinetunePlan.from_config(model, FinetuneConfig(epochs=2, lr=0.1, strategy="full"))
    assert full.apply(model, 0) == ("head", "layer3", "layer2", "layer1", "stem")
    assert all(p.requires_grad for p in model.parameters()) and full.frozen_norms(0) == []
    with pytest.raises(ValueError, match="unknown fine-tuning strategy"):
        start_epochs("everything", [0, 1, 2], lp_epochs=1, unfreeze_epochs=1)


def test_replace_head_only_when_the_class_count_differs():
    model = build_model("resnet20", 10)
    head = model.fc
    assert replace_head(model, 10).fc is head
    assert replace_head(model, 3).fc.out_features == 3


def test_finetune_config_is_an_optimizer_config():
    optim = FinetuneConfig(epochs=2, lr=0.01, strategy="linear_probe")
    assert optim.batch_size == 32 and optim.strategy == "linear_probe"


def test_classifier_normalises_inside(tmp_path):
    from resnet.predict import load_classifier

    model = build_model("resnet20", 2).eval()
    meta = model_meta(mean=[0.4] * 3, std=[0.3] * 3)
    save_model_file(tmp_path / "m.pt", model, meta)
    classifier, loaded_meta = load_classifier(tmp_path / "m.pt")
    assert loaded_meta == meta | {WEIGHTS_DIGEST: state_dict_digest(model.state_dict())}
    assert not classifier.training
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), model(Normalize((0.4,) * 3, (0.3,) * 3)(images)))
