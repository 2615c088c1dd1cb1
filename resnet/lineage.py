"""Lineage: what each stage's MLflow run records about where its result came from.

Every stage run gets the validated config (flattened, as params), tags naming the code (git commit and whether
the working tree differed from it), the data (the prepared dataset's content hash and DVC's hash of it), the
pipeline state (a hash of dvc.lock), the libraries, the world size and the device, a `pipeline.run_id` shared by
the stage runs of one `dvc repro`, and the datasets as MLflow inputs (context training, validation or test).

Nothing here is allowed to carry a secret: URIs are logged with their password replaced by `***`, and the keys
of the environment (AWS, MLflow, Ray tokens) are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from resnet.config import Config
from resnet.tracking import RunHandle, flatten, redact

# Outputs that `dvc repro` itself rewrites: a working tree that differs from the commit only there is clean.
DVC_WRITTEN = ("dvc.lock", "metrics", "plots", "registry")
LIBRARIES = ("resnet-pipeline", "torch", "torchvision", "ray", "mlflow", "dvc", "numpy")
CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class DatasetUse:
    """A prepared dataset a stage read: its params.yaml name, its directory and the splits it used."""

    name: str
    path: str
    content_hash: str
    splits: tuple[str, ...]


def pipeline_run_id() -> str:
    """One id for the stage runs of one `dvc repro` (or `dvc exp run`, or `resnet-pipeline all`): derived from
    the dvc process that started this stage (its pid and start time on this host), else this process.
    RESNET_PIPELINE_RUN_ID overrides it."""
    given = os.environ.get("RESNET_PIPELINE_RUN_ID")
    if given:
        return given
    import psutil

    anchor = psutil.Process()
    for ancestor in anchor.parents():
        try:
            command = " ".join(ancestor.cmdline())
        except psutil.Error:
            continue
        if re.search(r"(^|[/\s])dvc(\s|$)", command):
            anchor = ancestor
            break
    seed = f"{socket.gethostname()}:{anchor.pid}:{anchor.create_time()}"
    return hashlib.sha256(seed.encode()).hexdigest()[:16]


def git_state(root: str | Path = ".") -> dict[str, str]:
    """{"git.commit", "git.dirty"}; empty outside a git repository (a submitted job's copy, an installed wheel)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    excluded = [f":(exclude){path}" for path in DVC_WRITTEN]
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    return {"git.commit": commit, "git.dirty": str(bool(changed)).lower()}


def dvc_lock_digest(root: str | Path = ".") -> str | None:
    lock = Path(root) / "dvc.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None


def dvc_digest(path: str | Path, root: str | Path = ".") -> str | None:
    """DVC's hash of an output (e.g. "3f2a….dir" for a directory) as dvc.lock records it; None if not there."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return None
    try:
        target = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:  # outside the repository (s3://, another directory): DVC does not track it here
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == target:
                return out.get("md5") or out.get("etag")
    return None


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[f"lib.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def config_params(cfg: Config) -> dict[str, str]:
    """The validated config, flattened, secrets redacted; without the Ray settings that say how a run is
    executed (they may change between the attempts of one run, and MLflow params cannot: they are tags)."""
    config = cfg.model_dump(mode="json")
    config["ray"] = cfg.ray.result_settings()
    return {key: redact(value) for key, value in flatten(config).items()}


def lineage_tags(
    stage: str,
    datasets: Iterable[DatasetUse],
    digests: dict[str, str | None],
    *,
    world_size: int,
    device: str,
) -> dict[str, str]:
    """`digests`: DVC's hash of each dataset by name (`dvc_digest`, None where dvc.lock has none)."""
    tags = {
        "pipeline.run_id": pipeline_run_id(),
        "pipeline.stage": stage,
        "world_size": str(world_size),
        "device": device,
        **git_state(),
        **library_versions(),
    }
    lock = dvc_lock_digest()
    if lock:
        tags["dvc.lock.sha256"] = lock
    for use in datasets:
        tags[f"data.{use.name}.content_hash"] = use.content_hash
        if digests[use.name]:
            tags[f"data.{use.name}.dvc_md5"] = digests[use.name]
    return {key: redact(value) for key, value in tags.items()}


def dataset_inputs(datasets: Iterable[DatasetUse], digests: dict[str, str | None]) -> list:
    """MLflow dataset inputs, one per (dataset, split), digest = DVC's hash where dvc.lock has it."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for use in datasets:
        dvc_md5 = digests[use.name]
        source = {"uri": redact(str(use.path)), "dvc_md5": dvc_md5, "content_hash": use.content_hash}
        for split in use.splits:
            dataset = Dataset(
                name=f"{use.name}-{split}",
                digest=(dvc_md5 or use.content_hash)[:36],
                source_type="dvc",
                source=json.dumps(source),
            )
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", CONTEXTS[split])]))
    return inputs


def record_lineage(
    run: RunHandle,
    cfg: Config,
    stage: str,
    datasets: Iterable[DatasetUse],
    *,
    world_size: int = 1,
    device: str = "cpu",
) -> None:
    """Tag `run` with its lineage, log the config params it does not hold yet (a resumed run keeps its first
    attempt's), and its dataset inputs. Call it after the stage's own `log_params`."""
    datasets = list(datasets)
    digests = {use.name: dvc_digest(use.path) for use in datasets}
    run.set_tags(lineage_tags(stage, datasets, digests, world_size=world_size, device=device))
    held = run.client.get_run(run.run_id).data.params
    run.log_params({key: value for key, value in config_params(cfg).items() if key not in held})
    run.client.log_inputs(run.run_id, datasets=dataset_inputs(datasets, digests))
