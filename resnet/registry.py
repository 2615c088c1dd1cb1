"""MLflow Model Registry: register the tuned model as a new version and decide on evidence which alias it gets.

The candidate and the current champion are scored on the same test images (the candidate's test split); the
champion alias moves only if the candidate is better on `register.metric` by more than `register.min_improvement`
and McNemar's exact test on their paired predictions is significant at `register.alpha`. Otherwise the new
version is the challenger, and the reason is a tag on it. A model file already registered (same sha256) is not
registered again. Each version carries a model card (its description) and tags linking it to its run, data and
commit.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from resnet.compare import Decision, decide, mcnemar_exact
from resnet.config import Config
from resnet.errors import PipelineError
from resnet.evaluate import Scores, file_digest, score, score_model_file, summary_metrics
from resnet.lineage import DatasetUse, git_state, pipeline_run_id, record_lineage
from resnet.tracking import resolve_tracking_uri, start_stage_run

# What MLflow prints while it registers: the stage says what happened in one line of its own instead.
REGISTRY_CHATTER = ("Successfully registered model ", "Registered model ", "Created version ")
DIGEST_TAG = "model.sha256"


@contextlib.contextmanager
def _registry_chatter_kept_out():
    """Drop MLflow's registration messages (printed to stderr) and its warning that an environment without pip
    has no pip version to record (nothing a user can act on); anything else printed is passed on."""
    environment_log = logging.getLogger("mlflow.utils.environment")
    level = environment_log.level
    environment_log.setLevel(logging.ERROR)
    # MLflow's download progress bars while it builds the logged model (its files are local, the bars noise).
    progress_bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
    finally:
        environment_log.setLevel(level)
        if progress_bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = progress_bar
        kept = [line for line in printed.getvalue().splitlines(True) if not line.startswith(REGISTRY_CHATTER)]
        sys.stderr.write("".join(kept))


def _version_with_digest(client, name: str, digest: str):
    """The registered version of this exact model file, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get(DIGEST_TAG) == digest), None)


def _aliases_of(client, name: str, version: str) -> list[str]:
    return list(client.get_model_version(name, version).aliases)


def _champion_scores(client, tracking_uri: str, cfg: Config, data) -> tuple[Scores, str] | None:
    """The current champion, re-scored on the candidate's test split (whatever split it was scored on when it
    was registered, so that both are compared on the same images); None when there is no champion."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name, alias = cfg.register.model_name, cfg.register.alias
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    uri = f"models:/{name}/{version.version}"
    mlflow.set_tracking_uri(tracking_uri)  # MLflow resolves models:/ in its global registry
    try:
        classifier = mlflow.pytorch.load_model(uri, map_location="cpu")
        classes = (mlflow.models.get_model_info(uri).metadata or {}).get("classes")
    except Exception as exc:  # noqa: BLE001 -- whatever MLflow raises, the decision cannot be made
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise PipelineError(
            f"{name}@{alias} (version {version.version}) cannot be loaded to compare with: {reason}"
        ) from None
    if list(classes or []) != list(data.classes):
        raise PipelineError(
            f"{name}@{alias} (version {version.version}) predicts classes {classes}, the candidate "
            f"{data.classes}: they cannot be compared; register under another register.model_name"
        )
    return score(classifier, classes, data), version.version


def _decision(cfg: Config, candidate: Scores, metrics: dict, champion: Scores | None) -> Decision:
    """`metrics`: the candidate's `summary_metrics`."""
    metric = cfg.register.metric
    mine = metrics[metric]
    if champion is None:
        return Decision(True, f"first version: no @{cfg.register.alias} to compare with", mine)
    return decide(
        metric,
        mine,
        summary_metrics(champion)[metric],
        mcnemar_exact(candidate.correct, champion.correct),
        min_improvement=cfg.register.min_improvement,
        alpha=cfg.register.alpha,
        lower_is_better=metric in cfg.register.LOWER_IS_BETTER,
    )


def model_card(name: str, version: str, alias: str, decision: Decision, facts: dict) -> str:
    """The version's description: what it is, what it was trained and scored on, why it has its alias."""
    m = facts["metrics"]
    draw = ", ".join(f"{k}={v}" for k, v in sorted(facts.get("trial_config", {}).items())) or "n/a"
    return "\n".join(
        [
            f"# {name} version {version} (@{alias})",
            "",
            f"**Decision**: {decision.reason}",
            "",
            f"**Model**: {facts['architecture']}, {len(facts['classes'])} classes "
            f"({', '.join(facts['classes'][:12])}{'…' if len(facts['classes']) > 12 else ''}), "
            f"{facts['image_size']}×{facts['image_size']} RGB input in [0, 1]; file sha256 `{facts['sha256']}`",
            f"**Started from**: {facts.get('pretrained', 'n/a')}",
            f"**Data**: {facts['dataset']} (content hash `{facts['data_hash']}`), test split of "
            f"{m['test_images']} images",
            f"**Fine-tuning (best trial)**: {draw}",
            "",
            f"**Test metrics**: accuracy {m['test_acc']:.4f}, top-5 {m['test_top5_acc']:.4f}, macro F1 "
            f"{m['test_f1_macro']:.4f}, loss {m['test_loss']:.4f}, ECE {m['test_ece']:.4f}",
            "",
            f"**Lineage**: MLflow run `{facts['run_id']}`, git commit `{facts.get('git.commit', 'n/a')}` "
            f"(dirty: {facts.get('git.dirty', 'n/a')}), pipeline run `{facts['pipeline_run_id']}`",
            "",
            f"Load: `mlflow.pytorch.load_model('models:/{name}@{alias}')`; serve: "
            f"`mlflow models serve -m models:/{name}@{alias} --env-manager local`",
        ]
    )


def register_model(
    model_path: str | Path, cfg: Config, *, data_dir: str | Path, best: dict | None = None
) -> dict:
    """Register the model file unless it is already; give it `champion` or `challenger` on the evidence.
    Returns the registration record the register stage writes."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from resnet.export import export_onnx
    from resnet.serving import log_model

    reg = cfg.register
    name = reg.model_name
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    client = MlflowClient(tracking_uri)
    digest = file_digest(model_path)
    candidate, meta, data = score_model_file(model_path, data_dir)
    existing = _version_with_digest(client, name, digest)
    if existing is not None:
        aliases = _aliases_of(client, name, existing.version)
        return {
            "name": name,
            "version": int(existing.version),
            "alias": aliases[0] if aliases else None,
            "model_uri": f"models:/{name}/{existing.version}",
            "run_id": existing.run_id,
            "registered": False,
            "model_sha256": digest,
            "reason": f"this model file is already version {existing.version}; nothing registered",
        }
    champion = _champion_scores(client, tracking_uri, cfg, data)
    metrics = summary_metrics(candidate)
    decision = _decision(cfg, candidate, metrics, champion[0] if champion else None)
    alias = reg.alias if decision.promote else reg.challenger_alias

    run = start_stage_run(cfg.mlflow, "register", data.content_hash)
    with run:
        run.log_params({"model_name": meta["model_name"], "num_classes": meta["num_classes"]})
        use = DatasetUse(cfg.finetune.dataset, str(data_dir), data.content_hash, ("test",))
        record_lineage(run, cfg, "register", [use])
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        run.set_tags({"register.decision": alias, "register.reason": decision.reason, DIGEST_TAG: digest})
        with tempfile.TemporaryDirectory() as scratch:
            # The ONNX export travels with the version (extra_files/model.onnx), checked against PyTorch.
            onnx = export_onnx(model_path, Path(scratch) / "model.onnx")
            run.set_tags({"onnx.max_abs_diff": onnx["max_abs_diff"], "onnx.opset": onnx["opset"]})
            mlflow.set_tracking_uri(tracking_uri)
            with mlflow.start_run(run_id=run.run_id), _registry_chatter_kept_out():
                info = log_model(
                    model_path, name="model", registered_model_name=name, extra_files=[onnx["path"]]
                )
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    facts = {
        "metrics": metrics,
        "architecture": meta["model_name"],
        "classes": list(meta["classes"]),
        "image_size": meta["image_size"],
        "sha256": digest,
        "pretrained": meta.get("pretrained"),
        "dataset": cfg.finetune.dataset,
        "data_hash": data.content_hash,
        "trial_config": (best or {}).get("config", {}).get("finetune", {}),
        "run_id": run.run_id,
        "pipeline_run_id": pipeline_run_id(),
        **git_state(),
    }
    client.update_model_version(name, version, description=model_card(name, version, alias, decision, facts))
    tags = {
        "decision": alias,
        "decision.reason": decision.reason,
        "decision.p_value": decision.p_value,
        "decision.champion_version": champion[1] if champion else None,
        reg.metric: decision.candidate,
        f"champion.{reg.metric}": decision.champion,
        "test_acc": metrics["test_acc"],
        "data.content_hash": data.content_hash,
        "architecture": meta["model_name"],
        "run_id": run.run_id,
        "git.commit": facts.get("git.commit"),
        DIGEST_TAG: digest,
        "classes": json.dumps(facts["classes"]),
    }
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, version, key, str(value))
    return {
        "name": name,
        "version": int(version),
        "alias": alias,
        "model_uri": f"models:/{name}@{alias}",
        "run_id": run.run_id,
        "registered": True,
        "model_sha256": digest,
        "test_acc": metrics["test_acc"],
        "decision": {
            "promoted": decision.promote,
            "reason": decision.reason,
            "metric": reg.metric,
            "candidate": decision.candidate,
            "champion": decision.champion,
            "champion_version": int(champion[1]) if champion else None,
            "p_value": decision.p_value,
        },
    }
