"""Sweep fine-tuning configurations (finetune.* overridden by tune.search_space) with Ray Tune + ASHA.

Each trial fine-tunes the pretrain checkpoint in its own TorchTrainer and is an MLflow child run of the sweep's
run "tune". Outputs: models/tune/model.pt (the best epoch of the best trial), models/tune/best.json (its config
and metrics), plots/sweep.csv (one row per trial), metrics/tune.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from resnet.cli import run_stage, stage_config

STAGE = "tune"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="prepared dataset (default: data/prepared/<finetune.dataset>)"
    )
    parser.add_argument(
        "--pretrained", default="models/pretrain/model.pt", help="model to fine-tune (default: %(default)s)"
    )
    parser.add_argument("--out", default="models/tune", help="output directory (default: %(default)s)")
    parser.add_argument("--table", default="plots/sweep.csv", help="sweep table (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/tune.json", help="metrics file (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    cfg = stage_config(args)
    from ray.train import Checkpoint

    from resnet.data.prepare import default_prepared_dir, read_manifest, resolve_location
    from resnet.distributed import MODEL_FILE, TrainJob, copy_model_file, init_ray, storage_path
    from resnet.errors import PipelineError
    from resnet.io import write_csv, write_json
    from resnet.sweep import best_checkpoint_path, close_trial_runs, max_epochs, run_sweep, sweep_table
    from resnet.tracking import start_stage_run

    args.data = args.data or default_prepared_dir(cfg.finetune.dataset)
    manifest = read_manifest(args.data)
    pretrained = Path(args.pretrained)
    if not pretrained.is_file():
        raise PipelineError(f"{pretrained}: no such model file; run the pretrain stage first")
    init_ray(cfg.ray)
    parent = start_stage_run(cfg.mlflow, STAGE, manifest["content_hash"])
    with parent:
        parent.log_params(
            {"finetune": cfg.finetune.model_dump(), "tune": cfg.tune.model_dump(exclude={"search_space"})}
        )
        parent.log_params({f"search_space.{k}": v.model_dump() for k, v in cfg.tune.search_space.items()})
        base = TrainJob(
            data_dir=resolve_location(args.data),
            optim={},
            augment=cfg.augment.model_dump(),
            kind="finetune",
            init_from=str(pretrained.resolve()),
            threads_per_worker=max(1, int(cfg.ray.cpus_per_worker)),
            stage="finetune",
        )
        storage = storage_path(cfg.ray)
        results = run_sweep(
            cfg,
            base,
            storage=storage,
            name=f"tune-{parent.run_id[:12]}",
            root=str(Path.cwd()),
            parent=parent,
        )
        metric, mode = cfg.tune.metric, cfg.tune.mode
        table = sweep_table(results, metric, mode, max_epochs(cfg))
        close_trial_runs(parent, cfg.mlflow.experiment, table, metric)
        if all(row["error"] for row in table):
            raise PipelineError(f"tune: all {len(table)} trials failed; see the Ray logs above")
        best, checkpoint_path = best_checkpoint_path(results, metric, mode)
        meta = copy_model_file(
            Checkpoint(checkpoint_path, filesystem=storage.filesystem), Path(args.out) / MODEL_FILE
        )
        best_config = cfg.finetune.model_dump() | best.config
        write_json(Path(args.out) / "best.json", {"config": best_config, "metrics": meta["metrics"]})
        write_csv(args.table, table)
        summary = {
            "trials": len(table),
            "stopped_early": sum(row["stopped_early"] for row in table),
            f"best_{metric}": meta["metrics"][metric],
        }
        write_json(args.metrics, summary)
        parent.log_metrics(summary)
        parent.log_artifact(args.table)
    stopped = summary["stopped_early"]
    print(
        f"tune: {len(table)} trials ({stopped} stopped early by ASHA); best {metric} {summary[f'best_{metric}']:.4f}"
    )
    print(f"tune: best config {best.config} → {args.out}/{MODEL_FILE}")


def main(argv=None) -> int:
    return run_stage(STAGE, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
