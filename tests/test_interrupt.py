"""`dvc repro` interrupted in each stage of the pipeline, by Ctrl-C (SIGINT to its process group) or killed
outright (SIGKILL to the group: a lost machine, an OOM kill), one stage after the other: each time, no output is
half-written (each is absent, or whole), the next `dvc repro` skips the stages that finished and runs the
interrupted one again, and once it completes no temporary is left behind (a killed writer's is removed by the
next writer of the same output: resnet/io.py).

A project of its own, with one tiny dataset, fine-tuned from a random start, against the session's Ray cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from stagerun import copy_project, wait_for

pytestmark = pytest.mark.integration

# Each stage's declared outputs (dvc.yaml, for the params below).
OUTPUTS = {
    "prepare@fractals": ["data/prepared/fractals", "metrics/prepare/fractals.json"],
    "pretrain": ["models/pretrain", "metrics/pretrain.json"],
    "tune": ["models/tune", "metrics/tune.json", "plots/sweep.csv"],
    "evaluate": ["metrics/eval.json", "plots/confusion.csv", "plots/calibration.csv", "plots/eval"],
    "register": ["registry/registered.json"],
}
STAGES = list(OUTPUTS)
# Where each stage is interrupted, and how: a line of the run's output, then a pause (s) into the stage's work.
# prepare is killed as it writes its shards, the sweep as it starts its Ray workers, pretrain (which here hands
# on untrained starting weights, `finetune.pretrained: none`) as it starts; evaluate and register by Ctrl-C as
# they load their inputs. (Pretraining and the sweep interrupted mid-epoch go on from their checkpoints when
# run again: tests/test_distributed.py and tests/test_sweep.py.)
INTERRUPTS = {
    "prepare@fractals": (signal.SIGKILL, r"fractals: write", 0.0),
    "pretrain": (signal.SIGKILL, r"Running stage 'pretrain'", 2.0),
    "tune": (signal.SIGKILL, r"tune: sweep ", 2.0),
    "evaluate": (signal.SIGINT, r"Running stage 'evaluate'", 4.0),
    "register": (signal.SIGINT, r"Running stage 'register'", 4.0),
}


def _params(repo_root: Path) -> dict:
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["datasets"] = {
        "fractals": {"source": "fractals", "image_size": 16, "fractals": {"num_classes": 4, "per_class": 20}}
    }
    params["pretrain"] |= {"dataset": "fractals", "epochs": 2, "batch_size": 16}
    params["finetune"] |= {
        "dataset": "fractals",
        "pretrained": "none",
        "model": "resnet20",
        "epochs": 2,
        "batch_size": 16,
    }
    params["tune"] |= {
        "num_samples": 1,
        "search_space": {"strategy": {"distribution": "choice", "values": ["full"]}},
    }
    params["register"]["model_name"] = "resnet-fractals"
    params["ray"]["num_workers"] = 1
    return params


class _Repro:
    """`dvc repro` in its own process group, its output collected line by line as it comes."""

    def __init__(self, work: Path, env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def saw(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in list(self.lines))

    def interrupt(self, sig: int) -> str:
        """`sig` to the whole group, as a terminal's Ctrl-C, or the end of a killed job, sends it."""
        os.killpg(self.process.pid, sig)
        return self.finish(timeout=120)

    def finish(self, timeout: float = 600) -> str:
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.process.kill()
        self.reader.join(timeout=10)
        return "".join(self.lines)


def _whole(work: Path, output: str) -> bool:
    """An output that exists is whole: what its stage writes last is there and reads."""
    path = work / output
    if path.name in ("fractals",):
        manifest = json.loads((path / "manifest.json").read_text())
        return all((path / name).stat().st_size > 0 for name in manifest["files"])
    if path.parent.name == "models":
        return bool(torch.load(path / "model.pt", weights_only=True)["meta"])
    if path.name == "eval":
        from resnet.stages.evaluate import CURVES, FIGURES

        return {p.name for p in path.glob("*.png")} == {*FIGURES, CURVES}
    if path.suffix == ".json":
        return isinstance(json.loads(path.read_text()), dict)
    text = path.read_text()  # CSV
    return text.endswith("\n") and len(text.splitlines()) >= 2


def _temporaries(work: Path) -> list[str]:
    return sorted(
        str(p.relative_to(work))
        for p in work.rglob(".*.tmp*")
        if p.relative_to(work).parts[0] not in (".git", ".dvc")
    )


def test_dvc_repro_interrupted_in_each_stage_leaves_nothing_half_written_and_resumes_where_it_stopped(
    tmp_path, repo_root, ray_address
):
    work = tmp_path / "project"
    work.mkdir()
    env = copy_project(repo_root, work, _params(repo_root), ray_address)

    for index, stage in enumerate(STAGES):
        sig, moment, pause = INTERRUPTS[stage]
        repro = _Repro(work, env)
        wait_for(lambda r=repro, m=moment: r.saw(m) or r.process.poll() is not None, 600, moment)
        assert repro.process.poll() is None, "".join(repro.lines)[-4000:]
        time.sleep(pause)
        output = repro.interrupt(sig)
        assert repro.process.returncode != 0, output[-4000:]
        # It stopped inside `stage`: the stages before it were skipped, or (the one interrupted last time) run.
        assert f"Running stage '{stage}'" in output, output[-4000:]
        for done in STAGES[: max(index - 1, 0)]:
            assert f"Stage '{done}' didn't change, skipping" in output, (done, output[-4000:])
        if index:
            assert f"Running stage '{STAGES[index - 1]}'" in output, output[-4000:]
        for later in STAGES[index + 1 :]:
            assert f"Running stage '{later}'" not in output
        if stage == "register":
            assert not (work / "registry/registered.json").exists()
        # Nothing half-written: each output of every stage so far is absent or whole.
        for output_path in (path for name in STAGES[: index + 1] for path in OUTPUTS[name]):
            assert not (work / output_path).exists() or _whole(work, output_path), output_path

    final = _Repro(work, env).finish()
    assert final.count("Running stage") == 1 and "Running stage 'register'" in final, final[-4000:]
    for done in STAGES[:-1]:
        assert f"Stage '{done}' didn't change, skipping" in final
    for path in (path for name in STAGES for path in OUTPUTS[name]):
        assert _whole(work, path), path
    assert _temporaries(work) == []
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Data and pipelines are up to date." in status.stdout, status.stdout + status.stderr
