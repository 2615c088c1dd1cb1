"""What the benchmarks that compare settings share: each variant measured in a child process of its own (the
settings are environment variables that Ray reads when it starts), which prints its results as one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_child(script: str, variant: str, env: dict[str, str], *args: str) -> dict:
    """`script --child VARIANT ARGS` from the repository root, in this environment without its Ray and MLflow
    settings, plus `env`: the JSON of its last line of output. Exits with the end of its output if it fails."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    child_env |= {"RESNET_PROGRESS": "0", "PYTHONUNBUFFERED": "1"} | env
    done = subprocess.run(
        [sys.executable, script, "--child", variant, *args],
        cwd=REPO,
        env=child_env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"[{variant}] failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
