"""Worker nodes of the stack's cluster lost mid-run (tests/conftest.py `local_stack`: a head with no CPUs and
worker nodes of one CPU, each in its own network namespace): one killed outright, its raylet, agents and
workers SIGKILLed as when a machine dies, then another cut off, its link taken down. A DDP run of two ranks on
two nodes reschedules onto the remaining nodes each time and completes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stagerun import wait_for

pytestmark = pytest.mark.integration

EPOCHS = 10

# The driver, as a user's would be: joins the cluster through its GCS address with the nodes' token.
DRIVER = """
import json, sys
import ray
import resnet  # noqa: F401 (Ray's environment defaults)
from resnet.config import AugmentConfig, PretrainConfig, RayConfig
from resnet.distributed import ProgressPrinter, TrainJob, make_trainer, storage_path

data, storage, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
ray.init(log_to_driver=False)
cfg = RayConfig(
    num_workers=2, placement_strategy="STRICT_SPREAD", max_failures=2, checkpoints_to_keep=epochs,
    storage_path=storage,
)
job = TrainJob(
    data_dir=data,
    optim=PretrainConfig(epochs=epochs, batch_size=16, lr=0.05).model_dump(),
    augment=AugmentConfig(crop_padding=0).model_dump(),
)
progress = ProgressPrinter()
with progress.printing():
    result = make_trainer(job, cfg, name="node-faults", storage=storage_path(cfg), progress=progress).fit()
reports = sorted((metrics for _, metrics in result.best_checkpoints), key=lambda m: m["epoch"])
print("RESULT " + json.dumps({
    "error": None if result.error is None else str(result.error),
    "epochs": [m["epoch"] for m in reports],
    "starts": [m["start_epoch"] for m in reports],
}), flush=True)
"""


def _registered(log: Path) -> int:
    """The last epoch the run registered (its progress line printed by the driver)."""
    epochs = [
        int(line.split()[2].split("/")[0]) for line in _lines(log) if line.startswith("pretrain epoch ")
    ]
    return max(epochs, default=0)


def _lines(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines()


def _rank_nodes(run_dir: Path, names: dict[str, str]) -> list[str]:
    """The stack's names of the nodes that hold rank 0 and rank 1, from the newest checkpoint's model file."""
    newest = sorted(run_dir.glob("checkpoint_*/model.pt"))[-1]
    replicas = torch.load(newest, map_location="cpu", weights_only=True)["meta"]["replicas"]
    return [names[replica["node_id"]] for replica in sorted(replicas, key=lambda r: r["rank"])]


def test_a_worker_node_killed_then_another_cut_off_mid_run_reschedules_and_completes(
    local_stack, tiny_fractals, tmp_path
):
    stack = local_stack
    if stack.network_mode != "netns":
        pytest.skip("a node cut off needs the stack's network namespaces (root)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env |= stack.node_env() | {"PYTHONUNBUFFERED": "1"}  # RAY_ADDRESS: the GCS
    log, run_dir = tmp_path / "driver.log", tmp_path / "ray" / "node-faults"
    added: list[str] = []
    faulted: list[str] = []
    driver = None
    try:  # whatever happens, the stack is left as the tests after this one expect it: its own two workers
        for _ in range(2):  # four worker nodes: two ranks, two to lose
            added.append(stack.add_worker())
        by_ip = {
            stack.net.worker_ip(int(name.removeprefix("ray-w"))): name
            for name in ("ray-w1", "ray-w2", *added)
        }
        alive = stack.nodes(want=len(by_ip) + 1, timeout=180)["nodes"]
        names = {
            node["node_id"]: by_ip[node["ip"]] for node in alive if node["alive"] and not node["is_head"]
        }
        assert sorted(names.values()) == sorted(by_ip.values())

        with log.open("w") as out:
            driver = subprocess.Popen(
                [sys.executable, "-c", DRIVER, str(tiny_fractals), str(tmp_path / "ray"), str(EPOCHS)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: _registered(log) >= 1, 300, "the first epoch")
        first = _rank_nodes(run_dir, names)
        stack.kill_node(first[1])
        faulted.append(first[1])
        floor = _registered(log)
        wait_for(
            lambda: any("resumed after" in line for line in _lines(log)) and _registered(log) > floor,
            300,
            "an epoch of the worker group started after the kill",
        )
        second = _rank_nodes(run_dir, names)
        assert first[1] not in second
        stack.cut_node(second[1])
        faulted.append(second[1])
        assert driver.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if driver is not None:
            driver.kill()
        for name in dict.fromkeys(faulted + added):
            stack.restore_node(name)
        back = stack.nodes(want=stack.workers + 1, timeout=120)["nodes"]
        assert sum(node["alive"] for node in back) == stack.workers + 1

    said = _lines(log)
    result = json.loads(next(line for line in said if line.startswith("RESULT "))[len("RESULT ") :])
    assert result["error"] is None
    # Every epoch ran to the configured end, with a registered checkpoint each (no gap), in three worker groups:
    # the first, one started after the killed node, one after the node cut off.
    assert result["epochs"] == list(range(1, EPOCHS + 1))
    resumed_at = sorted(set(result["starts"]) - {0})
    assert len(resumed_at) == 2 and result["starts"] == sorted(result["starts"]), result["starts"]
    assert [line for line in said if "resumed after" in line] == [
        f"pretrain: resumed after epoch {epoch} from its last checkpoint" for epoch in resumed_at
    ]
    # The last group ran on the two nodes left, its replicas identical.
    last = _rank_nodes(run_dir, names)
    assert sorted(last) == sorted(set(by_ip.values()) - set(faulted))
    newest = sorted(run_dir.glob("checkpoint_*/model.pt"))[-1]
    replicas = torch.load(newest, map_location="cpu", weights_only=True)["meta"]["replicas"]
    assert len({replica["params_sha256"] for replica in replicas}) == 1
