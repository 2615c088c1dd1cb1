"""Input pipeline vs training: can the data path feed the default model with room to spare? Goal ≥ 5×.

    uv run python benchmarks/input_pipeline.py [--params params.yaml] [-S augment.policy=trivialaugment]
                                               [--threads 1] [--epochs 3] [--ray-data]

Both sides are measured in the same run, on the same prepared dataset (`pretrain.dataset` of the params,
prepared into a temporary directory), with the same number of threads (one Ray Train worker's share):

- input: the prepared Parquet shards decoded into uint8 tensors (once, as the memory loader does, its time
  spread over `--epochs`), then every epoch shuffled into batches of the per-worker batch size and augmented
  by `BatchAugment` with the params' `augment` section — batches ready to normalise and feed;
- training: the default model (`pretrain.model`) taking SGD steps (forward, backward, update) on batches of
  the same size, warm, with data already in memory.

With `--ray-data` it also times Ray Data's streaming path (a local Ray; shards read and decoded by Ray tasks,
batches from `iter_torch_batches`), which is dominated by task overhead on data this small.
Not run by the tests; the figures go to benchmarks/RESULTS.md with the command that made them.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from resnet.cli import parse_override
from resnet.config import load_config
from resnet.data.augment import BatchAugment
from resnet.data.loading import Normalize, load_prepared
from resnet.data.prepare import prepare_dataset
from resnet.engine import build_optimizer
from resnet.models import build_model


def input_images_per_second(data_dir: str, augment_cfg, batch_size: int, epochs: int) -> tuple[float, dict]:
    started = time.perf_counter()
    data = load_prepared(data_dir, splits=("train",))
    decode_seconds = time.perf_counter() - started
    augment = BatchAugment.from_config(augment_cfg, data.num_classes)
    seen, augment_seconds = 0, 0.0
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(epoch)
        started = time.perf_counter()
        for images, labels in data.train_epoch(batch_size, epoch=epoch, seed=0):
            batch, _ = augment(images, labels, generator)
            seen += len(batch)
        augment_seconds += time.perf_counter() - started
    total = decode_seconds + augment_seconds
    return seen / total, {"decode_s": decode_seconds, "batch_augment_s": augment_seconds, "images": seen}


def train_images_per_second(
    model_name: str, num_classes: int, image_size: int, batch_size: int, optim
) -> float:
    model = build_model(model_name, num_classes)
    model.train()
    optimizer = build_optimizer(model, optim)
    normalize = Normalize((0.5,) * 3, (0.25,) * 3)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=generator
    )
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(normalize(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):  # warm-up: allocator, kernels
        step()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < 10.0:
        step()
        steps += 1
    return steps * batch_size / (time.perf_counter() - started)


def ray_data_images_per_second(data_dir: str, batch_size: int, epochs: int) -> float:
    import ray

    from resnet.distributed import train_dataset

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dataset = train_dataset(data_dir, task_cpus=0.5)
        seen, started = 0, time.perf_counter()
        for _ in range(epochs):
            for batch in dataset.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=2048):
                seen += len(batch["label"])
        return seen / (time.perf_counter() - started)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default: 1)")
    parser.add_argument("--epochs", type=int, default=3, help="input epochs to time (default: 3)")
    parser.add_argument("--ray-data", action="store_true", help="also time the Ray Data streaming path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.params, dict(parse_override(text) for text in args.overrides))
    name = cfg.pretrain.dataset
    dataset = cfg.dataset(name)
    per_worker_batch = max(1, cfg.pretrain.batch_size // cfg.ray.num_workers)

    with tempfile.TemporaryDirectory() as tmp:
        manifest = prepare_dataset(name, dataset, tmp)
        input_rate, parts = input_images_per_second(tmp, cfg.augment, per_worker_batch, args.epochs)
        train_rate = train_images_per_second(
            cfg.pretrain.model, len(manifest["classes"]), dataset.image_size, per_worker_batch, cfg.pretrain
        )
        ray_rate = ray_data_images_per_second(tmp, per_worker_batch, args.epochs) if args.ray_data else None

    print(
        f"dataset {name} ({dataset.source}, {dataset.image_size}px, {parts['images'] // args.epochs} train images)"
    )
    print(f"model {cfg.pretrain.model}, batch {per_worker_batch} per worker, {args.threads} thread(s)")
    print(f"augment {cfg.augment.model_dump()}")
    print(
        f"input    {input_rate:10,.0f} img/s  (decode {parts['decode_s']:.3f} s once, "
        f"batch+augment {parts['batch_augment_s']:.3f} s for {args.epochs} epochs)"
    )
    print(f"training {train_rate:10,.0f} img/s")
    print(f"ratio    {input_rate / train_rate:10.1f}x  (goal >= 5x)")
    if ray_rate is not None:
        print(f"ray data {ray_rate:10,.0f} img/s  ({ray_rate / train_rate:.1f}x training)")


if __name__ == "__main__":
    main()
