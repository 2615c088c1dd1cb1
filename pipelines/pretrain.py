"""Train a ResNet from scratch (pretrain.*) with Ray Train: a TorchTrainer, DDP over ray.num_workers workers.

Outputs: models/pretrain/model.pt (the best epoch's weights by validation accuracy, with class names and
normalisation), metrics/pretrain.json. Per-epoch curves go to an MLflow run named "pretrain".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from resnet.cli import run_stage, stage_config

STAGE = "pretrain"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="prepared dataset (default: data/prepared/<pretrain.dataset>)"
    )
    parser.add_argument("--out", default="models/pretrain", help="output directory (default: %(default)s)")
    parser.add_argument(
        "--metrics", default="metrics/pretrain.json", help="metrics file (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> None:
    cfg = stage_config(args)
    from resnet.data.prepare import default_prepared_dir, read_manifest, resolve_location
    from resnet.distributed import MODEL_FILE, TrainJob, copy_model_file, init_ray, make_trainer, storage_path
    from resnet.io import write_json
    from resnet.tracking import start_stage_run

    args.data = args.data or default_prepared_dir(cfg.pretrain.dataset)
    manifest = read_manifest(args.data)  # fail on missing data before starting anything
    init_ray(cfg.ray)
    run_handle = start_stage_run(cfg.mlflow, STAGE, manifest["content_hash"])
    with run_handle:
        run_handle.log_params({"pretrain": cfg.pretrain.model_dump(), "augment": cfg.augment.model_dump()})
        run_handle.log_params({"ray.num_workers": cfg.ray.num_workers, "ray.use_gpu": cfg.ray.use_gpu})
        job = TrainJob(
            data_dir=resolve_location(args.data),
            optim=cfg.pretrain.model_dump(),
            augment=cfg.augment.model_dump(),
            kind="pretrain",
            threads_per_worker=max(1, int(cfg.ray.cpus_per_worker)),
            mlflow_run=run_handle,
        )
        trainer = make_trainer(
            job, cfg.ray, name=f"pretrain-{run_handle.run_id[:12]}", storage=storage_path(cfg.ray)
        )
        result = trainer.fit()
        checkpoint, best = result.best_checkpoints[0]
        copy_model_file(checkpoint, Path(args.out) / MODEL_FILE)
        summary = {"best_epoch": best["epoch"], "val_acc": best["val_acc"], "val_loss": best["val_loss"]}
        run_handle.log_metrics({f"best_{k}": v for k, v in summary.items()})
        write_json(args.metrics, summary)
    print(f"pretrain: best epoch {best['epoch']}: val_acc {best['val_acc']:.4f} → {args.out}/{MODEL_FILE}")


def main(argv=None) -> int:
    return run_stage(STAGE, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
