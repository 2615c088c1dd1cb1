"""Evaluate the tuned model on the held-out test split, in one plain PyTorch process (no Ray).

Outputs: metrics/eval.json (top-1/top-5 accuracy, loss, calibration error, macro and weighted precision/recall/F1,
the per-class report, and the sha256 of the model file scored), plots/confusion.csv (actual and predicted class of
every test image), plots/calibration.csv (the reliability table), plots/eval/*.png (confusion matrices, reliability
diagram, most confident mistakes, training curves). All also logged to an MLflow run named "evaluate".
A model trained on other data than the dataset it is asked to score on is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from resnet.config import Config

STAGE = "evaluate"
FIGURES = ("confusion_matrix.png", "confusion_matrix_normalized.png", "reliability.png", "worst_errors.png")
CURVES = "curves.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="prepared dataset (default: data/prepared/<finetune.dataset>)"
    )
    parser.add_argument("--model", default="models/tune/model.pt", help="model file (default: %(default)s)")
    parser.add_argument(
        "--best",
        default="models/tune/best.json",
        help="the tune stage's record of the best trial, for its curves (default: %(default)s)",
    )
    parser.add_argument("--metrics", default="metrics/eval.json", help="metrics file (default: %(default)s)")
    parser.add_argument(
        "--confusion", default="plots/confusion.csv", help="per-image predictions (default: %(default)s)"
    )
    parser.add_argument(
        "--calibration", default="plots/calibration.csv", help="reliability table (default: %(default)s)"
    )
    parser.add_argument(
        "--figures", default="plots/eval", help="PNG figures directory (default: %(default)s)"
    )


def run(
    cfg: Config,
    data: str | None = None,
    model: str = "models/tune/model.pt",
    best: str = "models/tune/best.json",
    metrics: str = "metrics/eval.json",
    confusion: str = "plots/confusion.csv",
    calibration: str = "plots/calibration.csv",
    figures: str = "plots/eval",
) -> dict:
    """Score `model` on `data`'s test split; returns the metrics written to `metrics`."""
    from resnet import evaluate as ev
    from resnet import plots
    from resnet.data.prepare import default_prepared_dir
    from resnet.io import atomic_dir, write_csv, write_json

    data_dir = data or default_prepared_dir(cfg.finetune.dataset)
    scores, meta, dataset = ev.score_model_file(model, data_dir)
    summary = ev.summary_metrics(scores) | {
        "model_sha256": ev.file_digest(model),
        "data_hash": dataset.content_hash,
    }
    ece, table = ev.calibration(scores)
    classes = scores.classes

    # Exactly this run's figures, nothing stale, and never some of them: they are drawn into a temporary
    # directory that takes the place of `figures` once the stage is done.
    with atomic_dir(figures) as figures_dir:
        matrix = ev.confusion(scores)
        plots.confusion_png(matrix, classes, figures_dir / FIGURES[0], normalize=False)
        plots.confusion_png(matrix, classes, figures_dir / FIGURES[1], normalize=True)
        plots.reliability_png(table, ece, figures_dir / FIGURES[2])
        worst = ev.worst_errors(scores)
        titles = [
            f"{classes[scores.labels[i]]} → {classes[scores.predicted[i]]} ({scores.probs[i].max():.2f})"
            for i in worst
        ]
        plots.image_grid_png(dataset.splits["test"].images[worst].numpy(), titles, figures_dir / FIGURES[3])
        rows = [
            {"actual": classes[a], "predicted": classes[p]}
            for a, p in zip(scores.labels, scores.predicted, strict=True)
        ]
        write_csv(confusion, rows, columns=("actual", "predicted"))
        write_csv(calibration, table, columns=("bin_low", "bin_high", "images", "confidence", "accuracy"))
        write_json(metrics, summary)

        # Imported only now: mlflow takes seconds to import, and a bad model or dataset should fail before that.
        from resnet.lineage import DatasetUse, record_lineage
        from resnet.tracking import start_stage_run

        run_handle = start_stage_run(cfg.mlflow, STAGE, dataset.content_hash)
        with run_handle:
            use = DatasetUse(cfg.finetune.dataset, str(data_dir), dataset.content_hash, ("test",))
            record_lineage(run_handle, cfg, STAGE, [use])
            run_handle.set_tags({"model.sha256": summary["model_sha256"]})
            curves = _training_curves(run_handle.client, best)
            if curves:
                plots.curves_png(curves, figures_dir / CURVES)
            run_handle.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
            run_handle.log_artifact(metrics)
            run_handle.log_artifact(confusion)
            run_handle.log_artifact(calibration)
            for png in sorted(figures_dir.glob("*.png")):
                run_handle.log_artifact(png, "evaluation")
            run_handle.client.log_text(
                run_handle.run_id, ev.classification_report_text(scores), "evaluation/report.txt"
            )
    print(
        f"{STAGE}: test accuracy {summary['test_acc']:.4f} (top-5 {summary['test_top5_acc']:.4f}), macro F1 "
        f"{summary['test_f1_macro']:.4f}, ECE {summary['test_ece']:.4f} on {summary['test_images']} images "
        f"→ {metrics}, {figures}/"
    )
    return summary


def _training_curves(client, best: str) -> dict:
    """{run label: {metric: [(epoch, value)]}} of the training run that made the model (the sweep's best
    trial, named in the tune stage's best.json), from MLflow; empty when there is no such record."""
    try:
        run_id = json.loads(Path(best).read_text()).get("mlflow_run_id")
    except (OSError, ValueError):
        return {}
    if not run_id:
        return {}
    names = ("train_loss", "val_loss", "train_acc", "val_acc")
    history = {name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)] for name in names}
    return {"best trial": history} if any(history.values()) else {}
