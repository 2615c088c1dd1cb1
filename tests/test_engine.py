"""The plain-PyTorch training loop, schedules, model files, fine-tuning strategies, evaluation and inference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from resnet.config import AugmentConfig, FinetuneConfig, PretrainConfig
from resnet.data.loading import Normalize, PreparedData, Split
from resnet.engine import (
    EpochStats,
    TrainState,
    fit,
    load_model_file,
    param_groups,
    save_model_file,
    set_train_mode,
    warmup_cosine,
)
from resnet.finetune import apply_strategy, replace_head
from resnet.models import build_model

CPU = torch.device("cpu")


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


OPTIM = PretrainConfig(model="resnet20", epochs=3, batch_size=16, lr=0.05, seed=0)
NO_AUGMENT = AugmentConfig(crop_padding=0, hflip=False)


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


def test_warmup_then_cosine_schedule():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)
    assert [factor(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    after = [factor(s) for s in range(10, 101)]
    assert after[0] == pytest.approx(1.0) and after[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert factor(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


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
    for name, tensor in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_model_file_round_trip(tmp_path):
    model = build_model("resnet20", 2)
    meta = {
        "model_name": "resnet20",
        "num_classes": 2,
        "classes": ["a", "b"],
        "mean": [0.5] * 3,
        "std": [0.2] * 3,
    }
    save_model_file(tmp_path / "m.pt", model, meta)
    loaded, loaded_meta = load_model_file(tmp_path / "m.pt")
    assert loaded_meta == meta and not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert torch.load(tmp_path / "m.pt", weights_only=True)["meta"] == meta
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left


def test_linear_probe_trains_only_the_head_and_freezes_bn_statistics():
    model = build_model("resnet20", 2)
    freeze_bn = apply_strategy(model, "linear_probe")
    assert freeze_bn is True
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_train_mode(model, freeze_bn)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = bright_vs_dark(8)
    loss = torch.nn.functional.cross_entropy(model(batch.images.float() / 255), batch.labels)
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc.weight", "fc.bias"}  # BN running statistics included: unchanged

    assert apply_strategy(model, "full") is False
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown fine-tuning strategy"):
        apply_strategy(model, "everything")


def test_replace_head_only_when_the_class_count_differs():
    model = build_model("resnet20", 10)
    head = model.fc
    assert replace_head(model, 10).fc is head
    assert replace_head(model, 3).fc.out_features == 3


def test_finetune_config_is_an_optimizer_config():
    optim = FinetuneConfig(epochs=2, lr=0.01, strategy="linear_probe")
    assert optim.batch_size == 32 and optim.strategy == "linear_probe"


def test_evaluate_model_file_agrees_with_its_predictions(tmp_path):
    from resnet.data.prepare import write_prepared
    from resnet.data.sources import RawDataset
    from resnet.evaluate import evaluate_model_file

    data = tiny_data()
    images = torch.cat([s.images for s in data.splits.values()]).permute(0, 2, 3, 1).numpy()
    labels = torch.cat([s.labels for s in data.splits.values()]).numpy()
    write_prepared(
        RawDataset(images, labels, ("dark", "bright")), tmp_path / "d", val=0.2, test=0.2, seed=0, source="t"
    )
    model = build_model("resnet20", 2)
    meta = {"model_name": "resnet20", "num_classes": 2, "classes": ["dark", "bright"], "mean": [0.47] * 3}
    save_model_file(tmp_path / "m.pt", model, meta | {"std": [0.25] * 3})
    report = evaluate_model_file(tmp_path / "m.pt", tmp_path / "d")
    rows = report.predictions
    assert len(rows) == report.metrics["test_images"] > 0
    assert sum(r["actual"] == r["predicted"] for r in rows) / len(rows) == pytest.approx(
        report.metrics["test_acc"]
    )


def test_classifier_normalises_inside(tmp_path):
    from resnet.predict import load_classifier

    model = build_model("resnet20", 2).eval()
    meta = {
        "model_name": "resnet20",
        "num_classes": 2,
        "classes": ["a", "b"],
        "mean": [0.4] * 3,
        "std": [0.3] * 3,
    }
    save_model_file(tmp_path / "m.pt", model, meta)
    classifier, _ = load_classifier(tmp_path / "m.pt")
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), model(Normalize((0.4,) * 3, (0.3,) * 3)(images)))
