"""CPU efficiency of training: training FLOPs per image × images/s ÷ this machine's fp32 matmul rate. Goal ≥ 45%.

    uv run python benchmarks/cpu_efficiency.py [--model resnet20 resnet18_cifar] [--batch-sizes 128 256]
        [--image-size 32] [--threads 2] [--seconds 5] [--rounds 3] [--json PATH]

All three figures come from the same run:

- matmul rate: fp32 `torch.mm` of two `--matmul-size`² matrices (2048), 2·n³ FLOPs each, best of 3 per round;
- training FLOPs per image: counted exactly by `torch.utils.flop_counter.FlopCounterMode` over one forward and
  one backward (cross-entropy loss) of the model in train mode, divided by the batch. FlopCounterMode counts
  matmuls and convolutions (forward and backward), 2 FLOPs per multiply-add; BN, ReLU, pooling, additions and
  the SGD update are not counted. Compared with `resnet.models.flops_per_image` (forward, conv + linear);
- images/s: `engine.train_epoch` (the training loop's own step: crop-and-pad augmentation as in the default
  params, normalise, forward, backward, SGD update through `engine.Stepper`) in this one process with
  `--threads` threads, on one synthetic uint8 batch fed `n` times, n sized to take `--seconds`.

Every configuration (model × batch × NCHW/channels_last) and the matmul are timed in turn, `--rounds` times,
so that load from other processes falls on all of them alike; each figure is its best round. Not run by the
tests.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from resnet.config import PretrainConfig
from resnet.data.augment import BatchAugment
from resnet.data.loading import Normalize
from resnet.engine import Stepper, build_optimizer, build_scheduler, train_epoch
from resnet.models import build_model, flops_per_image

GOAL = 0.45


def matmul_gflops(a: torch.Tensor, b: torch.Tensor, reps: int = 3) -> float:
    best = math.inf
    for _ in range(reps):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * a.shape[0] ** 3 / best / 1e9


def count_flops(model_name: str, num_classes: int, image_size: int, batch: int = 2) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image, counted by FlopCounterMode in train mode."""
    model = build_model(model_name, num_classes).train()
    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.randint(0, num_classes, (batch,))
    with FlopCounterMode(display=False) as forward:
        logits = model(images)
    with FlopCounterMode(display=False) as backward:
        F.cross_entropy(logits, labels).backward()
    fwd = forward.get_total_flops()
    return fwd / batch, (fwd + backward.get_total_flops()) / batch


class Config:
    """One model × batch × memory format, ready to step: the engine's training step on a synthetic batch."""

    def __init__(self, model_name: str, batch: int, channels_last: bool, num_classes: int, image_size: int):
        self.model_name, self.batch, self.channels_last = model_name, batch, channels_last
        optim = PretrainConfig(model=model_name, batch_size=batch, channels_last=channels_last)
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = build_model(model_name, num_classes).to(memory_format=fmt)
        optimizer = build_optimizer(self.model, optim)
        self.stepper = Stepper(
            model=self.model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, optim, steps_per_epoch=1_000_000),
            scaler=torch.amp.GradScaler("cpu", enabled=False),
        )
        generator = torch.Generator().manual_seed(0)
        shape = (batch, 3, image_size, image_size)
        self.images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, num_classes, (batch,), generator=generator)
        self.augment = BatchAugment(num_classes=num_classes)  # the default params: pad 4 and crop, no flip
        self.normalize = Normalize((0.5,) * 3, (0.25,) * 3)
        self.steps = 2
        self.best = 0.0  # images/s
        self.loss = math.nan

    def run(self, steps: int) -> float:
        """Seconds for `steps` training steps through `engine.train_epoch`."""
        started = time.perf_counter()
        stats = train_epoch(
            self.model,
            [(self.images, self.labels)] * steps,
            self.stepper,
            self.normalize,
            self.augment,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(steps),
            channels_last=self.channels_last,
        )
        seconds = time.perf_counter() - started
        self.loss = stats.loss
        return seconds

    def warm_up(self, seconds: float) -> None:
        per_step = self.run(2) / 2
        self.steps = max(2, round(seconds / per_step))

    def time_round(self) -> None:
        self.best = max(self.best, self.steps * self.batch / self.run(self.steps))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", default=["resnet20", "resnet18_cifar"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--image-size", type=int, default=32, help="pixels (default: 32, CIFAR models)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    flops = {name: count_flops(name, args.num_classes, args.image_size) for name in args.model}
    configs = [
        Config(name, batch, channels_last, args.num_classes, args.image_size)
        for name in args.model
        for batch in args.batch_sizes
        for channels_last in (False, True)
    ]
    a, b = torch.randn(args.matmul_size, args.matmul_size), torch.randn(args.matmul_size, args.matmul_size)
    torch.mm(a, b)  # warm-up
    for config in configs:
        config.warm_up(args.seconds)
    peak = 0.0
    for _ in range(args.rounds):
        peak = max(peak, matmul_gflops(a, b))
        for config in configs:
            config.time_round()

    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.image_size} px, best of {args.rounds} "
        f"rounds of ~{args.seconds:g} s per configuration"
    )
    print(f"fp32 matmul {args.matmul_size}×{args.matmul_size}: {peak:,.1f} GFLOP/s")
    for name, (fwd, total) in flops.items():
        hooks = flops_per_image(build_model(name, args.num_classes), args.image_size)
        print(
            f"{name}: {fwd / 1e6:,.1f} MFLOP forward, {total / 1e6:,.1f} MFLOP forward+backward per image "
            f"({total / fwd:.2f}× forward); models.flops_per_image {hooks / 1e6:,.1f} MFLOP "
            f"(FLOPs = 2 × MACs, conv + linear; {hooks / fwd - 1:+.2%} vs FlopCounterMode forward)"
        )
    rows = []
    for config in configs:
        achieved = flops[config.model_name][1] * config.best / 1e9
        rows.append(
            {
                "model": config.model_name,
                "batch": config.batch,
                "memory_format": "channels_last" if config.channels_last else "NCHW",
                "images_per_sec": config.best,
                "gflops": achieved,
                "efficiency": achieved / peak,
                "steps_per_round": config.steps,
                "final_loss": config.loss,
            }
        )
    best = max(rows, key=lambda row: row["efficiency"])
    print(f"{'model':16s} {'batch':>5s} {'format':>13s} {'img/s':>8s} {'GFLOP/s':>8s} {'efficiency':>10s}")
    for row in rows:
        print(
            f"{row['model']:16s} {row['batch']:5d} {row['memory_format']:>13s} {row['images_per_sec']:8,.0f} "
            f"{row['gflops']:8.1f} {row['efficiency']:10.1%}{'  <- best' if row is best else ''}"
        )
        if not math.isfinite(row["final_loss"]):
            print(f"  warning: the loss became {row['final_loss']}: non-finite values may change the speed")
    print(
        f"best: {best['model']} batch {best['batch']} {best['memory_format']}: {best['efficiency']:.1%} of "
        f"the matmul rate (goal >= {GOAL:.0%}: {'met' if best['efficiency'] >= GOAL else 'NOT met'})"
    )
    if args.json:
        figures = {
            "torch": torch.__version__,
            "threads": args.threads,
            "image_size": args.image_size,
            "matmul_gflops": peak,
            "flops_per_image": {
                name: {"forward": fwd, "forward_backward": total} for name, (fwd, total) in flops.items()
            },
            "rows": rows,
            "best": best,
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
