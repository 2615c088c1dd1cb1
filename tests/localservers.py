"""What the test servers (tests/s3server.py, the MLflow server) share: finding their binaries and free ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def binary(name: str, install_hint: str) -> str:
    """The command-line tool `name` beside this interpreter (the project's environment), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"`{name}` not found ({install_hint})")
    return found


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` ("" for every interface) right now: all sockets are held open
    together, so there are no duplicates."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class MlflowServer:
    """`mlflow server` on a store (a SQLite URI), on 127.0.0.1 and a free port that it keeps across `stop()` and
    `start()` (a server that goes away and comes back, as clients see it). Run from `workdir`, so that nothing
    lands elsewhere; stopped with its whole process group (uvicorn's worker included)."""

    def __init__(self, store: str, workdir: Path, port: int | None = None):
        self.store, self.workdir = store, Path(workdir)
        self.port = port or free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> MlflowServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # Job execution starts a job runner and six huey consumers: slow to start on 2 CPUs, and unused here.
        env |= {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}): {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not up in {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after 20 s; raises if any of its processes outlives both."""
        if self.process is None:
            return
        group, self.process = self.process.pid, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _group_alive(group):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
                time.sleep(1)
                if _group_alive(group):
                    raise RuntimeError("processes of the mlflow server outlived SIGTERM and SIGKILL")
                break
            time.sleep(0.2)

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""


def _group_alive(group: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-group, os.WNOHANG)[0]:  # reap our own child, or it stays a zombie of the group
            pass
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
