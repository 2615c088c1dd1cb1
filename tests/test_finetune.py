"""Fine-tuning strategies, proved on values: which parameters (and BN statistics) move in which epoch, the LR
each layer group gets at each step and epoch, what the optimiser holds, and that DDP all-reduces a group
unfrozen mid-run.

A 3-stage, 4/8/16-wide basic-block net on 8 px images, 32 training images in batches of 16 (2 optimiser
steps per epoch): every `fit` here takes a fraction of a second on one CPU thread.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_engine import CPU, NO_AUGMENT, bright_vs_dark
from torch import nn

from resnet import engine
from resnet.config import ConfigError, FinetuneConfig, parse_config
from resnet.data.loading import PreparedData
from resnet.engine import TrainState, build_optimizer, build_scheduler, fit
from resnet.finetune import NEVER, FinetunePlan, layer_groups, start_epochs
from resnet.models import BasicBlock, ResNet, build_model

STEPS = 2  # optimiser steps per epoch: 32 training images, batch 16
CIFAR_GROUPS = ("head", "layer3", "layer2", "layer1", "stem")
BACKBONE = CIFAR_GROUPS[1:]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net() -> ResNet:
    """The same weights on every call (and in every process)."""
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1], 2, stem="cifar", widths=(4, 8, 16), shortcut="pad")


def small_data() -> PreparedData:
    splits = {
        "train": bright_vs_dark(32, size=8),
        "val": bright_vs_dark(16, size=8, seed=1),
        "test": bright_vs_dark(16, size=8, seed=2),
    }
    return PreparedData(["dark", "bright"], (0.47,) * 3, (0.25,) * 3, "hash", splits)


def finetune(**changes) -> FinetuneConfig:
    """A validated recipe: 4 epochs of SGD with momentum and (deliberately large) weight decay, constant LR
    0.1: anything the optimiser did to a frozen parameter would show."""
    base = {
        "epochs": 4,
        "batch_size": 16,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 0.01,
        "schedule": "constant",
        "seed": 0,
    }
    return FinetuneConfig(**(base | changes))


def group_of(key: str) -> str:
    """The layer group of a state dict key or parameter name, from the name alone (not from the plan)."""
    first = key.split(".")[0]
    return {"fc": "head", "conv1": "stem", "bn1": "stem"}.get(first, first)


def keys_of(model: nn.Module, groups) -> set[str]:
    return {key for key in model.state_dict() if group_of(key) in groups}


def param_count(model: nn.Module, groups) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if group_of(name) in groups)


def snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {key for key in before if not torch.equal(before[key], after[key])}


TIMINGS = ("images_per_sec", "epoch_seconds")


def without_timings(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics]


@dataclass
class Run:
    model: ResNet
    metrics: list[dict]
    states: list[TrainState]  # deep copies, one per epoch
    initial: dict[str, torch.Tensor]

    def weights(self, epoch: int) -> dict[str, torch.Tensor]:
        """The weights and BN buffers before `epoch` (0: before fit; e + 1: after epoch e)."""
        return self.initial if epoch == 0 else self.states[epoch - 1].model


def run(optim: FinetuneConfig, resume: TrainState | None = None, model: ResNet | None = None) -> Run:
    model = model if model is not None else tiny_net()
    result = Run(model, [], [], snapshot(model.state_dict()))

    def on_epoch_end(metrics, state):
        result.metrics.append(metrics)
        result.states.append(copy.deepcopy(state))  # its tensors are the live ones

    plan = FinetunePlan.from_config(model, optim)
    returned = fit(
        model,
        small_data(),
        optim,
        NO_AUGMENT,
        device=CPU,
        plan=plan,
        resume=resume,
        on_epoch_end=on_epoch_end,
    )
    assert returned is model
    return result


# ---------------------------------------------------------------- layer groups and start epochs


def test_layer_groups_of_a_cifar_net_cover_every_parameter_once_top_down():
    model = tiny_net()
    groups = layer_groups(model)
    assert [name for name, _ in groups] == list(CIFAR_GROUPS)
    assert [modules for _, modules in groups] == [
        [model.fc],
        [model.layer3],
        [model.layer2],
        [model.layer1],
        [model.conv1, model.bn1],
    ]
    grouped = [id(p) for _, modules in groups for m in modules for p in m.parameters()]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters())) == 23
    # resnet20 (the registered CIFAR net) splits the same way
    assert [name for name, _ in layer_groups(build_model("resnet20", 3))] == list(CIFAR_GROUPS)


def test_layer_groups_of_resnet18_and_the_plan_built_from_them():
    model = build_model("resnet18", 10)
    groups = layer_groups(model)
    names = ["head", "layer4", "layer3", "layer2", "layer1", "stem"]
    assert [name for name, _ in groups] == names
    grouped = [id(p) for _, modules in groups for m in modules for p in m.parameters()]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(grouped) == len(set(grouped))
    assert sum(p.numel() for _, modules in groups for m in modules for p in m.parameters()) == 11_181_642

    plan = FinetunePlan.from_config(
        model, finetune(epochs=20, strategy="gradual", lp_epochs=2, unfreeze_epochs=3, lr_decay=0.5)
    )
    assert [(g.name, g.depth, g.start_epoch, g.lr_scale) for g in plan.groups] == [
        ("head", 0, 0, 1.0),
        ("layer4", 1, 2, 0.5),
        ("layer3", 2, 5, 0.25),
        ("layer2", 3, 8, 0.125),
        ("layer1", 4, 11, 0.0625),
        ("stem", 5, 11, 0.03125),  # the stem starts with the first stage
    ]
    assert [plan.apply(model, epoch) for epoch in (0, 1, 2, 4, 5, 10, 11)] == [
        ("head",),
        ("head",),
        ("head", "layer4"),
        ("head", "layer4"),
        ("head", "layer4", "layer3"),
        ("head", "layer4", "layer3", "layer2"),
        tuple(names),
    ]


def test_layer_groups_reject_a_parameter_outside_every_group():
    model = tiny_net()
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="every parameter of the model exactly once"):
        layer_groups(model)


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("full", [0, 0, 0, 0, 0, 0]),
        ("linear_probe", [0, NEVER, NEVER, NEVER, NEVER, NEVER]),
        ("lp_ft", [0, 3, 3, 3, 3, 3]),
        ("gradual", [0, 3, 5, 7, 9, 9]),
    ],
)
def test_start_epochs_per_strategy(strategy, expected):
    # depths 0..5: head, layer4 .. layer1, stem (resnet18's six groups)
    assert start_epochs(strategy, list(range(6)), lp_epochs=3, unfreeze_epochs=2) == expected


def test_start_epochs_of_the_cifar_groups():
    depths = list(range(5))
    assert start_epochs("gradual", depths, lp_epochs=1, unfreeze_epochs=1) == [0, 1, 2, 3, 3]
    assert start_epochs("gradual", depths, lp_epochs=0, unfreeze_epochs=2) == [0, 0, 2, 4, 4]
    assert start_epochs("lp_ft", depths, lp_epochs=2, unfreeze_epochs=7) == [0, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="unknown fine-tuning strategy 'bogus'"):
        start_epochs("bogus", depths, lp_epochs=1, unfreeze_epochs=1)


def test_frozen_norms_are_the_bn_layers_of_the_groups_not_training():
    model = tiny_net()
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(norms) == 7  # bn1 and two per block
    plan = FinetunePlan.from_config(model, finetune(strategy="gradual", lp_epochs=1))

    def frozen(epoch: int, p: FinetunePlan = plan) -> set[str]:
        ids = {id(m) for m in p.frozen_norms(epoch)}
        assert len(ids) == len(p.frozen_norms(epoch))
        return {name for name, m in norms.items() if id(m) in ids}

    assert frozen(0) == set(norms)  # the head has no BN
    assert frozen(1) == set(norms) - {"layer3.0.bn1", "layer3.0.bn2"}
    assert frozen(2) == {"layer1.0.bn1", "layer1.0.bn2", "bn1"}
    assert frozen(3) == set()
    with_freeze_bn = FinetunePlan.from_config(model, finetune(strategy="full", freeze_bn=True))
    assert all(frozen(epoch, with_freeze_bn) == set(norms) for epoch in range(4))


# ---------------------------------------------------------------- which parameters train when, through fit

ALL = set(CIFAR_GROUPS)


@pytest.mark.parametrize(
    "changes, training",
    [
        ({"strategy": "full"}, [ALL, ALL, ALL, ALL]),
        ({"strategy": "linear_probe"}, [{"head"}] * 4),
        ({"strategy": "lp_ft", "lp_epochs": 1}, [{"head"}, ALL, ALL, ALL]),
        ({"strategy": "lp_ft", "lp_epochs": 2}, [{"head"}, {"head"}, ALL, ALL]),
        (
            {"strategy": "gradual", "lp_epochs": 1, "unfreeze_epochs": 1},
            [{"head"}, {"head", "layer3"}, {"head", "layer3", "layer2"}, ALL],
        ),
        (
            {"strategy": "gradual", "lp_epochs": 0, "unfreeze_epochs": 2},
            [{"head", "layer3"}] * 2 + [{"head", "layer3", "layer2"}] * 2,
        ),
    ],
    ids=["full", "linear_probe", "lp_ft-1", "lp_ft-2", "gradual-1-1", "gradual-0-2"],
)
def test_exactly_the_training_groups_move_in_each_epoch(changes, training):
    """Per epoch: every weight and BN buffer of a training group moves, and every one of a frozen group
    (weight decay, momentum and BN running statistics included) stays bit-identical, also in the epochs
    right after another group unfroze. `trainable_params` counts the training groups' parameters, and
    momentum buffers exist exactly for the groups that have trained so far."""
    result = run(finetune(**changes))
    model = result.model
    assert len(result.metrics) == 4
    trained_so_far: set[str] = set()
    for epoch, groups in enumerate(training):
        moved = changed_keys(result.weights(epoch), result.weights(epoch + 1))
        assert moved == keys_of(model, groups), f"epoch {epoch}"
        assert result.metrics[epoch]["trainable_params"] == param_count(model, groups)

        trained_so_far |= groups
        saved = result.states[epoch].optimizer
        index_group = {i: g["name"] for g in saved["param_groups"] for i in g["params"]}
        assert sorted(index_group) == list(range(len(list(model.parameters()))))  # all, from the start
        with_momentum = {index_group[i] for i, s in saved["state"].items() if "momentum_buffer" in s}
        assert with_momentum == trained_so_far, f"epoch {epoch}"
        per_group = {name: sum(v == name for v in index_group.values()) for name in CIFAR_GROUPS}
        buffers = sum("momentum_buffer" in s for s in saved["state"].values())
        assert buffers == sum(per_group[name] for name in trained_so_far)
    for group in ALL - trained_so_far:  # never trained: exactly the starting weights at the end
        assert all(torch.equal(result.weights(4)[k], result.initial[k]) for k in keys_of(model, {group}))


def test_freeze_bn_keeps_bn_scale_shift_and_statistics_while_the_convolutions_train():
    result = run(finetune(strategy="full", freeze_bn=True, epochs=2))
    model = result.model
    bn_keys = {
        f"{name}.{key}"
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    assert len(bn_keys) == 7 * 5 and bn_keys <= set(model.state_dict())
    bn_params = sum(
        m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )
    for epoch in range(2):
        moved = changed_keys(result.weights(epoch), result.weights(epoch + 1))
        assert moved == set(model.state_dict()) - bn_keys
        assert result.metrics[epoch]["trainable_params"] == param_count(model, ALL) - bn_params == 4870 - 120
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {
        k for k in bn_keys if k.endswith(("weight", "bias"))
    }


def test_a_gradual_run_resumed_mid_plan_is_bit_identical():
    """The plan is rebuilt for a fresh model and re-applied at the resumed epoch (layer2 unfreezes in it);
    momentum, the LR factors (the scheduler's step count) and the still-frozen groups continue as they were."""
    optim = finetune(strategy="gradual", lp_epochs=1, backbone_warmup_epochs=1, lr_decay=0.7)
    whole = run(optim)
    fresh = tiny_net()
    with torch.no_grad():
        for param in fresh.parameters():
            param.add_(1.0)  # everything must come from the checkpoint
    resumed = run(optim, resume=whole.states[1], model=fresh)
    assert [m["epoch"] for m in resumed.metrics] == [3, 4]
    assert without_timings(resumed.metrics) == without_timings(whole.metrics[2:])
    for got, expected in zip(resumed.states, whole.states[2:], strict=True):
        assert changed_keys(got.model, expected.model) == set()


# ---------------------------------------------------------------- learning rates


def lrs(metrics: dict) -> dict[str, float]:
    return {name: metrics[f"lr_{name}"] for name in CIFAR_GROUPS}


DECAYED = {"head": 0.1, "layer3": 0.05, "layer2": 0.025, "layer1": 0.0125, "stem": 0.00625}


def test_layerwise_lr_decay_gives_each_group_lr_times_decay_to_its_depth():
    result = run(finetune(strategy="full", lr_decay=0.5, epochs=2))
    for metrics in result.metrics:
        assert lrs(metrics) == pytest.approx(DECAYED, rel=1e-12, abs=0)
    # the optimiser groups: decayed conv/linear weights and undecayed BN/biases, both at the group's LR
    groups = result.states[-1].optimizer["param_groups"]
    assert [(g["name"], g["weight_decay"]) for g in groups] == [
        (name, wd) for name in CIFAR_GROUPS for wd in (0.01, 0.0)
    ]
    assert [g["initial_lr"] for g in groups] == pytest.approx(
        [DECAYED[g["name"]] for g in groups], rel=1e-12, abs=0
    )


def test_a_frozen_group_has_lr_zero_until_it_unfreezes():
    result = run(finetune(strategy="gradual", lp_epochs=1, lr_decay=0.5))
    starts = {"head": 0, "layer3": 1, "layer2": 2, "layer1": 3, "stem": 3}
    for epoch, metrics in enumerate(result.metrics):
        expected = {name: DECAYED[name] if epoch >= starts[name] else 0.0 for name in CIFAR_GROUPS}
        assert lrs(metrics) == pytest.approx(expected, rel=1e-12, abs=0), f"epoch {epoch}"


def test_each_parameter_steps_by_its_groups_lr():
    """The LR is applied, not only reported: with gradients of ones, no momentum and no weight decay, one SGD
    step moves every parameter by exactly its group's LR (0 for a frozen group)."""
    model = tiny_net()
    optim = finetune(strategy="gradual", lp_epochs=0, lr_decay=0.5, momentum=0.0, weight_decay=0.0)
    plan = FinetunePlan.from_config(model, optim)
    optimizer = build_optimizer(model, optim, plan.param_groups(optim.lr, optim.weight_decay))
    factors = [plan.lr_factor(g["name"], 1) for g in optimizer.param_groups]
    scheduler = build_scheduler(optimizer, optim, 1, factors)  # one step per epoch
    starts = {"head": 0, "layer3": 0, "layer2": 1, "layer1": 2, "stem": 2}
    for epoch in range(3):
        plan.apply(model, epoch)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        for param in model.parameters():
            param.grad = torch.ones_like(param) if param.requires_grad else None
        optimizer.step()
        scheduler.step()
        for name, param in model.named_parameters():
            group = group_of(name)
            lr = DECAYED[group] if epoch >= starts[group] else 0.0
            torch.testing.assert_close(before[name] - param.detach(), torch.full_like(param, lr))


def test_backbone_warmup_ramps_each_group_linearly_from_its_unfreeze_step():
    optim = finetune(strategy="lp_ft", lp_epochs=1, backbone_warmup_epochs=2, lr_decay=0.5)
    plan = FinetunePlan.from_config(tiny_net(), optim)
    steps = range(4 * STEPS)
    assert [plan.lr_factor("head", STEPS)(s) for s in steps] == [1.0] * 8
    for name in BACKBONE:  # unfrozen at step 2; 2 epochs = 4 steps of ramp
        assert [plan.lr_factor(name, STEPS)(s) for s in steps] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]

    gradual = FinetunePlan.from_config(
        tiny_net(), finetune(strategy="gradual", lp_epochs=1, backbone_warmup_epochs=1)
    )
    assert [gradual.lr_factor("layer3", STEPS)(s) for s in steps] == [0, 0, 0.5, 1, 1, 1, 1, 1]
    assert [gradual.lr_factor("layer2", STEPS)(s) for s in steps] == [0, 0, 0, 0, 0.5, 1, 1, 1]
    assert [gradual.lr_factor("stem", STEPS)(s) for s in steps] == [0, 0, 0, 0, 0, 0, 0.5, 1]
    linear_probe = FinetunePlan.from_config(tiny_net(), finetune(strategy="linear_probe"))
    assert {linear_probe.lr_factor("layer1", STEPS)(s) for s in range(10_000)} == {0.0}

    # through fit: the LR of each epoch's last step (steps 1, 3, 5, 7: factors 0, 0.5, 1, 1)
    result = run(optim)
    for epoch, factor in enumerate([0.0, 0.5, 1.0, 1.0]):
        expected = {name: DECAYED[name] * (factor if name != "head" else 1.0) for name in CIFAR_GROUPS}
        assert lrs(result.metrics[epoch]) == pytest.approx(expected, rel=1e-12, abs=0), f"epoch {epoch}"


def test_the_per_step_lr_is_schedule_times_scale_times_factor():
    """Every step of a warmed-up gradual plan under cosine: the scheduler's LR of each optimiser group is
    lr × cosine(step) × lr_decay^depth × the plan's factor."""
    model = tiny_net()
    optim = finetune(
        strategy="gradual", lp_epochs=1, backbone_warmup_epochs=1, lr_decay=0.5, schedule="cosine"
    )
    plan = FinetunePlan.from_config(model, optim)
    optimizer = build_optimizer(model, optim, plan.param_groups(optim.lr, optim.weight_decay))
    factors = [plan.lr_factor(g["name"], STEPS) for g in optimizer.param_groups]
    scheduler = build_scheduler(optimizer, optim, STEPS, factors)
    total = optim.epochs * STEPS
    for step in range(total):
        cosine = 0.5 * (1 + math.cos(math.pi * step / total))
        for group in optimizer.param_groups:
            expected = DECAYED[group["name"]] * cosine * plan.lr_factor(group["name"], STEPS)(step)
            assert group["lr"] == pytest.approx(expected, rel=1e-12, abs=0), (step, group["name"])
        optimizer.step()
        scheduler.step()


def test_under_cosine_the_groups_keep_their_lr_decay_ratios():
    result = run(finetune(strategy="gradual", lp_epochs=0, lr_decay=0.5, schedule="cosine"))
    starts = {"head": 0, "layer3": 0, "layer2": 1, "layer1": 2, "stem": 2}
    depth = {name: d for d, name in enumerate(CIFAR_GROUPS)}
    for epoch, metrics in enumerate(result.metrics):
        last_step = (epoch + 1) * STEPS - 1
        head = 0.1 * 0.5 * (1 + math.cos(math.pi * last_step / (4 * STEPS)))
        assert metrics["lr_head"] == pytest.approx(head, rel=1e-12)
        for name in BACKBONE:
            ratio = metrics[f"lr_{name}"] / metrics["lr_head"]
            assert ratio == pytest.approx(0.5 ** depth[name] if epoch >= starts[name] else 0.0, abs=1e-12)


# ---------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, store: str, out: str, rewrap: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        if not rewrap:  # the control: keep the first DDP wrapper, built while only the head trained
            wrap, first = engine._wrap, []

            def wrap_once(model, world_size, compile, *, rewrap):
                if not first:
                    first.append(wrap(model, world_size, compile, rewrap=rewrap))
                return first[0]

            engine._wrap = wrap_once
        model = tiny_net()
        optim = finetune(strategy="gradual", lp_epochs=1, epochs=3)
        plan = FinetunePlan.from_config(model, optim)
        metrics: list[dict] = []
        fit(
            model,
            small_data(),
            optim,
            NO_AUGMENT,
            device=CPU,
            rank=rank,
            world_size=world_size,
            plan=plan,
            on_epoch_end=lambda m, state: metrics.append(m),
        )
        torch.save({"model": model.state_dict(), "metrics": metrics}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ddp(tmp_path, rewrap: bool) -> tuple[dict, dict]:
    """Two forked ranks: a spawned child would re-import torch and torchvision (a minute on a busy 2-core
    box); a fork has them already. Safe here: the children use one intra-op thread and nothing of the
    parent's but imported modules."""
    args = (2, str(tmp_path / "store"), str(tmp_path), rewrap)
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")
    return tuple(torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def test_ddp_rewrap_all_reduces_the_groups_unfrozen_mid_run(tmp_path):
    """Two gloo ranks, each on its own half of the data, gradual fine-tuning: the head from epoch 0, layer3
    from 1, layer2 from 2. The ranks end bit-identical, and layer3 and layer2 did move: their gradients were
    all-reduced, which needs the DDP wrapper rebuilt when they unfroze."""
    rank0, rank1 = run_ddp(tmp_path, rewrap=True)
    initial = tiny_net().state_dict()
    assert changed_keys(rank0["model"], rank1["model"]) == set()
    moved = changed_keys(initial, rank0["model"])
    assert moved == keys_of(tiny_net(), {"head", "layer3", "layer2"})
    assert [m["trainable_params"] for m in rank0["metrics"]] == [34, 34 + 3520, 34 + 3520 + 896]
    assert without_timings(rank0["metrics"]) == without_timings(rank1["metrics"])  # global metrics


def test_ddp_without_the_rewrap_the_ranks_drift_apart(tmp_path):
    """The control that shows the test above can fail: with the first wrapper kept (built while only the head
    trained), the later groups' gradients stay local and the ranks' weights diverge; the head, registered
    with DDP from the start, and the BN statistics (broadcast from rank 0 every forward) stay in step."""
    rank0, rank1 = run_ddp(tmp_path, rewrap=False)
    differing = changed_keys(rank0["model"], rank1["model"])
    model = tiny_net()
    learned = {n for n, _ in model.named_parameters() if group_of(n) in ("layer3", "layer2")}
    assert differing == learned


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "finetune_section, key",
    [
        ({"strategy": "lp_ft", "epochs": 4, "lp_epochs": 0}, "finetune.lp_epochs"),
        ({"strategy": "lp_ft", "epochs": 4, "lp_epochs": 4}, "finetune.lp_epochs"),
        ({"strategy": "lp_ft", "epochs": 4, "lp_epochs": 7}, "finetune.lp_epochs"),
        ({"strategy": "gradual", "epochs": 4, "lp_epochs": 4}, "finetune.lp_epochs"),
        ({"strategy": "gradual", "unfreeze_epochs": 0}, "finetune.unfreeze_epochs"),
        ({"strategy": "everything"}, "finetune.strategy"),
        ({"lr_decay": 0}, "finetune.lr_decay"),
        ({"lr_decay": 1.5}, "finetune.lr_decay"),
        ({"backbone_warmup_epochs": 1, "schedule": "onecycle"}, "finetune.backbone_warmup_epochs"),
        ({"backbone_warmup_epochs": -1}, "finetune.backbone_warmup_epochs"),
        ({"pretrained": "none"}, "finetune.model"),
        ({"pretrained": "none", "model": "resnet9000"}, "finetune.model"),
    ],
)
def test_finetune_config_rejects_naming_the_key(finetune_section, key):
    with pytest.raises(ConfigError) as caught:
        parse_config({"finetune": finetune_section}, "params.yaml")
    message = str(caught.value)
    assert message.startswith(f"params.yaml: {key}: ") and "\n" not in message


def test_finetune_config_accepts_the_edges():
    ok = [
        {"strategy": "lp_ft", "epochs": 4, "lp_epochs": 3},
        {"strategy": "gradual", "epochs": 4, "lp_epochs": 0},
        {"strategy": "linear_probe", "epochs": 1},
        {"backbone_warmup_epochs": 2, "schedule": "cosine", "lr_decay": 1.0},
        {"pretrained": "none", "model": "resnet20"},
    ]
    for section in ok:
        cfg = parse_config({"finetune": section, "tune": {"search_space": {}}}).finetune
        assert {k: getattr(cfg, k) for k in section} == section
