"""The weights fine-tuning starts from: train a ResNet from scratch (pretrain.*) with Ray Train, DDP over
ray.num_workers workers; or, when finetune.pretrained names another source (torchvision, a file, S3, MLflow,
none), take its weights without training.

Outputs: models/pretrain/model.pt (the best epoch's weights by validation accuracy, with class names and
normalisation; or the source's weights), metrics/pretrain.json. Per-epoch curves go to an MLflow run named
"pretrain". The tune stage fine-tunes from this file, so DVC sees one input whatever the source, and a change
of pretrain.* re-runs tune only if it changes these bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from resnet.config import Config

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


def take_starting_weights(cfg: Config, manifest: dict, out: str, metrics: str) -> dict:
    """finetune.pretrained names weights from elsewhere: hand them on as this stage's model file, untrained.
    `none` is the random init pretraining would start from (finetune.model, a head for the pretraining data's
    classes, drawn with pretrain.seed)."""
    import torch

    from resnet.engine import save_model_file
    from resnet.io import write_json
    from resnet.pretrained import describe_source, load_pretrained
    from resnet.tracking import resolve_tracking_uri

    source = cfg.finetune.pretrained
    torch.manual_seed(cfg.pretrain.seed)
    classes = len(manifest["classes"]) if source == "none" else None
    start = load_pretrained(
        source, classes, model=cfg.finetune.model, tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri)
    )
    meta = {
        "model_name": start.model_name,
        "num_classes": start.model.fc.out_features,
        "pretrained": source,
        "digest": start.digest,
    }
    save_model_file(Path(out) / "model.pt", start.model, meta)
    summary = {"pretrained": source, "kind": describe_source(source), **meta}
    write_json(metrics, summary)
    print(
        f"{STAGE}: finetune.pretrained is {source}: no pretraining; its weights ({start.model_name}, "
        f"{meta['num_classes']} classes, sha256 {start.digest[:12]}) → {out}/model.pt"
    )
    return summary


def run(
    cfg: Config,
    data: str | None = None,
    out: str = "models/pretrain",
    metrics: str = "metrics/pretrain.json",
    run_name: str | None = None,
) -> dict:
    """Train (or take) the starting weights into `out`/model.pt; returns the summary written to `metrics`."""
    from resnet.data.prepare import default_prepared_dir, read_manifest, resolve_location

    data = data or default_prepared_dir(cfg.pretrain.dataset)
    manifest = read_manifest(data)  # fail on missing data before starting anything
    if cfg.finetune.pretrained != "pretrain":
        return take_starting_weights(cfg, manifest, out, metrics)
    from resnet.distributed import (
        MODEL_FILE,
        ProgressPrinter,
        TrainJob,
        copy_model_file,
        init_ray,
        make_trainer,
        run_fingerprint,
        storage_path,
    )
    from resnet.errors import PipelineError
    from resnet.io import write_json
    from resnet.lineage import DatasetUse, record_lineage
    from resnet.tracking import start_stage_run

    data_hash = manifest["content_hash"]
    # The name says what the run computes, so that running the stage again after a stop finds the run and
    # resumes it, also after a change of how it is executed (ray.max_failures, placement, ...).
    run_name = run_name or "pretrain-" + run_fingerprint(
        cfg.pretrain.model_dump(), cfg.augment.model_dump(), cfg.ray.result_settings(), data_hash
    )
    init_ray(cfg.ray, STAGE)
    storage = storage_path(cfg.ray)
    run_handle = start_stage_run(cfg.mlflow, STAGE, data_hash, resume_tags={"ray.run_name": run_name})
    with run_handle:
        run_handle.log_params(
            {
                "pretrain": cfg.pretrain.model_dump(),
                "augment": cfg.augment.model_dump(),
                "ray": cfg.ray.result_settings(),
            }
        )
        run_handle.record_settings(STAGE, {"ray": cfg.ray.execution_settings()})
        use = DatasetUse(cfg.pretrain.dataset, str(data), data_hash, ("train", "val"))
        record_lineage(run_handle, cfg, STAGE, [use], world_size=cfg.ray.num_workers, device=cfg.ray.device)
        job = TrainJob(
            data_dir=resolve_location(data),
            optim=cfg.pretrain.model_dump(),
            augment=cfg.augment.model_dump(),
            kind="pretrain",
            threads_per_worker=max(1, int(cfg.ray.cpus_per_worker)),
            mlflow_run=run_handle,
            stage=STAGE,
        )
        verb = "resuming" if run_handle.resumed else "starting"
        print(
            f"{STAGE}: {verb} run {run_name}: {cfg.pretrain.model} on {cfg.pretrain.dataset}, "
            f"{cfg.pretrain.epochs} epochs, {cfg.ray.num_workers} workers; checkpoints under {cfg.ray.storage_path}",
            flush=True,
        )
        metric, mode = cfg.pretrain.metric, cfg.pretrain.mode
        progress = ProgressPrinter()
        trainer = make_trainer(
            job, cfg.ray, name=run_name, storage=storage, metric=metric, mode=mode, progress=progress
        )
        with progress.printing():
            result = trainer.fit()
        if not result.best_checkpoints:
            raise PipelineError(f"{STAGE}: run {run_name} reported no checkpoint")
        pick = max if mode == "max" else min
        checkpoint, best = pick(result.best_checkpoints, key=lambda pair: pair[1][metric])
        meta = copy_model_file(checkpoint, Path(out) / MODEL_FILE)
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
        if not identical:
            print(f"{STAGE}: warning: the DDP replicas ended with different weights: {meta['replicas']}")
        write_json(metrics, summary)
    print(f"{STAGE}: best epoch {best['epoch']}: val_acc {best['val_acc']:.4f} → {out}/{MODEL_FILE}")
    return summary
