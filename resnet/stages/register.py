"""Log the tuned model to MLflow with an input example, register it, and point the alias at the new version.

Outputs: registry/registered.json (name, version, alias, model URI, run id, test accuracy). Load the model with
`mlflow.pytorch.load_model("models:/<register.model_name>@<register.alias>")`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from resnet.config import Config
from resnet.errors import PipelineError

STAGE = "register"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/tune/model.pt", help="model file (default: %(default)s)")
    parser.add_argument(
        "--eval-metrics", default="metrics/eval.json", help="evaluation metrics (default: %(default)s)"
    )
    parser.add_argument(
        "--out", default="registry/registered.json", help="registration record (default: %(default)s)"
    )


def run(
    cfg: Config,
    model: str = "models/tune/model.pt",
    eval_metrics: str = "metrics/eval.json",
    out: str = "registry/registered.json",
) -> dict:
    """Register `model` with its test metrics; returns the registration record written to `out`."""
    from resnet.io import write_json
    from resnet.registry import register_model

    try:
        metrics = json.loads(Path(eval_metrics).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{eval_metrics}: no such metrics file; run the evaluate stage first") from None
    record = register_model(model, cfg, test_metrics=metrics)
    write_json(out, record)
    print(
        f"register: {record['name']} version {record['version']} is now @{record['alias']} ({record['model_uri']})"
    )
    return record
