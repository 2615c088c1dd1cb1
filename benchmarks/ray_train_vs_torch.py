"""Ray Train DDP vs a plain PyTorch loop: training images/s with the same model, data, global batch and recipe.
Goal: Ray ≥ 0.95× plain.

    uv run python benchmarks/ray_train_vs_torch.py [--data data/prepared/fractals] [--model resnet20]
        [--batch-size 128] [--epochs 3] [--workers 2] [--no-channels-last] [--params params.yaml]
        [-S pretrain.lr=0.05] [--json PATH]

Both sides are measured in the same run, on the train split of the same prepared dataset (every image once per
epoch), with the params' recipe (`pretrain` and `augment`; the flags above override it):

- plain: one process, `torch.set_num_threads(workers)`, a loop written inline here (no Ray, no engine): build
  the model, SGD, and for each shuffled batch augment, normalise, forward, backward, step. It runs before
  Ray starts and again after Ray has shut down; its figure is the mean of the two (drift on a shared machine
  falls on both sides alike).
- ray: the pretrain stage's own path, `init_ray` + `make_trainer(TrainJob)` → TorchTrainer →
  `train_loop_per_worker` → `engine.fit`: `--workers` workers × 1 CPU × 1 thread, DDP over gloo, the global
  batch split over the workers, no MLflow run, Ray storage in a temporary directory.

Each side's figure is the mean of its per-epoch images/s over epochs 2..N (epoch 1 is warm-up): for Ray the
`images_per_sec` that `engine.fit` reports (training only: no validation, checkpoint or Ray start-up in it).
Ray's start-up and other overheads are printed separately. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resnet.cli import parse_override
from resnet.config import load_config
from resnet.data.augment import BatchAugment
from resnet.data.loading import Normalize, load_prepared
from resnet.data.prepare import default_prepared_dir, prepare_dataset
from resnet.models import build_model

# What the plain loop implements; a recipe that needs more would not be the same work on both sides.
PLAIN_RECIPE = {
    "optimizer": "sgd",
    "precision": "fp32",
    "accumulate_steps": 1,
    "ema_decay": 0.0,
    "grad_clip_norm": 0.0,
    "compile": False,
    "loader": "memory",
}


def plain_epochs(data_dir: str, cfg, epochs: int, threads: int) -> list[float]:
    """Images/s of each epoch of a plain single-process loop."""
    torch.set_num_threads(threads)
    optim = cfg.pretrain
    data = load_prepared(data_dir, splits=("train",))
    train = data.splits["train"]
    torch.manual_seed(optim.seed)
    fmt = torch.channels_last if optim.channels_last else torch.contiguous_format
    model = build_model(optim.model, data.num_classes).to(memory_format=fmt).train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=optim.lr,
        momentum=optim.momentum,
        nesterov=optim.nesterov,
        weight_decay=optim.weight_decay,
    )
    augment = BatchAugment.from_config(cfg.augment, data.num_classes)
    normalize = Normalize(data.mean, data.std)
    rates = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(epoch)
        started = time.perf_counter()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order), optim.batch_size):
            idx = order[start : start + optim.batch_size]
            images, targets = augment(train.images[idx], train.labels[idx], generator)
            logits = model(normalize(images).contiguous(memory_format=fmt))
            loss = F.cross_entropy(logits, targets, label_smoothing=optim.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rates.append(len(order) / (time.perf_counter() - started))
    return rates


def ray_epochs(data_dir: str, cfg) -> tuple[list[dict], dict[str, float]]:
    """Per-epoch metrics of the Ray Train run (in epoch order), and its overheads in seconds."""
    import ray

    from resnet.distributed import TrainJob, init_ray, make_trainer, storage_path

    started = time.perf_counter()
    init_ray(cfg.ray)
    init_seconds = time.perf_counter() - started
    try:
        job = TrainJob(
            data_dir=str(Path(data_dir).resolve()),
            optim=cfg.pretrain.model_dump(),
            augment=cfg.augment.model_dump(),
            threads_per_worker=max(1, int(cfg.ray.cpus_per_worker)),
            mlflow_run=None,
            stage="ray-benchmark",
        )
        trainer = make_trainer(job, cfg.ray, name="ray-train-vs-torch", storage=storage_path(cfg.ray))
        started = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
        time.sleep(5)  # Ray's processes (dashboard, raylet) take a few seconds to exit after shutdown
    # Every epoch's checkpoint is kept (ray.checkpoints_to_keep = epochs), so every epoch's metrics are here.
    metrics = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    epoch_seconds = sum(m["epoch_seconds"] for m in metrics)
    return metrics, {
        "ray_init_s": init_seconds,
        "trainer_fit_s": fit_seconds,
        "epochs_s": epoch_seconds,
        "other_s": fit_seconds - epoch_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", default=None, help="prepared dataset (default: data/prepared/<dataset>)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (default: 128)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per side, the first is warm-up")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers = plain loop's threads")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is warm-up)")

    with tempfile.TemporaryDirectory(prefix="ray-vs-torch-") as tmp:
        overrides = {
            "pretrain.model": args.model,
            "pretrain.batch_size": args.batch_size,
            "pretrain.epochs": args.epochs,
            "pretrain.channels_last": args.channels_last,
            "ray.num_workers": args.workers,
            "ray.cpus_per_worker": 1,
            "ray.use_gpu": False,
            "ray.checkpoints_to_keep": args.epochs,
            "ray.storage_path": str(Path(tmp, "ray")),
        }
        overrides |= dict(parse_override(text) for text in args.overrides)
        cfg = load_config(args.params, overrides)
        optim = cfg.pretrain
        differs = {k: getattr(optim, k) for k, v in PLAIN_RECIPE.items() if getattr(optim, k) != v}
        if differs:
            parser.error(f"the plain loop does not implement {differs}; it needs {PLAIN_RECIPE}")
        data_dir = args.data or default_prepared_dir(optim.dataset)
        if not Path(data_dir, "manifest.json").is_file():
            print(f"{data_dir}: not prepared; preparing {optim.dataset} into a temporary directory")
            data_dir = str(Path(tmp, "data"))
            prepare_dataset(optim.dataset, cfg.dataset(optim.dataset), data_dir)
        threads = cfg.ray.num_workers * max(1, int(cfg.ray.cpus_per_worker))

        plain_before = plain_epochs(data_dir, cfg, args.epochs, threads)
        ray_metrics, overheads = ray_epochs(data_dir, cfg)
        plain_after = plain_epochs(data_dir, cfg, args.epochs, threads)
        data = load_prepared(data_dir, splits=("train",))

    n_train, size = len(data.splits["train"]), int(data.splits["train"].images.shape[-1])
    workers = cfg.ray.num_workers
    ray_rates = [m["images_per_sec"] for m in ray_metrics]
    plain_rate = statistics.mean(plain_before[1:] + plain_after[1:])
    ray_rate = statistics.mean(ray_rates[1:])
    ratio = ray_rate / plain_rate

    def rates(values: list[float]) -> str:
        return ", ".join(f"{v:,.0f}" for v in values)

    print(f"data    {data_dir}: {n_train:,} train images, {size} px, {data.num_classes} classes")
    print(
        f"recipe  {optim.model}, global batch {optim.batch_size}, {args.epochs} epochs (epoch 1 = warm-up), "
        f"channels_last {'on' if optim.channels_last else 'off'}, {optim.precision}, SGD lr {optim.lr} "
        f"momentum {optim.momentum}, augment {cfg.augment.model_dump()}"
    )
    print(
        f"plain   1 process × {threads} threads, inline loop, {n_train:,} images/epoch: "
        f"epochs [{rates(plain_before)}] before Ray, [{rates(plain_after)}] after → {plain_rate:,.0f} img/s"
    )
    print(
        f"ray     {workers} workers × 1 CPU × {max(1, int(cfg.ray.cpus_per_worker))} thread, DDP gloo, "
        f"{optim.batch_size // workers} images per worker-step, "
        f"{workers * math.ceil(n_train / workers):,} images/epoch: epochs [{rates(ray_rates)}] → "
        f"{ray_rate:,.0f} img/s"
    )
    print(
        f"        ray.init {overheads['ray_init_s']:.1f} s; trainer.fit {overheads['trainer_fit_s']:.1f} s, "
        f"of which epochs (train + val) {overheads['epochs_s']:.1f} s, the rest (worker start-up, "
        f"checkpoints, shutdown) {overheads['other_s']:.1f} s"
    )
    print(f"ratio   {ratio:.3f}×  ray / plain  (goal >= 0.95×: {'met' if ratio >= 0.95 else 'NOT met'})")
    if args.json:
        figures = {
            "data": data_dir,
            "train_images": n_train,
            "model": optim.model,
            "global_batch": optim.batch_size,
            "epochs": args.epochs,
            "channels_last": optim.channels_last,
            "workers": workers,
            "plain_threads": threads,
            "plain_epoch_images_per_sec": {"before_ray": plain_before, "after_ray": plain_after},
            "ray_epoch_images_per_sec": ray_rates,
            "plain_images_per_sec": plain_rate,
            "ray_images_per_sec": ray_rate,
            "ratio": ratio,
            "ray_overheads_s": overheads,
            "torch": torch.__version__,
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
