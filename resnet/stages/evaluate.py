"""Evaluate the tuned model on the held-out test split, in one plain PyTorch process (no Ray).

Outputs: metrics/eval.json (test accuracy and loss, per-class accuracy), plots/confusion.csv (actual and
predicted class of every test image, for `dvc plots`). Also logged to an MLflow run named "evaluate".
"""

from __future__ import annotations

import argparse

from resnet.config import Config

STAGE = "evaluate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="prepared dataset (default: data/prepared/<finetune.dataset>)"
    )
    parser.add_argument("--model", default="models/tune/model.pt", help="model file (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/eval.json", help="metrics file (default: %(default)s)")
    parser.add_argument(
        "--confusion", default="plots/confusion.csv", help="per-image predictions (default: %(default)s)"
    )


def run(
    cfg: Config,
    data: str | None = None,
    model: str = "models/tune/model.pt",
    metrics: str = "metrics/eval.json",
    confusion: str = "plots/confusion.csv",
) -> dict:
    """Score `model` on `data`'s test split; returns the metrics written to `metrics`."""
    from resnet.data.prepare import default_prepared_dir
    from resnet.evaluate import evaluate_model_file
    from resnet.io import write_csv, write_json

    report = evaluate_model_file(model, data or default_prepared_dir(cfg.finetune.dataset))
    write_json(metrics, report.metrics)
    write_csv(confusion, report.predictions, columns=("actual", "predicted"))

    # Imported only now: mlflow takes seconds to import, and a bad model or dataset should fail before that.
    from resnet.tracking import start_stage_run

    run_handle = start_stage_run(cfg.mlflow, STAGE, report.data_hash)
    with run_handle:
        run_handle.log_metrics({k: v for k, v in report.metrics.items() if isinstance(v, int | float)})
        run_handle.log_artifact(metrics)
        run_handle.log_artifact(confusion)
    print(
        f"evaluate: test accuracy {report.metrics['test_acc']:.4f} on {report.metrics['test_images']} images"
    )
    return report.metrics
