"""Register the tuned model in the MLflow Model Registry; `champion` moves to it only on evidence.

The candidate and the current champion are scored on the same test split; the alias moves if the candidate is
better on register.metric by more than register.min_improvement and McNemar's exact test on their paired
predictions gives p < register.alpha. Otherwise the version is the challenger; the reason (both scores, the
p-value) is a tag on it and a line of output. A model file already registered is not registered again.

Outputs: registry/registered.json (name, version, alias, model URI, run id, the decision). Load the champion
with `mlflow.pytorch.load_model("models:/<register.model_name>@<register.alias>")`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from resnet.config import Config
from resnet.errors import PipelineError

STAGE = "register"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="prepared dataset (default: data/prepared/<finetune.dataset>)"
    )
    parser.add_argument("--model", default="models/tune/model.pt", help="model file (default: %(default)s)")
    parser.add_argument(
        "--best", default="models/tune/best.json", help="the tune stage's best trial (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-metrics", default="metrics/eval.json", help="evaluation metrics (default: %(default)s)"
    )
    parser.add_argument(
        "--out", default="registry/registered.json", help="registration record (default: %(default)s)"
    )


def run(
    cfg: Config,
    data: str | None = None,
    model: str = "models/tune/model.pt",
    best: str = "models/tune/best.json",
    eval_metrics: str = "metrics/eval.json",
    out: str = "registry/registered.json",
) -> dict:
    """Register `model`; returns the registration record written to `out`."""
    from resnet.data.prepare import default_prepared_dir
    from resnet.evaluate import file_digest
    from resnet.io import write_json

    try:
        metrics = json.loads(Path(eval_metrics).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{eval_metrics}: no such metrics file; run the evaluate stage first") from None
    if not Path(model).is_file():
        raise PipelineError(f"{model}: no such model file; run the tune stage first")
    scored, digest = metrics.get("model_sha256"), file_digest(model)
    if scored != digest:
        raise PipelineError(
            f"{eval_metrics}: scores model sha256 {str(scored)[:12]}…, but {model} is {digest[:12]}…; "
            "run the evaluate stage on this model first"
        )
    try:
        best_record = json.loads(Path(best).read_text())
    except (OSError, ValueError):
        best_record = None

    from resnet.registry import register_model

    record = register_model(
        model, cfg, data_dir=data or default_prepared_dir(cfg.finetune.dataset), best=best_record
    )
    write_json(out, record)
    name, version = record["name"], record["version"]
    if not record["registered"]:
        holds = f"@{record['alias']}" if record["alias"] else "no alias"
        print(f"{STAGE}: {name}: {record['reason']} ({holds})")
    elif record["decision"]["promoted"]:
        print(f"{STAGE}: {name} version {version} is now @{record['alias']}: {record['decision']['reason']}")
    else:
        print(
            f"{STAGE}: {name} version {version} is @{record['alias']}; @{cfg.register.alias} stays on version "
            f"{record['decision']['champion_version']}: {record['decision']['reason']}"
        )
    return record
