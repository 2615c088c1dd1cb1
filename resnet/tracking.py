"""MLflow: where runs go, and a small handle for logging to one run from any process.

Embedded by default: a SQLite store and an artifact directory in the repository, no server. `mlflow.tracking_uri`
in params.yaml, or the standard `MLFLOW_TRACKING_URI`, points the same code at a tracking server.

Runs are addressed by id through `MlflowClient` rather than through mlflow's global "active run", because the
process that creates a run (a stage, a Tune trial) is often not the one that logs its epochs (Ray Train's rank 0).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from resnet.errors import PipelineError, first_line

# MLflow narrates its own housekeeping at INFO ("Creating initial MLflow database tables..."); a stage's output
# says what the stage did. Warnings and errors still show.
logging.getLogger("mlflow").setLevel(logging.WARNING)

# System metrics (CPU, memory, disk, network; GPU through nvidia-ml-py where there is one) of a training run:
# one sample every this many seconds (MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it).
SYSTEM_METRICS_INTERVAL_S = 5.0
EMBEDDED_DB = "mlruns.db"
EMBEDDED_ARTIFACTS = "mlartifacts"


def resolve_tracking_uri(configured: str | None, root: str | Path = ".") -> str:
    """params.yaml's value, else MLFLOW_TRACKING_URI, else the embedded SQLite store under `root`."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(root).resolve() / EMBEDDED_DB}"


def get_experiment_id(tracking_uri: str, name: str, root: str | Path = ".") -> str:
    """The experiment's id, creating it if needed. With the embedded SQLite store its artifacts go to
    `root/mlartifacts` (an absolute path, so that runs logged from Ray workers, whose working directory is
    elsewhere, land in the same place)."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):
        location = (Path(root).resolve() / EMBEDDED_ARTIFACTS).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and our create.
        return client.get_experiment_by_name(name).experiment_id


def git_commit(root: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@/\s]+@")


def redact(text: str) -> str:
    """`text` with the password of any URI in it replaced: postgresql://u:s3cret@h/db → postgresql://u:***@h/db."""
    return _URI_PASSWORD.sub(r"\g<head>:***@", text)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → MLflow params ("pretrain.lr" → "0.1")."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


@dataclass(frozen=True)
class RunHandle:
    """Enough to log to an existing run from any process: picklable, so it travels to Ray workers."""

    tracking_uri: str
    run_id: str
    resumed: bool = False  # an unfinished run reopened, rather than a new one

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten(params)
        items = list(flat.items())
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            batch = [mlflow.entities.Param(k, v) for k, v in items[start : start + 100]]
            self.client.log_batch(self.run_id, params=batch)

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None, timestamp_ms: int | None = None
    ) -> None:
        now = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        batch = [mlflow.entities.Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])

    def record_settings(self, stage: str, settings: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        """Settings that may differ between the attempts of one run (how it is executed, not what it computes)
        as tags with their current values. MLflow refuses to change a param, so these are never params. Returns
        and prints (one line) those that changed since the run's previous attempt: {key: (before, now)}."""
        before = self.client.get_run(self.run_id).data.tags
        now = {key: redact(value) for key, value in flatten(settings).items()}
        changed = {key: (before[key], value) for key, value in now.items() if before.get(key, value) != value}
        if changed:
            summary = ", ".join(f"{key} {old} → {new}" for key, (old, new) in changed.items())
            print(f"{stage}: resuming with changed execution settings: {summary}", flush=True)
            now["resume.changed_settings"] = summary
        self.set_tags(now)
        return changed

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> RunHandle:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FINISHED" if exc_type is None else "FAILED")


def start_run(
    tracking_uri: str,
    experiment: str,
    name: str,
    *,
    root: str | Path = ".",
    parent: RunHandle | None = None,
    tags: Mapping[str, Any] | None = None,
) -> RunHandle:
    """Create a run (a child of `parent` if given: it nests under it in the UI) and return its handle."""
    experiment_id = get_experiment_id(tracking_uri, experiment, root)
    all_tags = {"mlflow.runName": name, "mlflow.source.name": "resnet-pipeline"}
    commit = git_commit(root)
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    run = MlflowClient(tracking_uri).create_run(experiment_id, tags=all_tags, run_name=name)
    return RunHandle(tracking_uri, run.info.run_id)


def find_unfinished_run(tracking_uri: str, experiment: str, tags: Mapping[str, str]) -> RunHandle | None:
    """The newest run carrying all `tags` if it did not finish (failed, killed, or still marked running
    because its process died), reopened as RUNNING; else None."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs(
        [found.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs or runs[0].info.status == "FINISHED":
        return None
    client.update_run(runs[0].info.run_id, status="RUNNING")
    return RunHandle(tracking_uri, runs[0].info.run_id, resumed=True)


def start_stage_run(
    mlflow_cfg, stage: str, data_hash: str, *, resume_tags: Mapping[str, str] | None = None
) -> RunHandle:
    """The MLflow run of one pipeline stage (an `MlflowConfig` says where), tagged with the data it saw. With
    `resume_tags` (e.g. the Ray run name), an unfinished run carrying them is continued instead, so that a
    resumed training run keeps one curve in one MLflow run."""
    tracking_uri = resolve_tracking_uri(mlflow_cfg.tracking_uri)
    check_reachable(tracking_uri)
    # A server that answers but fails (5xx) is one line within seconds, not after MLflow's minutes of retries.
    with fail_fast(timeout_s=30, retries=2):
        try:
            if resume_tags:
                previous = find_unfinished_run(tracking_uri, mlflow_cfg.experiment, resume_tags)
                if previous is not None:
                    return previous
            return start_run(
                tracking_uri,
                mlflow_cfg.experiment,
                stage,
                tags={"pipeline.stage": stage, "data.content_hash": data_hash, **(resume_tags or {})},
            )
        except mlflow.exceptions.MlflowException as exc:
            raise PipelineError(tracking_error(tracking_uri, exc)) from None


def check_reachable(tracking_uri: str, timeout: float = 10.0) -> None:
    """A tracking server that does not answer at all is one line within `timeout` s (MLflow's client would
    retry for minutes first). Any HTTP answer counts: what it says is for the first real request. A database
    (postgresql://, mysql://, ...) gets one connection attempt."""
    if tracking_uri.split("://", 1)[0].split("+", 1)[0] in _DATABASES:
        _check_database(tracking_uri, timeout)
        return
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PipelineError(
            f"MLflow at {redact(tracking_uri)}: no answer ({reason}): expected a tracking server there "
            "(MLFLOW_TRACKING_URI or mlflow.tracking_uri)"
        ) from None


_DATABASES = ("postgresql", "mysql", "mssql")


def _check_database(uri: str, timeout: float) -> None:
    """MLflow retries a database it cannot connect to for ~100 s, warning each time; one attempt here."""
    import sqlalchemy

    timeouts = {"connect_timeout": int(timeout)} if uri.startswith(("postgresql", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=timeouts)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except ImportError as exc:
        raise PipelineError(
            f"MLflow's database {redact(uri)} needs a driver: {exc.name} is not installed"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = first_line(getattr(exc, "orig", None) or exc)
        raise PipelineError(
            f"MLflow's database at {redact(uri)}: cannot connect ({redact(reason)}): expected its "
            "address, user and password in mlflow.tracking_uri or MLFLOW_TRACKING_URI"
        ) from None


def tracking_error(tracking_uri: str, exc: mlflow.exceptions.MlflowException) -> str:
    """One line for a tracking server that refused or failed the stage's first request."""
    status = exc.get_http_status_code()
    where = f"MLflow at {redact(tracking_uri)}"
    if status == 401:
        return (
            f"{where} refused the credentials (401 Unauthorized): expected its user in "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if status == 403:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "(none)")
        return f"{where} denied user {user} (403 Forbidden): expected a user with rights on the experiment"
    failed = re.search(r"too many (5\d\d) error responses|error code (5\d\d)", str(exc))
    if failed:
        return (
            f"{where} failed the stage's requests ({failed[1] or failed[2]}, a server error, after retries): "
            "expected a working tracking server (its own log says what failed)"
        )
    return f"{where}: {redact(first_line(exc))[:300]}"


@contextlib.contextmanager
def fail_fast(timeout_s: int = 10, retries: int = 0) -> Iterator[None]:
    """MLflow requests in the block fail at once (or after `retries` quick retries, ~2 s for two) when the server
    does not answer or answers 5xx, instead of MLflow's retries with backoff (minutes): for callers that keep
    what they could not send and try again later, and for a stage's first requests."""
    names = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def system_metrics(run: RunHandle | None) -> Iterator[None]:
    """Sample this machine's CPU, memory, disk, network and GPUs into `run` (as `system/...` metrics) while the
    block runs: MLflow's monitor, started for a run addressed by id (it only starts itself for runs it made).
    A monitor that cannot start is a warning, never a failed training run. Its requests fail fast (`fail_fast`,
    for this whole process: a Ray Train worker): a server that is away neither holds training at its start
    (MLflow's retries, minutes) nor at its end; samples taken meanwhile are dropped, with MLflow's warning."""
    if run is None:
        yield
        return
    with fail_fast(), _monitoring(run):
        yield


@contextlib.contextmanager
def _monitoring(run: RunHandle) -> Iterator[None]:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run.run_id,
            sampling_interval=SYSTEM_METRICS_INTERVAL_S,
            resume_logging=True,  # a restarted worker group goes on counting steps
            tracking_uri=run.tracking_uri,
        )
        monitor.start()
    except Exception as exc:  # noqa: BLE001 -- metrics about the machine are not worth a training run
        logging.getLogger(__name__).warning("system metrics not recorded: %s", exc)
        yield
        return
    try:
        yield
    finally:
        monitor.finish()
