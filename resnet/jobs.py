"""The pipeline as a Ray job: `resnet-pipeline submit` ships the checkout to a cluster, follows the job, and
brings its results back; `resnet-pipeline repro-job` is what the job runs there.

The job's round trip, with the DVC remote (an S3 prefix, `--remote` or RESNET_DVC_REMOTE) as the only shared
storage between the user's checkout and the cluster:

1. submit: the code, dvc.yaml, params.yaml, dvc.lock and the small uncached outputs (metrics, plots) go to Ray as
   the job's working directory — never .venv, caches, prepared data or models (SHIP_EXCLUDES, and .gitignore).
   The job's environment carries no secret: the cluster's nodes have their own credentials (environment, role).
2. repro-job, on the cluster: copies the working directory to a fresh directory (Ray extracts two identical
   submissions into one directory, the earlier job's files still in it), then `dvc pull` (what is already
   computed) and, stage by stage, `dvc repro --pull STAGE` → push of the stage's outputs and its entry in DVC's
   run cache, with `ray.storage_path` on S3 (`--storage`) so that any node reads the checkpoints; MLflow is the
   nodes' MLFLOW_TRACKING_URI. A job stopped midway has pushed every stage it finished: submitted again, DVC
   restores those from the run cache ("Stage ... is cached - skipping run") and the stopped stage resumes its
   Ray run from its checkpoints (the run's name is a hash of its config, data and code). Last it uploads the
   hand-back: dvc.lock and every file output of dvc.lock (metrics, plots, the registration record: DVC does not
   push uncached files), under REMOTE/jobs/JOB_ID/, with handback.json (each file's sha256) written last.
3. submit, once the job ended SUCCEEDED (anything else fails, also a STOPPED job, for which `ray job submit`
   itself exits 0): downloads the hand-back, checks every hash, writes the files into the checkout, and runs
   `dvc pull` from the remote, after which `dvc status` is clean: the checkout holds what the job computed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from resnet.errors import PipelineError

PROG = "resnet-pipeline"
REMOTE_NAME = "pipeline"  # the DVC remote both sides configure (in .dvc/config.local) for REMOTE
HANDBACK = "handback.json"
# Never shipped (besides what .gitignore names): environments, caches, data and models, local service state.
SHIP_EXCLUDES = [
    ".git",
    ".venv",
    "**/__pycache__",
    ".dvc/cache",
    ".dvc/tmp",
    ".dvc/config.local",
    "data/prepared",
    "models",
    "runs",
    "mlruns",
    "mlruns.db",
    "mlartifacts",
    ".stack",
    ".pytest_cache",
    ".ruff_cache",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """What both sides take: where the DVC remote and Ray's storage are, which stages, which overrides."""
    parser.add_argument(
        "--remote",
        default=os.environ.get("RESNET_DVC_REMOTE"),
        help="the DVC remote shared with the cluster, s3://BUCKET/PREFIX (default: $RESNET_DVC_REMOTE)",
    )
    parser.add_argument(
        "--storage",
        default=os.environ.get("RESNET_RAY_STORAGE"),
        help="ray.storage_path for the job, e.g. s3://BUCKET/runs (default: $RESNET_RAY_STORAGE)",
    )
    parser.add_argument(
        "--stage",
        dest="stages",
        action="append",
        default=[],
        metavar="STAGE",
        help="a stage to reproduce with what it depends on (repeatable; default: the whole pipeline)",
    )
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a param for the job (repeatable); params.yaml comes back with the change",
    )


def _remote(remote: str | None) -> str:
    if not remote:
        raise PipelineError("no DVC remote: give --remote s3://BUCKET/PREFIX or set RESNET_DVC_REMOTE")
    if not remote.startswith("s3://") or len(remote) <= len("s3://"):
        raise PipelineError(f"--remote {remote}: expected an S3 prefix, s3://BUCKET/PREFIX")
    return remote.rstrip("/")


def handback_uri(remote: str, job_id: str) -> str:
    return f"{remote}/jobs/{job_id}"


# ---- the client: submit, follow, hand back ----


def submit(
    checkout: Path,
    address: str | None,
    remote: str | None,
    storage: str | None = None,
    stages: Sequence[str] = (),
    overrides: Sequence[str] = (),
    pull: bool = True,
) -> str:
    """Submit the pipeline in `checkout` to the cluster at `address`, follow it to its end, and bring its results
    back into `checkout`. Returns the job's submission id."""
    remote = _remote(remote)
    _check_checkout(checkout, overrides)
    client = _job_client(address)
    job_id = f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    entrypoint = shlex.join(
        ["python", "-m", "resnet.cli", "repro-job", "--job-id", job_id, "--remote", remote]
        + (["--storage", storage] if storage else [])
        + [arg for stage in stages for arg in ("--stage", stage)]
        + [arg for override in overrides for arg in ("-S", override)]
    )
    runtime_env = {
        "working_dir": str(checkout),
        "excludes": SHIP_EXCLUDES,
        "env_vars": {"PYTHONUNBUFFERED": "1", "RESNET_PROGRESS": "0"},
    }
    # Ray logs every ignored file and the package upload at INFO: the job's own log says what happens.
    logging.getLogger("ray").setLevel(logging.ERROR)
    client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env)
    print(f"submit: job {job_id} submitted to {client.get_address()}; following its log", flush=True)
    status, message = follow(client, job_id)
    if status != "SUCCEEDED":
        first = message.strip().splitlines()[0] if message.strip() else ""  # Ray appends the log's tail
        raise PipelineError(f"job {job_id} ended {status}{': ' + first if first else ''} (its log is above)")
    print(f"submit: job {job_id} SUCCEEDED", flush=True)
    bring_back(checkout, remote, job_id, pull)
    return job_id


def bring_back(checkout: Path, remote: str | None, job_id: str, pull: bool = True) -> None:
    """The hand-back of job `job_id` (submitted here, or as a KubeRay RayJob) into `checkout`, then the models
    from the remote."""
    remote = _remote(remote)
    files = fetch_handback(handback_uri(remote, job_id), checkout)
    print(f"submit: back in this checkout from job {job_id}: {', '.join(files)}", flush=True)
    if pull:
        configure_remote(checkout, remote)
        dvc(checkout, "pull", "--remote", REMOTE_NAME)
        print(f"submit: pulled the job's outputs from {remote}", flush=True)


def _check_checkout(checkout: Path, overrides: Sequence[str]) -> None:
    from resnet.config import load_config

    for name in ("dvc.yaml", "params.yaml"):
        if not (checkout / name).is_file():
            raise PipelineError(f"{checkout / name}: no such file; run submit from the pipeline's checkout")
    load_config(checkout / "params.yaml", dict(_parse_override(text) for text in overrides))


def _parse_override(text: str) -> tuple[str, Any]:
    """`-S KEY=VALUE` as the stages' own option parses it (resnet.cli.parse_override), a bad one in one line."""
    from resnet.cli import parse_override

    try:
        return parse_override(text)
    except argparse.ArgumentTypeError:
        raise PipelineError(f"-S {text}: expected KEY=VALUE (e.g. pretrain.epochs=2)") from None


def _job_client(address: str | None):
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or not address.startswith(("http://", "https://")):
        raise PipelineError(
            f"--address {address or '(none)'}: expected the Ray job API, http://HEAD:8265 (or set RAY_ADDRESS)"
        )
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection refused, a refused token, a proxy's error page: one line each
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"cannot reach the Ray job API at {address}: {reason}") from None


def follow(client, job_id: str) -> tuple[str, str]:
    """Print the job's log as it comes; return its final status and message."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    while True:  # the log ends as the job ends; its status may take a moment longer to settle
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            return status, info.message or ""
        time.sleep(0.5)


def fetch_handback(uri: str, checkout: Path) -> list[str]:
    """Download the job's hand-back into `checkout`, every file checked against its recorded sha256 before
    any is written. Returns the files' paths."""
    from resnet.data.s3 import read_object

    try:
        record = json.loads(read_object(f"{uri}/{HANDBACK}"))
    except Exception as exc:
        raise PipelineError(f"{uri}/{HANDBACK}: the job left no hand-back ({exc})") from None
    contents = {}
    for path, digest in record["files"].items():
        data = read_object(f"{uri}/files/{path}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise PipelineError(
                f"{uri}/files/{path}: its sha256 differs from {HANDBACK}'s; nothing was written"
            )
        contents[path] = data
    from resnet.io import atomic_path

    for path, data in contents.items():
        with atomic_path(checkout / path) as tmp:
            tmp.write_bytes(data)
    return list(contents)


def configure_remote(root: Path, remote: str) -> None:
    """The DVC remote `pipeline` in root's .dvc/config.local (never committed), at the environment's S3
    endpoint when one is set (SeaweedFS, MinIO)."""
    dvc(root, "remote", "add", "--local", "--force", REMOTE_NAME, remote, quiet=True)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        dvc(root, "remote", "modify", "--local", REMOTE_NAME, "endpointurl", endpoint, quiet=True)


def dvc(root: Path, *args: str, quiet: bool = False, env: dict[str, str] | None = None) -> None:
    """Run DVC (this environment's) in `root`, with `env` added to the environment; its output streams
    through, a failure is one line."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = os.environ | (env or {}) | {"PATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.PIPE,
        text=True,
    )
    if done.returncode:
        sys.stderr.write(done.stderr)
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PipelineError(f"dvc {args[0]} failed in {root}: {last}")
    if not quiet and done.stderr:
        sys.stderr.write(done.stderr)


# ---- on the cluster: repro-job ----


def repro_job(
    job_id: str,
    remote: str | None,
    storage: str | None = None,
    stages: Sequence[str] = (),
    overrides: Sequence[str] = (),
    source: Path | None = None,
) -> Path:
    """In a fresh copy of `source` (the job's working directory): dvc pull, then each stage reproduced and
    pushed with its run, then the hand-back. Returns the copy."""
    remote = _remote(remote)
    source = source or Path.cwd()
    work = Path(tempfile.mkdtemp(prefix=f"{job_id}-"))
    shutil.copytree(source, work, dirs_exist_ok=True, ignore=_not_submitted)
    print(f"repro-job {job_id}: working copy {work}", flush=True)
    # The user's overrides go back with the results; ray.storage_path is how this job ran, not a result.
    handed_params = (
        edit_params(work / "params.yaml", [_parse_override(o) for o in overrides]) if overrides else None
    )
    if storage:
        edit_params(work / "params.yaml", [("ray.storage_path", storage)])
    if not (work / ".git").exists():
        dvc(work, "config", "--local", "core.no_scm", "true", quiet=True)
    configure_remote(work, remote)
    dvc(work, "remote", "default", "--local", REMOTE_NAME, quiet=True)  # where `repro --pull` finds runs
    # The stage runs of one submission share a pipeline run id, also across a stopped job and its re-submission.
    env = {
        "RESNET_PIPELINE_RUN_ID": os.environ.get("RESNET_PIPELINE_RUN_ID")
        or submission_digest(source, overrides)
    }
    _step(job_id, f"dvc pull from {remote} (what is already computed)")
    dvc(work, "pull", "--remote", REMOTE_NAME, "--allow-missing")
    for target in stages or pipeline_stages(work):
        _step(job_id, f"dvc repro {target}")
        lock = _read(work / "dvc.lock")
        dvc(work, "repro", "--pull", target, env=env)
        if _read(work / "dvc.lock") != lock:  # a stage ran (or came back from the run cache)
            push_stage_runs(work)
            _step(job_id, f"{target}: outputs and run cache pushed to {remote}")
    dvc(work, "push", "--remote", REMOTE_NAME, quiet=True)
    if handed_params is not None:
        (work / "params.yaml").write_text(handed_params)
    files = upload_handback(
        work, handback_uri(remote, job_id), extra=["params.yaml"] if handed_params else []
    )
    print(f"repro-job {job_id}: done; hand-back of {len(files)} files at {handback_uri(remote, job_id)}")
    return work


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def pipeline_stages(work: Path) -> list[str]:
    """dvc.yaml's stages in the order it lists them (a `foreach` group by its name: all of its stages)."""
    return list(yaml.safe_load((work / "dvc.yaml").read_text())["stages"])


def _not_submitted(directory: str, names: list[str]) -> set[str]:
    """What running in a job's working directory adds to it (bytecode, DVC's tmp): not copied, not hashed."""
    return {
        name for name in names if name == "__pycache__" or (name == "tmp" and Path(directory).name == ".dvc")
    }


def submission_digest(source: Path, overrides: Sequence[str] = ()) -> str:
    """A hash of what was submitted: every file of the job's working directory and the overrides. A stopped
    job submitted again gets the same one."""
    digest = hashlib.sha256("\0".join(overrides).encode())
    for directory, dirs, files in os.walk(source):  # top-down, each level sorted
        dirs[:] = sorted(set(dirs) - _not_submitted(directory, dirs))
        for name in sorted(files):
            path = Path(directory, name)
            digest.update(path.relative_to(source).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def push_stage_runs(work: Path) -> None:
    """Push DVC's run cache and every output its runs name, `cache: false` ones included, to the remote:
    what `dvc repro --pull` restores a finished stage from. (`dvc push --run-cache` pushes the run entries and
    the cached outputs only: a stage with a metrics file would run again.)"""
    from dvc.repo import Repo

    with contextlib.chdir(work), Repo(str(work)) as repo:  # run entries name paths from the cwd
        runs = repo.stage_cache.push(REMOTE_NAME)
        failed = set()
        for objs in repo.stage_cache.get_used_objs(runs).values():
            failed |= repo.cloud.push(objs, remote=REMOTE_NAME).failed
    if failed:
        names = ", ".join(sorted(str(obj.obj_name or obj.value) for obj in failed))
        raise PipelineError(f"dvc could not push {len(failed)} outputs to the remote: {names}")


def _step(job_id: str, what: str) -> None:
    print(f"repro-job {job_id}: {what}", flush=True)


def edit_params(path: Path, settings: Sequence[tuple[str, Any]]) -> str:
    """Set dotted keys in the params file at `path`, keeping its comments and order (as `dvc exp run -S`
    does), and validate the result; returns the new text."""
    from ruamel.yaml import YAML

    from resnet.config import load_config

    document = YAML()  # round trip: comments, order and quoting kept
    data = document.load(path.read_text()) or {}
    for dotted, value in settings:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    buffer = io.StringIO()
    document.dump(data, buffer)
    path.write_text(buffer.getvalue())
    load_config(path)
    return buffer.getvalue()


def handback_files(work: Path) -> list[str]:
    """dvc.lock and every file (not directory) output it records: what `dvc pull` cannot bring back."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    outs = {
        out["path"]
        for stage in lock.get("stages", {}).values()
        for out in stage.get("outs", [])
        if (work / out["path"]).is_file()
    }
    return ["dvc.lock", *sorted(outs)]


def upload_handback(work: Path, uri: str, extra: Sequence[str] = ()) -> list[str]:
    from resnet.data.s3 import upload_file

    files = [*handback_files(work), *extra]
    record = {"files": {}}
    for path in files:
        upload_file(work / path, f"{uri}/files/{path}")
        record["files"][path] = hashlib.sha256((work / path).read_bytes()).hexdigest()
    manifest = work / ".dvc" / "tmp" / HANDBACK
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(record, indent=2))
    upload_file(manifest, f"{uri}/{HANDBACK}")  # last: its presence says the hand-back is complete
    return files


# ---- the commands ----


def main(argv: Sequence[str] | None = None) -> int:
    """`resnet-pipeline submit`."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} submit",
        description="Run the pipeline (dvc repro) on a Ray cluster as a job, follow its log, and bring its results "
        "back: dvc.lock and the metrics into this checkout, the models through `dvc pull` from the remote.",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="the cluster's job API, http://HEAD:8265 (default: $RAY_ADDRESS); token from $RAY_AUTH_TOKEN",
    )
    parser.add_argument("--no-pull", dest="pull", action="store_false", help="do not `dvc pull` the outputs")
    parser.add_argument(
        "--fetch",
        metavar="JOB_ID",
        default=None,
        help="submit nothing: bring back the results of the finished job JOB_ID (e.g. a KubeRay RayJob's)",
    )
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)
    if args.fetch:
        return _run("submit", lambda: bring_back(Path.cwd(), args.remote, args.fetch, args.pull))
    return _run(
        "submit",
        lambda: submit(
            Path.cwd(), args.address, args.remote, args.storage, args.stages, args.overrides, args.pull
        ),
    )


def repro_job_main(argv: Sequence[str] | None = None) -> int:
    """`resnet-pipeline repro-job` (what a submitted job runs)."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} repro-job",
        description="On the cluster: in a fresh copy of this directory, dvc pull, dvc repro, dvc push, and leave "
        "the hand-back (dvc.lock, metrics) for `submit` under REMOTE/jobs/JOB_ID.",
    )
    parser.add_argument("--job-id", required=True, help="the submission id (names the hand-back)")
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)
    return _run(
        "repro-job", lambda: repro_job(args.job_id, args.remote, args.storage, args.stages, args.overrides)
    )


def _run(command: str, action) -> int:
    try:
        action()
    except PipelineError as err:
        print(f"{PROG} {command}: error: {err}", file=sys.stderr)
        return 2
    return 0
