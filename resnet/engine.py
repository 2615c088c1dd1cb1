"""The training loop, plain PyTorch: the recipe (optimiser, schedule, precision, accumulation, clipping, EMA,
early stopping, seeding), one epoch of training, evaluation, resumable state, model files.

No Ray and no MLflow here (only torch and our data modules), so the same step runs on a GPU box without Ray,
in a plain single-process baseline, and inside a Ray Train worker (which only adds the process group and a
report callback). Under `torch.distributed` every metric is summed over ranks before it is returned, so rank
0's numbers describe the whole dataset, not its own shard.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from resnet.data.augment import BatchAugment, hard_labels, loss_fn
from resnet.data.loading import Normalize
from resnet.finetune import FinetunePlan
from resnet.io import atomic_path
from resnet.models import build_model
from resnet.pretrained import WEIGHTS_DIGEST, check_weights, state_dict_digest


class EpochStats:
    """Loss and accuracy sums over an epoch, kept on the training device: per-step values are added there and
    read back once at the end (reading a GPU scalar every step, `float(loss)`, would make the host wait for
    the GPU each step), and the end-of-epoch all-reduce sums a tensor on that device, as NCCL requires (it
    reduces CUDA tensors only; gloo takes CPU ones)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.count = 0
        self._sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss × images, correct)
        self._result: tuple[float, int] | None = None

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """`targets`: class indices, or (mixup/cutmix) class probabilities, counted by their largest class."""
        labels = hard_labels(targets)
        correct = (logits.argmax(1) == labels).sum()
        self._sums += torch.stack([loss.detach().double() * len(labels), correct.double()])
        self.count += len(labels)
        self._result = None

    def _totals(self) -> torch.Tensor:
        """(loss sum, correct, count) as one float64 tensor on the device."""
        count = torch.tensor([self.count], dtype=torch.float64, device=self.device)
        return torch.cat([self._sums, count])

    def all_reduce(self) -> EpochStats:
        """Sum over all ranks (a no-op outside torch.distributed), then read the totals back once."""
        totals = self._totals()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, correct, count = totals.tolist()
        self._result, self.count = (loss_sum, int(correct)), int(count)
        return self

    def _read(self) -> tuple[float, int]:
        if self._result is None:
            loss_sum, correct = self._sums.tolist()
            self._result = (loss_sum, int(correct))
        return self._result

    @property
    def loss_sum(self) -> float:
        return self._read()[0]

    @property
    def correct(self) -> int:
        return self._read()[1]

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. For a GPU the copy is asynchronous from pinned (page-locked) memory:
    `non_blocking=True` from ordinary pageable memory copies synchronously."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def prefetch(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """Yield `items` in order, computing up to `depth` of them ahead in a background thread (0: inline).

    On a GPU the next batch's augmentation runs on the CPU while the GPU computes the current step: torch
    releases the GIL inside its kernels, so the two overlap. One producer keeps the order (and so every seeded
    draw) exactly what it is without prefetching; an exception in the producer is raised here."""
    if depth <= 0:
        yield from items
        return
    done = object()
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((done, exc))

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weight decay on conv/linear weights only, none on BN and biases
    (decaying BN's scale fights the normalisation and slightly hurts accuracy; timm and torchvision do this)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, optim, groups: list[dict[str, Any]] | None = None
) -> torch.optim.Optimizer:
    """SGD (momentum, optionally Nesterov) or AdamW from an `OptimizerConfig`, over `groups` (default:
    `param_groups`; a fine-tuning plan gives per-layer groups with their own LRs)."""
    groups = groups if groups is not None else param_groups(model, optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))
    return torch.optim.SGD(
        groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov and optim.momentum > 0
    )


def with_warmup(warmup_steps: int, after: Callable[[int], float]) -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warmup from ~0 to 1 over `warmup_steps`, then `after(steps
    since the warmup)`."""
    return lambda step: (step + 1) / warmup_steps if step < warmup_steps else after(step - warmup_steps)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 0 at `total_steps`."""
    decay_steps = max(1, total_steps - warmup_steps)
    return with_warmup(warmup_steps, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s / decay_steps, 1.0))))


def warmup_step(warmup_steps: int, step_size: int, gamma: float) -> Callable[[int], float]:
    """Linear warmup, then × `gamma` every `step_size` steps (torchvision's StepLR after its warmup)."""
    return with_warmup(warmup_steps, lambda s: gamma ** (s // step_size))


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    return with_warmup(warmup_steps, lambda s: 1.0)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    optim,
    steps_per_epoch: int,
    group_factors: list[Callable[[int], float]] | None = None,
):
    """The LR schedule, stepped once per optimiser step. Every schedule multiplies each group's own LR, so
    groups with different LRs (layer-wise decay) keep their ratios. `group_factors` (one per optimiser group,
    from a fine-tuning plan) multiply the schedule per step: 0 while a group is frozen, its warmup ramp."""
    total, warmup = optim.epochs * steps_per_epoch, optim.warmup_epochs * steps_per_epoch
    if optim.schedule == "onecycle":
        # Momentum stays what the config says (cycle_momentum=False): one knob, one meaning.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total,
            pct_start=warmup / total if warmup else 0.3,
            cycle_momentum=False,
        )
    if optim.schedule == "step":
        factor = warmup_step(warmup, optim.lr_step_epochs * steps_per_epoch, optim.lr_step_gamma)
    elif optim.schedule == "constant":
        factor = warmup_constant(warmup)
    else:
        factor = warmup_cosine(total, warmup)
    if group_factors is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, group=group: factor(step) * group(step) for group in group_factors]
    )


class ModelEma:
    """An exponential moving average of a model's weights and BN statistics (timm's ModelEmaV3, TF's
    ExponentialMovingAverage): `decay` is ramped up as min(decay, (1 + n) / (10 + n)) over the first updates,
    so that on a short run the average is not dominated by the random initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, live = [], []
        for ema_value, value in zip(
            self.module.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if ema_value.is_floating_point():
                averaged.append(ema_value)
                live.append(value)
            else:  # BN's num_batches_tracked: a counter, not a weight
                ema_value.copy_(value)
        torch._foreach_lerp_(averaged, live, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


@dataclass
class EarlyStopping:
    """Stop when `metric` has not improved by more than `min_delta` for `patience` epochs (0: never)."""

    patience: int
    mode: str  # "max" or "min"
    min_delta: float = 0.0
    best: float | None = None
    epochs_without_improvement: int = 0

    def step(self, value: float) -> bool:
        """Record one epoch's value; True when training should stop."""
        if self.best is None:
            improved = True
        else:
            gain = value - self.best if self.mode == "max" else self.best - value
            improved = gain > self.min_delta
        if improved:
            self.best, self.epochs_without_improvement = value, 0
        else:
            self.epochs_without_improvement += 1
        return self.patience > 0 and self.epochs_without_improvement >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "epochs_without_improvement": self.epochs_without_improvement}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.epochs_without_improvement = state["best"], state["epochs_without_improvement"]


PREFETCH_BATCHES = 2  # training batches prepared ahead on the host while a GPU computes

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Mixed precision for the forward pass: bf16, or fp16 (which also needs a GradScaler); fp32: off."""
    return torch.autocast(
        device.type, dtype=AMP_DTYPES.get(precision, torch.bfloat16), enabled=precision != "fp32"
    )


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (dropout and anything else drawing from the global generators),
    as tensors and plain numbers, so that a checkpoint holding them loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": (has_gauss, cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], *numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    # random.setstate insists on tuples; a checkpoint round trip may hand back lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_determinism(deterministic: bool) -> None:
    """Deterministic kernels, or cuDNN autotuning (the fastest kernels for fixed shapes, chosen per run)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def set_train_mode(model: nn.Module, frozen_norms: Iterable[nn.Module] = ()) -> None:
    """Train mode, except that the `frozen_norms` (BatchNorm layers) keep using, and not updating, their
    running statistics."""
    model.train()
    for module in frozen_norms:
        module.eval()


def _mark_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs: the step loop must know a micro-batch ends the epoch before running it."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


@dataclass
class Stepper:
    """Everything that turns losses into weight updates: the optimiser and its schedule, the fp16 gradient
    scaler, gradient accumulation and clipping, and the EMA that follows each update."""

    model: nn.Module  # the unwrapped model (its parameters, and what the EMA follows)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    accumulate_steps: int = 1
    grad_clip_norm: float = 0.0
    ema: ModelEma | None = None
    grad_norms: list[float] = field(default_factory=list)  # before clipping, one per update (when clipping)
    last_lrs: list[float] = field(default_factory=list)  # each optimiser group's LR in the latest update

    def backward(self, loss: torch.Tensor) -> None:
        # Each micro-batch carries 1/accumulate_steps of the update; a short last group is rescaled in step().
        self.scaler.scale(loss / self.accumulate_steps).backward()

    def step(self, micro_batches: int) -> None:
        """One optimiser update from the gradients of the last `micro_batches` micro-batches."""
        if micro_batches != self.accumulate_steps:
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.mul_(self.accumulate_steps / micro_batches)
        if self.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradient, not the fp16-scaled one
            norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm))
            if math.isfinite(norm):  # an fp16 overflow: the scaler skips this step
                self.grad_norms.append(norm)
        self.last_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)


def train_epoch(
    net: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    stepper: Stepper,
    normalize: Normalize,
    augment: BatchAugment,
    *,
    label_smoothing: float = 0.0,
    device: torch.device,
    generator: torch.Generator,
    precision: str = "fp32",
    channels_last: bool = False,
    frozen_norms: Iterable[nn.Module] = (),
    prefetch_batches: int = 0,
) -> EpochStats:
    """One pass over `batches` of uint8 images: augment on the CPU (`prefetch_batches` ahead in a background
    thread, in pinned memory on a GPU), normalise on the device, forward in `precision`, and an optimiser
    update every `stepper.accumulate_steps` micro-batches (and at the end). Under DDP the gradient all-reduce
    runs only on the micro-batch that completes an update. Metrics are summed over all ranks."""
    set_train_mode(net, frozen_norms)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    stats = EpochStats(device)
    in_group = 0
    host_batches = _augmented(batches, augment, generator, pin=device.type == "cuda")
    for (images, targets), last in _mark_last(prefetch(host_batches, prefetch_batches)):
        images = normalize(to_device(images, device)).contiguous(memory_format=memory_format)
        targets = to_device(targets, device)
        in_group += 1
        updates = in_group == stepper.accumulate_steps or last
        sync = contextlib.nullcontext()
        ddp = getattr(net, "_orig_mod", net)  # torch.compile wraps the DDP module
        if not updates and isinstance(ddp, nn.parallel.DistributedDataParallel):
            sync = ddp.no_sync()  # gradients accumulate locally; the update's micro-batch all-reduces them
        with sync:
            with autocast(device, precision):
                logits = net(images)
            loss = loss_fn(logits.float(), targets, label_smoothing)
            stepper.backward(loss)
        if updates:
            stepper.step(in_group)
            in_group = 0
        stats.add(loss.detach(), logits.detach(), targets)
    return stats.all_reduce()


def _augmented(batches, augment: BatchAugment, generator: torch.Generator, *, pin: bool):
    """Training batches after augmentation (float images, hard or soft targets), still on the host."""
    for images, labels in batches:
        images, targets = augment(images, labels, generator)
        yield (images.pin_memory(), targets.pin_memory()) if pin else (images, targets)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    normalize: Normalize,
    *,
    device: torch.device,
    confusion: torch.Tensor | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> EpochStats:
    """Loss and accuracy over all ranks' shards; fills `confusion[true, predicted]` if given (this rank only)."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    stats = EpochStats(device)
    for images, labels in batches:
        images = normalize(to_device(images, device)).contiguous(memory_format=memory_format)
        labels = to_device(labels, device)
        with autocast(device, precision):
            logits = model(images).float()
        stats.add(nn.functional.cross_entropy(logits, labels), logits, labels)
        if confusion is not None:
            pairs = labels.cpu() * confusion.shape[1] + logits.argmax(1).cpu()
            confusion += torch.bincount(pairs, minlength=confusion.numel()).view_as(confusion)
    return stats.all_reduce()


@dataclass
class TrainState:
    """Everything needed to continue a run after the last finished epoch. `rng` is this rank's global RNG
    states; the rest is the same on every rank."""

    epoch: int  # the next epoch to run
    model: dict  # the live weights (with EMA on, `ema` holds the averaged ones)
    optimizer: dict
    scheduler: dict
    scaler: dict | None = None
    ema: dict | None = None
    early_stopping: dict | None = None
    rng: dict | None = None
    stopped: bool = False  # early stopping ended the run after `epoch` epochs


def fit(
    model: nn.Module,
    data,
    optim,
    augment,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    plan: FinetunePlan | None = None,
    resume: TrainState | None = None,
    on_epoch_end: Callable[[dict[str, float], TrainState], None] | None = None,
) -> nn.Module:
    """Train `model` for `optim.epochs` epochs on `data`'s train split, validating after every epoch.

    `data` is a `loading.PreparedData` (in memory) or anything with the same `train_steps`, `train_epoch`,
    `val_batches`, `mean`, `std` and `num_classes` (Ray Data's streaming shards). `optim` is an
    `OptimizerConfig` (the whole recipe), `augment` an `AugmentConfig` or a ready `BatchAugment`. `plan` (a
    `finetune.FinetunePlan`) says which layer groups train in which epoch and at what LR; without one, every
    parameter trains at `optim.lr`. Under
    torch.distributed the model is wrapped in DDP here; each rank trains on its shard in micro-batches of
    `batch_size // (world_size * accumulate_steps)` images. After each epoch `on_epoch_end(metrics, state)` is
    called on every rank (metrics are global, so every rank takes the same early-stopping decision); `state`
    holds the live tensors, so save or copy it there rather than keep it. Returns the trained model: the
    EMA of the weights when `optim.ema_decay` > 0, else `model` itself (unwrapped).
    """
    parts = world_size * optim.accumulate_steps
    if optim.batch_size % parts:
        raise ValueError(
            f"batch_size {optim.batch_size} is not a multiple of world_size × accumulate_steps "
            f"({world_size} × {optim.accumulate_steps}): the micro-batches would not add up to it"
        )
    micro_batch = optim.batch_size // parts
    set_determinism(optim.deterministic)
    memory_format = torch.channels_last if optim.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    ema = ModelEma(model, optim.ema_decay) if optim.ema_decay > 0 else None
    micro_steps = data.train_steps(micro_batch, world_size)
    steps_per_epoch = math.ceil(micro_steps / optim.accumulate_steps)
    if not isinstance(augment, BatchAugment):
        augment = BatchAugment.from_config(augment, data.num_classes)
    if plan is None:
        optimizer = build_optimizer(model, optim)
        scheduler = build_scheduler(optimizer, optim, steps_per_epoch)
    else:
        optimizer = build_optimizer(model, optim, plan.param_groups(optim.lr, optim.weight_decay))
        factors = [plan.lr_factor(group["name"], steps_per_epoch) for group in optimizer.param_groups]
        scheduler = build_scheduler(optimizer, optim, steps_per_epoch, factors)
    stepper = Stepper(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=optim.precision == "fp16"),
        accumulate_steps=optim.accumulate_steps,
        grad_clip_norm=optim.grad_clip_norm,
        ema=ema,
    )
    stopping = EarlyStopping(optim.early_stopping_patience, optim.mode, optim.early_stopping_min_delta)
    # Global generators (dropout) differ per rank; shuffling and augmentation use their own seeded generators.
    seed_everything(optim.seed * 1_000_003 + rank)
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        stepper.scheduler.load_state_dict(resume.scheduler)
        if resume.scaler:
            stepper.scaler.load_state_dict(resume.scaler)
        if ema is not None and resume.ema is not None:
            ema.load_state_dict(resume.ema)
        elif ema is not None:  # EMA switched on for a run saved without it: average from the resumed weights
            ema = stepper.ema = ModelEma(model, optim.ema_decay)
        if resume.early_stopping is not None:
            stopping.load_state_dict(resume.early_stopping)
        if resume.rng is not None:
            set_rng_state(resume.rng)
        start_epoch = optim.epochs if resume.stopped else resume.epoch
    normalize = Normalize(data.mean, data.std).to(device)
    net, wrapped_for = None, None
    for epoch in range(start_epoch, optim.epochs):
        training = plan.apply(model, epoch) if plan is not None else ("all",)
        if training != wrapped_for:
            # DDP registers the parameters that require gradients when it is built: a plan that unfreezes a
            # group needs a new wrapper, or the new group's gradients would never be all-reduced.
            net, wrapped_for = _wrap(model, world_size, optim.compile, rewrap=net is not None), training
        evaluated = ema.module if ema is not None else net
        # Augmentation randomness differs per rank and epoch but is reproducible from the seed.
        generator = torch.Generator().manual_seed(optim.seed * 100_003 + epoch * 1_009 + rank)
        started = time.perf_counter()
        stepper.grad_norms.clear()
        train_stats = train_epoch(
            net,
            data.train_epoch(micro_batch, epoch=epoch, seed=optim.seed, rank=rank, world_size=world_size),
            stepper,
            normalize,
            augment,
            label_smoothing=optim.label_smoothing,
            device=device,
            generator=generator,
            precision=optim.precision,
            channels_last=optim.channels_last,
            frozen_norms=plan.frozen_norms(epoch) if plan is not None else (),
            # A GPU would wait for the host's augmentation of each batch: prepare the next ones meanwhile.
            # A CPU has no spare cores for it here (the workers already use them all).
            prefetch_batches=PREFETCH_BATCHES if device.type == "cuda" else 0,
        )
        train_seconds = time.perf_counter() - started
        val_batches = data.val_batches(256, rank=rank, world_size=world_size)
        val_stats = evaluate(
            evaluated,
            val_batches,
            normalize,
            device=device,
            precision=optim.precision,
            channels_last=optim.channels_last,
        )
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_stats.loss,
            "train_acc": train_stats.accuracy,
            "val_loss": val_stats.loss,
            "val_acc": val_stats.accuracy,
            "lr": stepper.scheduler.get_last_lr()[0],
            "images_per_sec": train_stats.count / train_seconds,
            "epoch_seconds": time.perf_counter() - started,
        }
        if stepper.grad_norms:
            metrics["grad_norm"] = sum(stepper.grad_norms) / len(stepper.grad_norms)
        if (
            plan is not None
        ):  # each layer group's LR in the epoch's last update (0: frozen), and how much trained
            # A frozen group reports 0 whatever the schedule says (OneCycleLR knows no per-group factors).
            group_lrs: dict[str, float] = {}
            for group, lr in zip(optimizer.param_groups, stepper.last_lrs, strict=True):
                trains = any(p.requires_grad for p in group["params"])
                group_lrs[group["name"]] = max(group_lrs.get(group["name"], 0.0), lr if trains else 0.0)
            metrics |= {f"lr_{name}": lr for name, lr in group_lrs.items()}
            metrics["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            metrics["backbone_epochs"] = plan.backbone_epochs(epoch + 1)
        if ema is not None:  # the live weights too, to see what averaging gains
            live = evaluate(
                net,
                data.val_batches(256, rank=rank, world_size=world_size),
                normalize,
                device=device,
                precision=optim.precision,
                channels_last=optim.channels_last,
            )
            metrics |= {"live_val_loss": live.loss, "live_val_acc": live.accuracy}
        stop = stopping.step(metrics[optim.metric])
        if on_epoch_end is not None:
            state = TrainState(
                epoch=epoch + 1,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=stepper.scheduler.state_dict(),
                scaler=stepper.scaler.state_dict() if stepper.scaler.is_enabled() else None,
                ema=ema.state_dict() if ema is not None else None,
                early_stopping=stopping.state_dict(),
                rng=rng_state(),
                stopped=stop,
            )
            on_epoch_end(metrics, state)
        if stop:
            break
    return ema.module if ema is not None else model


def _wrap(model: nn.Module, world_size: int, compile: bool, *, rewrap: bool) -> nn.Module:
    """The module the training step calls: DDP over `model` under torch.distributed, compiled if asked."""
    if rewrap and compile:
        torch._dynamo.reset()  # drop the graphs (and their references) traced through the previous wrapper
    net = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    return torch.compile(net) if compile else net


# ---------------------------------------------------------------- model files


def save_model_file(path: str | Path, model: nn.Module | dict[str, Any], meta: dict[str, Any]) -> None:
    """Weights (a model or its state dict) plus what is needed to rebuild and feed the model (name, classes,
    normalisation) and the sha256 of the weights (`WEIGHTS_DIGEST`, checked by every load), written to a
    temporary file and renamed, so a reader never sees half a file. Loadable with `weights_only=True`. The same
    weights and meta give the same bytes (torch.save names the archive inside after the file it writes, here a
    random temporary name, so it saves to memory first), so that DVC sees an unchanged output as unchanged and
    does not re-run what depends on it."""
    weights = model.state_dict() if isinstance(model, nn.Module) else model
    meta = meta | {WEIGHTS_DIGEST: state_dict_digest(weights)}
    buffer = io.BytesIO()
    torch.save({"meta": meta, "model": weights}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved by `save_model_file` once its weights match their digest; returns (model in
    eval mode, meta)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    meta = blob["meta"]
    check_weights(path, meta, blob["model"])
    model = build_model(meta["model_name"], meta["num_classes"])
    model.load_state_dict(blob["model"], strict=True)
    return model.eval(), meta
