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
    parser.add_argument(
        "--run-name",
        default=None,
        help="Ray Train run name under ray.storage_path (default: pretrain-HASH of the config, data and code, "
        "so that running again after a stop resumes the run)",
    )


def run(args: argparse.Namespace) -> None:
    cfg = stage_config(args)
    from resnet.data.prepare import default_prepared_dir, read_manifest, resolve_location
    from resnet.distributed import (
        MODEL_FILE,
        TrainJob,
        copy_model_file,
        init_ray,
        make_trainer,
        run_fingerprint,
        storage_path,
    )
    from resnet.errors import PipelineError
    from resnet.io import write_json
    from resnet.tracking import start_stage_run

    args.data = args.data or default_prepared_dir(cfg.pretrain.dataset)
    manifest = read_manifest(args.data)  # fail on missing data before starting anything
    data_hash = manifest["content_hash"]
    run_name = args.run_name or "pretrain-" + run_fingerprint(
        cfg.pretrain.model_dump(), cfg.augment.model_dump(), cfg.ray.num_workers, cfg.ray.use_gpu, data_hash
    )
    init_ray(cfg.ray)
    storage = storage_path(cfg.ray)
    run_handle = start_stage_run(cfg.mlflow, STAGE, data_hash, resume_tags={"ray.run_name": run_name})
    with run_handle:
        run_handle.log_params({"pretrain": cfg.pretrain.model_dump(), "augment": cfg.augment.model_dump()})
        run_handle.log_params(
            {f"ray.{k}": v for k, v in cfg.ray.model_dump().items() if k not in ("address", "storage_path")}
        )
        job = TrainJob(
            data_dir=resolve_location(args.data),
            optim=cfg.pretrain.model_dump(),
            augment=cfg.augment.model_dump(),
            kind="pretrain",
            threads_per_worker=max(1, int(cfg.ray.cpus_per_worker)),
            mlflow_run=run_handle,
            stage=STAGE,
        )
        print(f"{STAGE}: Ray Train run {run_name} under {cfg.ray.storage_path}", flush=True)
        metric, mode = cfg.pretrain.metric, cfg.pretrain.mode
        trainer = make_trainer(job, cfg.ray, name=run_name, storage=storage, metric=metric, mode=mode)
        result = trainer.fit()
        if not result.best_checkpoints:
            raise PipelineError(f"{STAGE}: run {run_name} reported no checkpoint")
        pick = max if mode == "max" else min
        checkpoint, best = pick(result.best_checkpoints, key=lambda pair: pair[1][metric])
        meta = copy_model_file(checkpoint, Path(args.out) / MODEL_FILE)
        last = result.metrics or best
        summary = {
            "best_epoch": best["epoch"],
            "val_acc": best["val_acc"],
            "val_loss": best["val_loss"],
            "epochs": last["epoch"],
            "images_per_sec": last["images_per_sec"],
        }
        run_handle.log_metrics(
            {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"]}
        )
        identical = len({replica["params_sha256"] for replica in meta["replicas"]}) == 1
        run_handle.set_tags({"ray.run_name": run_name, "ddp.replicas_identical": identical})
        write_json(args.metrics, summary)
    print(f"{STAGE}: best epoch {best['epoch']}: val_acc {best['val_acc']:.4f} → {args.out}/{MODEL_FILE}")


def main(argv=None) -> int:
    return run_stage(STAGE, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
