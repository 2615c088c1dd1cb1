"""Images per second of each `BatchAugment` option on one uint8 batch, and of the plain per-image loop over
the public torchvision v2 transforms that the per-image steps are equal to (bit for bit, same seed).

    uv run python benchmarks/augment_speed.py [--batch 256] [--size 32] [--repeats 7] [--threads 1]

Not run by the tests. Figures are the best of `--repeats` batches after one warm-up batch, the options timed in turn.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from resnet.data.augment import BatchAugment

OPTIONS: dict[str, dict] = {
    "crop+flip (fast path)": dict(hflip=True),
    "trivialaugment": dict(hflip=True, policy="trivialaugment"),
    "randaugment (2, 9)": dict(hflip=True, policy="randaugment"),
    "random_erasing 0.25": dict(hflip=True, random_erasing=0.25),
    "random_erasing 1.0": dict(hflip=True, random_erasing=1.0),
    "mixup 0.2": dict(hflip=True, mixup_alpha=0.2),
    "cutmix 1.0": dict(hflip=True, cutmix_alpha=1.0),
    "mixup 0.2 | cutmix 1.0": dict(hflip=True, mixup_alpha=0.2, cutmix_alpha=1.0),
    "trivialaugment + erasing 0.25 + mixup|cutmix": dict(
        hflip=True, policy="trivialaugment", random_erasing=0.25, mixup_alpha=0.2, cutmix_alpha=1.0
    ),
}
LOOP_BASELINES = ("trivialaugment", "randaugment (2, 9)", "random_erasing 0.25", "random_erasing 1.0")


def images_per_second(
    fns: list[Callable], images: torch.Tensor, labels: torch.Tensor, repeats: int
) -> list[float]:
    """Best-of-`repeats` images/s of each of `fns`, timed in turn batch by batch, so that load from other
    processes on the machine falls on all of them alike."""
    best = [math.inf] * len(fns)
    for seed in range(repeats + 1):
        for k, fn in enumerate(fns):
            generator = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            fn(images, labels, generator)
            if seed:  # seed 0 is the warm-up
                best[k] = min(best[k], time.perf_counter() - start)
    return [len(images) / seconds for seconds in best]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=generator
    )
    labels = torch.randint(0, 10, (args.batch,), generator=generator)

    print(f"batch uint8 {tuple(images.shape)}, {args.threads} thread(s), best of {args.repeats} batches")
    print(f"{'option':46s} {'BatchAugment img/s':>19s} {'per-image loop img/s':>21s} {'speed-up':>9s}")
    for name, options in OPTIONS.items():
        aug = BatchAugment(num_classes=10, **options)
        fns = [aug]
        if name in LOOP_BASELINES:
            fns.append(lambda x, y, g, aug=aug: aug.per_image_reference(x, y, g))
        fast, *slow = images_per_second(fns, images, labels, args.repeats)
        loop = speed_up = ""
        if slow:
            loop, speed_up = f"{slow[0]:21,.0f}", f"{fast / slow[0]:8.2f}x"
        print(f"{name:46s} {fast:19,.0f} {loop:>21s} {speed_up:>9s}")


if __name__ == "__main__":
    main()
