"""Shared fixtures. Integration tests share one real Ray cluster per test session (starting Ray costs ~15 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


# Under `pytest -n 2 --dist loadgroup --no-loadscope-reorder` (what `make test` runs), the tests on the session's
# Ray cluster are one group ("ray") and those on the local stack another ("stack"), each run by one worker, so
# that each cluster starts once. xdist hands out work in collection order (pytest_collection_modifyitems): the
# Ray group first, to one worker, for the whole run (its long pole); the unit tests and the other integration
# tests to the other worker; the stack's group last, to the worker that ran those, so it starts once they are
# done and runs beside the Ray group's second half, which alone kept 2 cores only 75% busy (single-process
# stages, one-worker runs). Both groups from the start, beside the unit tests too, starved each other past Ray's
# fixed limits (a raylet aborts when its dashboard agent is not up in 15 s) and the tests' own.
GROUPS = {"ray_address": "ray", "local_stack": "stack"}


def _cluster(item: pytest.Item) -> str | None:
    """The group of a test on a cluster ("ray" or "stack"), None for any other test."""
    groups = {group for fixture, group in GROUPS.items() if fixture in getattr(item, "fixturenames", ())}
    if len(groups) > 1:
        raise pytest.UsageError(f"{item.nodeid}: uses both clusters; each is started by one worker")
    return groups.pop() if groups else None


def pytest_itemcollected(item: pytest.Item) -> None:
    """Each test using a cluster is marked with its group as it is collected: before any
    `pytest_collection_modifyitems`, where xdist reads the groups."""
    if group := _cluster(item):
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under `--dist loadgroup`, xdist sends a group's tests to one worker by the group it appends to their ids:
    without it, each worker would start both clusters and every session fixture."""
    if getattr(session.config.option, "loadgroup", False):  # set in xdist's workers only
        for item in session.items:
            for mark in item.iter_markers("xdist_group"):
                if not item.nodeid.endswith(f"@{mark.args[0]}"):
                    raise pytest.UsageError(f"{item.nodeid}: xdist did not group it as {mark.args[0]!r}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The Ray cluster's tests first, the local stack's last (in one process too: once up, the stack's
    processes stay up to the end of the session, taking a few percent of the CPU from every test after them)."""
    items.sort(key=lambda item: {"ray": 0, None: 1, "stack": 2}[_cluster(item)])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a 2-core machine that may be busy with Ray jobs: one intra-op thread is several times
    faster than two competing ones, and makes the timings of a module predictable. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory, s3_server) -> str:
    """A local Ray cluster started by this test session (dashboard on 127.0.0.1, as Tune needs on 2 CPUs);
    stages run as subprocesses join it through RAY_ADDRESS, exactly as they would join a real cluster. Its
    node holds the test S3 server's keys in its own environment, as a real cluster's nodes hold theirs (a
    driver never forwards credentials to workers).

    Its Train runs start no preemption watcher (an actor per run, ~3 core-seconds of a busy 2-core machine,
    benchmarks/RESULTS.md): no test drains one of its nodes, and the pipeline keeps Ray's default on every
    other cluster (the local stack's included)."""
    import ray

    import resnet  # noqa: F401  (sets Ray's environment defaults before Ray is imported)
    from resnet.distributed import on_loopback_only

    # On 127.0.0.1 only, as a stage's own local Ray; the stages this process starts inherit the setting, which
    # they need to join it there (the stack's nodes and clients are started without this process's RAY_ vars).
    on_loopback_only()
    with pytest.MonkeyPatch.context() as node_env:  # the node's processes inherit this process's environment
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            node_env.setenv(name, s3_server.env()[name])
        node_env.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_fractals(tmp_path_factory) -> Path:
    """A prepared dataset of 10 fractal classes × 40 at 32 px: 320 training images, an epoch of a second or two
    on 2 workers (so a kill can land inside one)."""
    from resnet.config import DatasetConfig
    from resnet.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "fractals"
    dataset = DatasetConfig(
        source="fractals",
        image_size=32,
        split={"val": 0.1, "test": 0.1},
        fractals={"num_classes": 10, "per_class": 40, "points": 400},
    )
    prepare_dataset("fractals", dataset, out)
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`, tests/s3server.py) for the whole session: every listener on
    127.0.0.1 and a free port, buckets data, dvc, mlflow and ray. Tests point clients at it with
    `for name, value in s3_server.env().items(): monkeypatch.setenv(name, value)` and then
    `resnet.data.s3.s3_client.cache_clear()` (see the `s3_env` fixture in tests/test_s3.py)."""
    from s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


_AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


@pytest.fixture
def aws_isolated(monkeypatch, tmp_path):
    """No AWS settings from the machine (variables, ~/.aws, instance metadata); a fresh client before and after."""
    for name in _AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    from resnet.data import s3

    clear = s3.s3_client.cache_clear  # (a test may replace s3_client; monkeypatch restores it after this)
    clear()
    yield monkeypatch
    clear()


@pytest.fixture
def s3_env(s3_server, aws_isolated):
    """The environment of a user of the test server (admin keys, AWS_ENDPOINT_URL_S3)."""
    for name, value in s3_server.env().items():
        aws_isolated.setenv(name, value)
    return aws_isolated


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    """The real stack (`resnet-pipeline stack up`, resnet/stack.py) for the whole session: SeaweedFS S3, an
    MLflow server (SQLite, artifacts in s3://mlflow/artifacts) and a Ray cluster of a head and 2 worker nodes
    × 1 CPU, token auth on; worker nodes in network namespaces when we are root. Every port is picked free (the
    usual 8333/5000/6379/8265 stay free for a developer's own stack). Started through the command line, so its
    output is checked too (`local_stack.up_output`); clients take `local_stack.env()`. After `down`, no process
    of the stack and none of its namespaces may remain."""
    import subprocess
    import sys

    from resnet.stack import DEFAULT_PORTS, Stack

    state_dir = tmp_path_factory.mktemp("stack")
    ports = [arg for name in DEFAULT_PORTS for arg in (f"--{name}-port", "0")]
    command = [sys.executable, "-m", "resnet.stack", "up", "--state-dir", str(state_dir), *ports]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    stack = Stack(state_dir)
    try:
        assert done.returncode == 0, f"stack up failed ({done.returncode}): {done.stderr[-3000:]}"
        stack.up_output = done.stdout
        yield stack
    finally:
        stack.down()
        assert stack.processes() == [], "processes of the stack outlived `down`"
        assert stack.net.leftovers() == [], "network namespaces or links of the stack outlived `down`"


# The pipeline with tiny settings, run once per session by `pipeline_project`.
TINY = {
    "datasets": {
        "fractals": {"image_size": 16, "fractals": {"num_classes": 10, "per_class": 20, "points": 400}},
        "digits": {"image_size": 16},
    },
    # Pretraining streams its shards through Ray Data; fine-tuning holds them in memory: both paths run.
    "pretrain": {"epochs": 2, "loader": "ray_data"},
    "finetune": {"epochs": 2},
    # Two epochs of pretraining on 160 tiny images teach the backbone little, so a linear probe on it stays
    # near chance: both trials fine-tune fully (tests/test_engine.py covers the linear probe).
    "tune": {
        "num_samples": 2,
        "search_space": {"strategy": {"distribution": "choice", "values": ["full"]}},
    },
}


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory, repo_root: Path, ray_address: str) -> dict:
    """A git + DVC copy of the project with tiny params, after one `dvc repro` against the session's Ray
    cluster and the embedded MLflow store (mlruns.db in the copy). Shared by the pipeline, registry and UI
    tests: {"dir", "first" (the CompletedProcess), "repro" (runs `dvc repro` again), "params", "env"}."""
    from stagerun import copy_project

    work = tmp_path_factory.mktemp("project")
    params = _merge(yaml.safe_load((repo_root / "params.yaml").read_text()), TINY)
    env = copy_project(repo_root, work, params, ray_address)

    def repro() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dvc", "repro"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )

    first = repro()
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return {"dir": work, "first": first, "repro": repro, "params": params, "env": env}
