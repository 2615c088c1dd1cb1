"""What MLflow's basic-auth server spends per authenticated request, with and without its password cache.

    uv run python benchmarks/mlflow_auth_cpu.py [--requests 60]

The local stack (resnet/stack.py) and the Kubernetes manifests (infra/k8s) run the MLflow server with its
basic-auth app. Every request carries the user's password, which the server checks against its stored scrypt
hash: CPU spent by design, on every request, unless `auth_cache_ttl_seconds` lets each server worker keep a
password it checked (the stack's AUTH_CACHE_S). For each setting this starts `mlflow server --app-name
basic-auth --workers 1` on 127.0.0.1 (SQLite stores in a temporary directory), sends a few requests to warm it
up, then `--requests` authenticated requests one after the other (`experiments/get-by-name`, as a stage's
client does first), and measures the server's CPU time (every process of it) and the requests' wall time.
Not run by the tests.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

URL = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def _cpu(process: psutil.Process) -> float:
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(ttl: int, requests: int, work: Path) -> dict:
    password = secrets.token_hex(16)
    config = work / "auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{work / 'users.db'}\n"
        "admin_username = admin\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {ttl}\n"
    )
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    command = [sys.executable, "-m", "mlflow", "server", f"--backend-store-uri=sqlite:///{work / 'runs.db'}"]
    command += ["--host=127.0.0.1", f"--port={port}", "--workers=1", "--app-name=basic-auth"]
    server = subprocess.Popen(
        command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while _status(f"{base}/health") != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlflow server (auth_cache_ttl_seconds={ttl}) did not start")
            time.sleep(0.5)
        headers = {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}
        for _ in range(3):
            assert _status(base + URL, headers) == 200
        process = psutil.Process(server.pid)
        cpu, wall = _cpu(process), time.perf_counter()
        for _ in range(requests):
            assert _status(base + URL, headers) == 200
        wall, cpu = time.perf_counter() - wall, _cpu(process) - cpu
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"ttl": ttl, "cpu_ms": 1000 * cpu / requests, "wall_ms": 1000 * wall / requests}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    rows = []
    for ttl in (0, 60):
        with tempfile.TemporaryDirectory(prefix="mlflow-auth-") as tmp:
            rows.append(measure(ttl, args.requests, Path(tmp)))
    print(f"per authenticated request, {args.requests} requests, one server worker:")
    print(f"{'auth_cache_ttl_seconds':>22s} {'server CPU (ms)':>16s} {'wall (ms)':>10s}")
    for row in rows:
        print(f"{row['ttl']:>22d} {row['cpu_ms']:16.1f} {row['wall_ms']:10.1f}")
    print(f"CPU ratio, cache on/off: {rows[1]['cpu_ms'] / rows[0]['cpu_ms']:.2f}")


if __name__ == "__main__":
    main()
