"""MLflow Model Registry: log a model file as an MLflow model, register a version, move the alias to it."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path

import numpy as np

from resnet.config import Config
from resnet.errors import PipelineError
from resnet.predict import load_classifier
from resnet.tracking import start_stage_run

# What MLflow prints while it registers: the stage says what happened in one line of its own instead.
REGISTRY_CHATTER = ("Successfully registered model ", "Registered model ", "Created version ")


@contextlib.contextmanager
def _registry_chatter_kept_out():
    """Drop MLflow's registration messages (printed to stderr) and its warning that an environment without pip
    has no pip version to record (nothing a user can act on); anything else printed is passed on."""
    environment_log = logging.getLogger("mlflow.utils.environment")
    level = environment_log.level
    environment_log.setLevel(logging.ERROR)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
    finally:
        environment_log.setLevel(level)
        kept = [line for line in printed.getvalue().splitlines(True) if not line.startswith(REGISTRY_CHATTER)]
        sys.stderr.write("".join(kept))


def register_model(model_path: str | Path, cfg: Config, *, test_metrics: dict) -> dict:
    """Log, register and alias the model; returns the registration record written by the register stage."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if not Path(model_path).is_file():
        raise PipelineError(f"{model_path}: no such model file; run the tune stage first")
    classifier, meta = load_classifier(model_path)
    name, alias = cfg.register.model_name, cfg.register.alias
    run = start_stage_run(cfg.mlflow, "register", meta["data_hash"])
    tracking_uri = run.tracking_uri
    # Batch of 2: MLflow's pt2 export marks the batch dimension dynamic only when the example's is > 1.
    size = meta["image_size"]
    example = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    with run:
        run.log_params({"model_name": meta["model_name"], "num_classes": meta["num_classes"]})
        run.log_metrics({k: v for k, v in test_metrics.items() if isinstance(v, int | float)})
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run.run_id), _registry_chatter_kept_out():
            info = mlflow.pytorch.log_model(
                classifier,
                name="model",
                input_example=example,
                registered_model_name=name,
                metadata={"classes": meta["classes"], "input": "float32 RGB in [0, 1], shape (N, 3, H, W)"},
            )
    version = int(info.registered_model_version)
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias(name, alias, version)
    for key, value in {
        "test_acc": test_metrics.get("test_acc"),
        "data.content_hash": meta["data_hash"],
        "architecture": meta["model_name"],
    }.items():
        if value is not None:
            client.set_model_version_tag(name, version, key, str(value))
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "model_uri": f"models:/{name}@{alias}",
        "run_id": run.run_id,
        "test_acc": test_metrics.get("test_acc"),
    }
