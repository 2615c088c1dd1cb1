"""Sweep fine-tuning schedules (finetune.* and augment.* drawn from tune.search_space) with Ray Tune + ASHA.

Each trial fine-tunes the starting weights (finetune.pretrained: the pretrain stage's model by default) in its
own TorchTrainer and is an MLflow child run of the sweep's run "tune". Running the stage again after it was
stopped resumes the sweep. Outputs: models/tune/model.pt (the best epoch of the best trial), models/tune/best.json
(its config, metrics and checkpoint), plots/sweep.csv (one row per trial), metrics/tune.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from resnet.config import Config

STAGE = "tune"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="prepared dataset (default: data/prepared/<finetune.dataset>)"
    )
    parser.add_argument(
        "--pretrained", default=None, help="the starting weights (default: finetune.pretrained in params)"
    )
    parser.add_argument(
        "--pretrain-model",
        default="models/pretrain/model.pt",
        help="the model that `pretrained: pretrain` means (default: %(default)s)",
    )
    parser.add_argument("--out", default="models/tune", help="output directory (default: %(default)s)")
    parser.add_argument(
        "--table",
        dest="table_path",
        metavar="TABLE",
        default="plots/sweep.csv",
        help="sweep table (default: %(default)s)",
    )
    parser.add_argument("--metrics", default="metrics/tune.json", help="metrics file (default: %(default)s)")
    parser.add_argument("--name", default=None, help="sweep name (default: tune-HASH of what decides it)")


def run(
    cfg: Config,
    data: str | None = None,
    pretrained: str | None = None,
    pretrain_model: str = "models/pretrain/model.pt",
    out: str = "models/tune",
    table_path: str = "plots/sweep.csv",
    metrics: str = "metrics/tune.json",
    name: str | None = None,
) -> dict:
    """Sweep, then copy the best trial's best epoch to `out`; returns the summary written to `metrics`."""
    import ray
    import torch

    from resnet.data.prepare import default_prepared_dir, read_manifest, resolve_location
    from resnet.distributed import (
        MODEL_FILE,
        TrainJob,
        copy_model_file,
        init_ray,
        run_fingerprint,
        storage_path,
    )
    from resnet.errors import PipelineError
    from resnet.io import write_csv, write_json
    from resnet.lineage import DatasetUse, record_lineage
    from resnet.pretrained import describe_source, load_pretrained
    from resnet.sweep import (
        best_checkpoint_path,
        close_trial_runs,
        describe_draw,
        run_sweep,
        split_draw,
        sweep_summary,
        sweep_table,
    )
    from resnet.tracking import resolve_tracking_uri, start_stage_run

    data = data or default_prepared_dir(cfg.finetune.dataset)
    manifest = read_manifest(data)
    source = pretrained or cfg.finetune.pretrained
    # `--pretrained pretrain` (what dvc.yaml passes): the pretrain stage's model file, which holds whatever
    # finetune.pretrained names (trained there, or taken from the source).
    origin = cfg.finetune.pretrained if source == "pretrain" else source
    torch.manual_seed(cfg.finetune.seed)  # the new head's initial weights, shared by every trial
    start = load_pretrained(
        source,
        len(manifest["classes"]),
        model=cfg.finetune.model,
        pretrain_path=pretrain_model,
        tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri),
    )
    data_hash = manifest["content_hash"]
    name = name or "tune-" + run_fingerprint(
        cfg.finetune.model_dump(),
        cfg.tune.model_dump(),
        cfg.augment.model_dump(),
        cfg.workers_per_trial,
        cfg.ray.use_gpu,
        data_hash,
        start.digest,
    )
    init_ray(cfg.ray, STAGE)
    storage = storage_path(cfg.ray)
    parent = start_stage_run(cfg.mlflow, STAGE, data_hash, resume_tags={"ray.run_name": name})
    with parent:
        # Params: what the sweep's name says it computes (a resumed sweep logs the same values again).
        # Tags: how it is executed, which may change between attempts.
        tune_params = cfg.tune.model_dump(exclude={"search_space"}) | {
            "workers_per_trial": cfg.workers_per_trial
        }
        parent.log_params(
            {"finetune": cfg.finetune.model_dump(), "tune": tune_params, "ray": {"use_gpu": cfg.ray.use_gpu}}
        )
        parent.log_params({f"search_space.{k}": v.model_dump() for k, v in cfg.tune.search_space.items()})
        parent.record_settings(STAGE, {"ray": cfg.ray.execution_settings()})
        use = DatasetUse(cfg.finetune.dataset, str(data), data_hash, ("train", "val"))
        record_lineage(parent, cfg, STAGE, [use], world_size=cfg.workers_per_trial, device=cfg.ray.device)
        parent.set_tags(
            {
                "pretrained": origin,
                "pretrained.kind": describe_source(origin),
                "pretrained.digest": start.digest,
            }
        )
        base = TrainJob(
            data_dir=resolve_location(data),
            optim={},
            augment=cfg.augment.model_dump(),
            kind="finetune",
            # Through the object store: every node's workers get the weights, not a path on this machine.
            init_weights=ray.put({"model_name": start.model_name, "model": start.model.state_dict()}),
            threads_per_worker=max(1, int(cfg.ray.cpus_per_worker)),
            stage="finetune",
            meta={"pretrained": origin},
        )
        print(
            f"{STAGE}: sweep {name} of {cfg.tune.num_samples} trials under {cfg.ray.storage_path}, from "
            f"{origin} ({start.model_name})",
            flush=True,
        )
        results, resumed = run_sweep(
            cfg, base, storage=storage, name=name, root=str(Path.cwd()), parent=parent
        )
        metric, mode = cfg.tune.metric, cfg.tune.mode
        table = sweep_table(results, cfg)
        close_trial_runs(parent, cfg.mlflow.experiment, table, metric)
        if all(row["error"] for row in table):
            raise PipelineError(f"tune: all {len(table)} trials failed; see the Ray logs above")
        best, checkpoint_path, best_epoch = best_checkpoint_path(results, metric, mode)
        meta = copy_model_file(storage.checkpoint(checkpoint_path), Path(out) / MODEL_FILE)
        best_row = next(row for row in table if row["trial_id"] == best_epoch["trial_id"])
        finetune_draw, augment_draw = split_draw(best.config or {})
        record = {
            "trial_id": best_row["trial_id"],
            "mlflow_run_id": best_row.get("mlflow_run_id"),
            "epoch": int(best_epoch["epoch"]),
            "config": {
                "finetune": cfg.finetune.model_dump() | finetune_draw,
                "augment": cfg.augment.model_dump() | augment_draw,
            },
            "metrics": meta["metrics"],
            "checkpoint": checkpoint_path,
            "sweep": name,
        }
        write_json(Path(out) / "best.json", record)
        write_csv(table_path, table)
        summary = sweep_summary(table) | {f"best_{metric}": meta["metrics"][metric], "resumed": resumed}
        write_json(metrics, summary)
        parent.log_metrics({k: v for k, v in summary.items() if not isinstance(v, bool)})
        parent.set_tags({"tune.best_trial": best_row["trial_id"], "tune.resumed": resumed})
        parent.log_artifact(table_path)
        parent.log_artifact(Path(out) / "best.json")
    print(
        f"{STAGE}: {summary['trials']} trials ({summary['stopped_early']} stopped early by ASHA, "
        f"{summary['failed']} failed; {summary['trial_epochs']}/{summary['budget_epochs']} trial-epochs); "
        f"best {metric} {summary[f'best_{metric}']:.4f}"
    )
    print(
        f"{STAGE}: best trial {best_row['trial_id']} epoch {record['epoch']} ({describe_draw(best.config)}) "
        f"→ {out}/{MODEL_FILE}"
    )
    return summary
