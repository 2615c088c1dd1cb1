"""What the integration tests that run stages as subprocesses share: a stage's environment and a poll."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def stage_command(stage: str, work: Path, data: Path, **outputs: str) -> list[str]:
    """`python -m pipelines.<stage>` with work/params.yaml, `data`, and `--name value` per output (under work)."""
    command = [sys.executable, "-m", f"pipelines.{stage}", "--params", str(work / "params.yaml")]
    command += ["--data", str(data)]
    for option, name in outputs.items():
        command += [f"--{option}", str(work / name)]
    return command


REPO = Path(__file__).resolve().parent.parent


def own_env() -> dict[str, str]:
    """This process's environment without its MLflow settings and Ray address: what a stage run from a test
    starts from, so that it uses only the store and cluster the test gives it."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}


def listening(root_pid: int) -> set[tuple[str, int]]:
    """(address, port) of each TCP socket that process `root_pid` or one of its descendants listens on."""
    import psutil

    root = psutil.Process(root_pid)
    tree = {root_pid, *(child.pid for child in root.children(recursive=True))}
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in tree
    }


def run_stage_ok(command: list[str], env: dict[str, str], timeout: float = 600) -> str:
    """Run a stage command from the repository root; fail with its output's tail unless it exits 0. Returns
    its stdout and stderr together."""
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return output


def stage_env(ray_address: str, work: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a stage run: the session's Ray cluster, an MLflow store in `work`."""
    env = own_env()
    return env | {
        "RAY_ADDRESS": ray_address,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "RESNET_PROGRESS": "0",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll `condition` until it returns something true (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def copy_project(repo_root: Path, work: Path, params: dict, ray_address: str) -> dict[str, str]:
    """A git + DVC copy of the project in `work` (its code, dvc.yaml, DVC's config) with `params` as its
    params.yaml; returns the environment `dvc repro` runs in there: the session's Ray cluster and the embedded
    MLflow store (mlruns.db in the copy)."""
    import shutil

    import yaml

    for name in ("resnet", "pipelines"):
        shutil.copytree(repo_root / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        if (repo_root / name).exists():
            shutil.copy(repo_root / name, work / name)
    (work / ".dvc").mkdir()
    shutil.copy(repo_root / ".dvc" / "config", work / ".dvc" / "config")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    env = own_env()
    return env | {
        "RAY_ADDRESS": ray_address,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # dvc.yaml's `python`
        "PYTHONUNBUFFERED": "1",
    }


def ray_train_logs(newer_than: float, lines: int = 15) -> str:
    """The last `lines` of each Ray Train controller's log on this process's Ray node written since
    `newer_than` (time.time()): where a run stood when a test timed out waiting for it."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "train"
    tails = []
    for log in sorted(logs.glob("ray-train-sys-controller-*.log")):
        if log.stat().st_mtime >= newer_than:
            tails.append(
                "\n".join([f"--- {log.name}", *map(_log_record, log.read_text().splitlines()[-lines:])])
            )
    return "\n".join(tails)


def _log_record(line: str) -> str:
    """A line of a Ray Train log (a JSON object) as its time, level and message."""
    import json

    try:
        record = json.loads(line)
        return f"{record['asctime']} {record['levelname']} {record['message'][:300]}"
    except (ValueError, KeyError, TypeError):
        return line[:300]
