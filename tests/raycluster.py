"""A real two-node Ray cluster for tests: a head and a worker node, each its own `ray start --block` on loopback.

Another Ray may run on this machine at the same time (the test session's own `ray.init`, another session's), so
this cluster touches nothing shared: every listener gets a port picked free at start (the GCS, dashboard, client
server, agents, metrics, node and object managers, and a block of worker ports per node), each node keeps its
sockets, logs and `ray_current_cluster` file under its own `--temp-dir` (a node without one writes
/tmp/ray/ray_current_cluster, and every later `ray.init()` on the machine would join this cluster), and it is
stopped by killing its own processes (those in the sessions its `ray start`s began), never with `ray stop` (which stops every Ray on the machine).

Token authentication, as our stack runs Ray (RAY_AUTH_MODE=token): the cluster gets a token made for it, passed
to its nodes as RAY_AUTH_TOKEN, which Ray reads before RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token. Nothing is
written to ~/.ray; a client needs `env()`.

    cluster = LocalRayCluster(tmp_dir).start()
    cluster.env()          # what a client needs: RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN
    subprocess.run([...], env=cluster.client_env())   # os.environ without other Ray settings, plus env()
    cluster.nodes()        # [{"node_id": ..., "alive": True, "is_head": True}, ...]
    cluster.stop()         # then cluster.remaining_processes() == []
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from localservers import binary, free_ports

from resnet.stack import NODE_PROBE

HOST = "127.0.0.1"
NODES = ("head", "worker")
# Ports every node opens; the head also runs the GCS, the dashboard and the Ray client server.
_NODE_PORTS = (
    "node-manager",
    "object-manager",
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "metrics-export",
    "runtime-env-agent",
)
_HEAD_PORTS = ("gcs", "dashboard", "ray-client-server")
# Head ports with no `ray start` flag, only an environment variable (defaults 44227 and 44217, which another
# Ray on the machine would already hold)
_HEAD_ENV_PORTS = {
    "dashboard-metrics": "DASHBOARD_METRIC_PORT",
    "autoscaler-metrics": "AUTOSCALER_METRIC_PORT",
}
WORKER_PORTS = 100  # a contiguous block per node, one port per worker process (and per driver on the node)
# Worker port blocks come from below Linux's ephemeral range (32768-60999, where `free_ports` and outgoing
# connections take theirs) and above Ray's default worker range (10002-19999, which other clusters use).
_WORKER_RANGE = (20000, 32000)
STARTED = "Ray runtime started."  # what `ray start` prints once its node is up
# Unix socket paths, <temp-dir>/<node>/session_<date>_<time>_<usec>_<pid>/sockets/dash_MetricsHead, must stay
# below 108 bytes: 69 of them are Ray's own.
_MAX_TEMP_DIR = 36

# Run in a subprocess with the cluster's environment (this process may itself be a Ray driver, with another
# cluster's token cached): wait until `want` nodes are alive, then print the node table as JSON.
_PROBE = NODE_PROBE


def ray_binary() -> str:
    return binary("ray", "install the project: `uv sync`")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_port_block(size: int, avoid: set[int] = frozenset(), attempts: int = 200) -> tuple[int, int]:
    """(first, last) of `size` consecutive ports, all free now, none in `avoid`."""
    low, high = _WORKER_RANGE
    for _ in range(attempts):
        first = random.randrange(low, high - size)
        block = range(first, first + size)
        if not avoid.intersection(block) and all(_port_free(port) for port in block):
            return first, first + size - 1
    raise RuntimeError(f"no block of {size} free ports in {low}-{high}")


class LocalRayCluster:
    def __init__(
        self,
        state_dir: str | Path,
        num_cpus: int = 1,
        object_store_memory: int = 300 * 1024**2,
        token_auth: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.token = secrets.token_hex(32) if token_auth else None
        self.ports: dict[str, dict[str, int]] = {}
        self.worker_ports: dict[str, tuple[int, int]] = {}
        self.processes: dict[str, subprocess.Popen] = {}
        self.temp_root: Path | None = None  # Ray's --temp-dir of each node is a directory in here
        self._own_temp_root = False
        # the sessions (IDs: each `ray start`'s PID) of the last stop(), for remaining_processes()
        self._stopped_sessions: tuple[str, ...] = ()

    # ------------------------------------------------------------ addresses

    @property
    def address(self) -> str:
        """The GCS address, what drivers take as RAY_ADDRESS."""
        return f"{HOST}:{self.ports['head']['gcs']}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard (job submission, state API)."""
        return f"http://{HOST}:{self.ports['head']['dashboard']}"

    def env(self) -> dict[str, str]:
        """The variables a client (driver, `ray` CLI) needs to join this cluster. The token given as
        RAY_AUTH_TOKEN wins over a RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token the client may also have."""
        if self.token is None:
            return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"}
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def log_path(self, node: str) -> Path:
        return self.state_dir / f"ray-{node}.log"

    def temp_dir(self, node: str) -> Path:
        return self.temp_root / node

    # ------------------------------------------------------------ start

    def client_env(self) -> dict[str, str]:
        """This process's environment for a client of this cluster: without another cluster's address or token
        settings, with the cluster's `env()`."""
        env = {
            name: value
            for name, value in os.environ.items()
            if name not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")
        }
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env | self.env()

    def _node_env(self, node: str) -> dict[str, str]:
        env = self.client_env()
        env |= {
            "RAY_USAGE_STATS_ENABLED": "0",
            # workers use this interpreter, not a `uv run` copy of the working directory
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            # on SIGTERM, `ray start --block` would first ask the GCS to drain its node (up to 30 s), but stop()
            # terminates the GCS and raylet at the same moment: nothing to drain, stop at once
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }
        # RAY_ADDRESS stays: Ray's own processes that look their cluster up without an address (Train V2's
        # PlacementGroupCleaner asks the state API) would otherwise find every GCS on the machine and give up
        # ("Found multiple active Ray instances") whenever another Ray runs beside this one.
        if node == "head":
            env |= {variable: str(self.ports[node][name]) for name, variable in _HEAD_ENV_PORTS.items()}
        return env

    def command(self, node: str) -> list[str]:
        ports = self.ports[node]
        first, last = self.worker_ports[node]
        command = [ray_binary(), "start", "--block"]
        if node == "head":
            command += [
                "--head",
                f"--port={ports['gcs']}",
                "--include-dashboard=true",
                f"--dashboard-host={HOST}",
                f"--dashboard-port={ports['dashboard']}",
                f"--ray-client-server-port={ports['ray-client-server']}",
            ]
        else:
            command += [f"--address={self.address}"]
        return [
            *command,
            f"--node-ip-address={HOST}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_memory}",
            f"--temp-dir={self.temp_dir(node)}",
            *(f"--{name}-port={ports[name]}" for name in _NODE_PORTS),
            f"--min-worker-port={first}",
            f"--max-worker-port={last}",
            "--disable-usage-stats",
            "--log-style=record",
            "--log-color=false",
        ]

    def _choose_ports(self) -> None:
        head = (*_HEAD_PORTS, *_HEAD_ENV_PORTS, *_NODE_PORTS)
        names = {node: head if node == "head" else _NODE_PORTS for node in NODES}
        picked = iter(free_ports(sum(len(n) for n in names.values()), host=""))  # Ray binds 0.0.0.0
        self.ports = {node: {name: next(picked) for name in names[node]} for node in NODES}
        taken: set[int] = {port for ports in self.ports.values() for port in ports.values()}
        for node in NODES:
            first, last = free_port_block(WORKER_PORTS, taken)
            self.worker_ports[node] = (first, last)
            taken |= set(range(first, last + 1))

    def _make_temp_root(self) -> None:
        candidate = self.state_dir / "ray"
        if len(str(candidate / "worker")) <= _MAX_TEMP_DIR:
            candidate.mkdir(parents=True, exist_ok=True)
            self.temp_root, self._own_temp_root = candidate, False
        else:  # pytest's tmp paths can be too long for Ray's unix sockets: a short one in /tmp
            self.temp_root = Path(tempfile.mkdtemp(prefix="raytest-", dir="/tmp"))
            self._own_temp_root = True

    def _spawn(self, node: str) -> None:
        self.temp_dir(node).mkdir(parents=True, exist_ok=True)
        with open(self.log_path(node), "ab") as log:
            self.processes[node] = subprocess.Popen(
                self.command(node),
                cwd=self.state_dir,
                env=self._node_env(node),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: stop() finds everything the node started
            )

    def start(self, timeout: float = 120.0) -> LocalRayCluster:
        if self.processes:
            raise RuntimeError("the Ray cluster is already running")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._make_temp_root()
        self._choose_ports()
        deadline = time.monotonic() + timeout
        try:
            # One after the other: a node starting beside another on 2 busy cores can miss Ray's own start-up
            # timeouts (its raylet waits 15 s for the dashboard agent).
            for node in NODES:
                self._spawn(node)
                self._wait_started(node, deadline)
            self._wait_nodes(len(NODES), deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _probe(self, want: int, timeout: float, env: dict[str, str] | None = None) -> dict:
        """{"nodes": [...], "problem": None or why the node table could not be read, "stderr": ...}"""
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, self.address, str(want), str(max(timeout, 0.0))],
            env=self.client_env() if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"node probe failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1]) | {"stderr": done.stderr}

    def _check_running(self) -> None:
        for node, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"Ray {node} node exited with status {process.returncode} while starting; "
                    f"log {self.log_path(node)}:\n{self.log_tail(node)}"
                )

    def _wait_started(self, node: str, deadline: float) -> None:
        """Wait for the line `ray start` prints once its node is up (its raylet registered with the GCS)."""
        while time.monotonic() < deadline:
            self._check_running()
            with contextlib.suppress(OSError):
                if STARTED in self.log_path(node).read_text(errors="replace"):
                    return
            time.sleep(0.25)
        raise RuntimeError(
            f"Ray {node} node not started in time; log {self.log_path(node)}:\n{self.log_tail(node)}"
        )

    def _wait_nodes(self, want: int, deadline: float) -> None:
        """Wait until `want` nodes are alive; fail early when a node's `ray start` exits."""
        problem = "no answer yet"
        while True:
            self._check_running()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # short probes, so that a node exiting is noticed soon
            answer = self._probe(want, min(left, 10.0))
            alive = sum(node["alive"] for node in answer["nodes"])
            if alive >= want:
                return
            problem = answer["problem"] or f"{alive} of {want} nodes alive"
        raise RuntimeError(
            f"Ray cluster at {self.address}: {want} nodes not alive in time ({problem}); "
            + "".join(f"\nlog {self.log_path(n)}:\n{self.log_tail(n)}" for n in self.processes)
        )

    # ------------------------------------------------------------ inspect

    def nodes(self, env: dict[str, str] | None = None) -> list[dict]:
        """The node table, [{"node_id": hex, "alive": bool, "is_head": bool}, ...], read from the GCS by a client
        with `env` (default `client_env()`); a RuntimeError with the client's log when it cannot be read."""
        answer = self._probe(0, 0, env)
        if answer["problem"]:
            raise RuntimeError(
                f"cannot read the node table of {self.address}: {answer['problem']}\n{answer['stderr'][-3000:]}"
            )
        return answer["nodes"]

    def log_tail(self, node: str, lines: int = 40) -> str:
        """The end of the node's `ray start` output and of its raylet (and, on the head, GCS) log."""
        parts = []
        paths = [self.log_path(node)]
        if self.temp_root is not None:
            logs = self.temp_dir(node) / "session_latest" / "logs"
            paths += [
                logs / "raylet.err",
                logs / "raylet.out",
                logs / "gcs_server.err",
                logs / "gcs_server.out",
            ]
        for path in paths:
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if text:
                parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts) or "(no log)"

    def _session_processes(self) -> list[tuple[int, str]]:
        """(pid, `ps` line) of every live process (zombies aside) in one of the nodes' sessions."""
        sessions = {str(process.pid) for process in self.processes.values()} | set(self._stopped_sessions)
        if not sessions:
            return []
        listing = subprocess.run(
            ["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True, check=True
        ).stdout
        rows = [line.split(None, 3) for line in listing.splitlines()]
        return [
            (int(row[0]), " ".join(row))
            for row in rows
            if len(row) == 4 and row[1] in sessions and not row[2].startswith("Z")
        ]

    def remaining_processes(self) -> list[str]:
        """`ps` lines of the cluster's processes still alive: after stop(), none."""
        return [line for _, line in self._session_processes()]

    # ------------------------------------------------------------ stop

    def _signal_all(self, processes: list[subprocess.Popen], sig: int) -> None:
        for process in processes:  # `ray start` and what it started in its process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        for pid, _ in self._session_processes():  # Ray's workers, each in a process group of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every process of the cluster: SIGTERM, then SIGKILL whatever is left after `timeout` s. Never
        `ray stop`: it would stop every Ray on the machine. Each node's `ray start` runs in a session of its own
        (start_new_session), which every process it starts inherits; Ray's worker processes move to process
        groups of their own, but stay in that session, so the session finds them all. Each `ray start` is reaped
        only at the end: until then its PID, the ID of its session and group, cannot be reused."""
        processes = list(self.processes.values())
        self._stopped_sessions = tuple(str(process.pid) for process in processes)
        self.processes = {}
        self._signal_all(processes, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.remaining_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.remaining_processes():
            self._signal_all(processes, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self.remaining_processes() and time.monotonic() < deadline:
                time.sleep(0.1)
        for process in processes:
            process.wait()
        if self._own_temp_root and self.temp_root is not None:
            # keep the nodes' logs with the rest of the state (a rename: both are usually on /tmp's filesystem)
            kept = self.state_dir / "ray"
            try:
                shutil.move(self.temp_root, kept)
                self.temp_root, self._own_temp_root = kept, False
            except OSError:
                shutil.rmtree(self.temp_root, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
