"""What ASHA saves, what it costs, and what pretraining buys: three sweeps of the tune stage on the default data.

    uv run python benchmarks/sweep_efficiency.py [--params params.yaml] [-S tune.num_samples=12] [--json PATH]

Needs the prepared target and the pretrain stage's model (`make repro`, or `dvc repro pretrain`). Runs the tune
stage itself (`python -m pipelines.tune`, its own local Ray, an MLflow store and Ray storage in a temporary
directory) three times, with the params' sweep:

1. asha: the sweep as configured.
2. to_end: the same trials (same seed, so the same draws; checked) with ASHA unable to stop any
   (grace_period = max epochs): the budget ASHA is measured against, and the best a full search finds.
3. scratch: the same sweep from a random init of the same architecture (`finetune.pretrained: none`,
   strategy full only: there are no features to probe or unfreeze gradually) with the same epochs per trial.

Reported: ASHA's trial-epochs ÷ the budget of running every trial to the end, both as ASHA saw them and as
run (a stopped trial's workers finish the epoch in flight); the gap between ASHA's best and the to-the-end
best (validation accuracy, the sweep's metric, in points); the test accuracy of each sweep's best model
(resnet.evaluate, the evaluate stage's code). Goal: ≤ 40% and ≤ 1 point. Not run by the tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from resnet.cli import parse_override
from resnet.config import load_config, set_dotted

REPO = Path(__file__).resolve().parent.parent


def run_sweep(name: str, params: dict, work: Path, data: str, pretrain_model: str) -> dict:
    """The tune stage with `params`; returns its summary, table, best record and wall time."""
    out = work / name
    out.mkdir()
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "pipelines.tune", "--params", str(out / "params.yaml"), "--data", data]
    command += ["--pretrain-model", pretrain_model, "--out", str(out / "models")]
    command += [
        "--table",
        str(out / "sweep.csv"),
        "--metrics",
        str(out / "tune.json"),
        "--name",
        f"bench-{name}",
    ]
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"[{name}] failed:\n{(done.stdout + done.stderr)[-4000:]}")
    print("\n".join(line for line in done.stdout.splitlines() if line.startswith("tune:")), flush=True)
    with open(out / "sweep.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    from resnet.evaluate import evaluate_model_file

    test = evaluate_model_file(out / "models" / "model.pt", data).metrics
    return {
        "summary": json.loads((out / "tune.json").read_text()),
        "table": table,
        "best": json.loads((out / "models" / "best.json").read_text()),
        "test_acc": test["test_acc"],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", type=parse_override, default=[])
    parser.add_argument("--pretrain-model", default="models/pretrain/model.pt")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    raw = yaml.safe_load(Path(args.params).read_text())
    for key, value in args.overrides:
        raw = set_dotted(raw, key, value)
    cfg = load_config(args.params, dict(args.overrides))
    from resnet.sweep import max_epochs

    max_t = max_epochs(cfg)
    data = str(REPO / "data" / "prepared" / cfg.finetune.dataset)
    if not Path(args.pretrain_model).is_file():
        raise SystemExit(f"{args.pretrain_model}: no such file; run `dvc repro pretrain` first")
    pretrain_model = str(Path(args.pretrain_model).resolve())

    runs = {}
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        work = Path(tmp)
        base = set_dotted(raw, "ray.storage_path", str(work / "ray"))
        runs["asha"] = run_sweep("asha", base, work, data, pretrain_model)
        to_end = set_dotted(base, "tune.asha.grace_period", max_t)
        runs["to_end"] = run_sweep("to_end", to_end, work, data, pretrain_model)
        scratch = set_dotted(base, "finetune.pretrained", "none")
        scratch = set_dotted(scratch, "finetune.model", cfg.pretrain.model)
        scratch = set_dotted(
            scratch, "tune.search_space.strategy", {"distribution": "choice", "values": ["full"]}
        )
        runs["scratch"] = run_sweep("scratch", scratch, work, data, pretrain_model)

    keys = [k for k in cfg.tune.search_space]
    draws = {
        name: [tuple(row[k] for k in keys) for row in runs[name]["table"]] for name in ("asha", "to_end")
    }
    same_trials = draws["asha"] == draws["to_end"]
    asha, full = runs["asha"], runs["to_end"]
    seen = asha["summary"]["trial_epochs"]
    ran = sum(int(row.get("epochs_run") or row["epochs"]) for row in asha["table"])
    budget = asha["summary"]["budget_epochs"]
    metric = f"best_{cfg.tune.metric}"
    report = {
        "trials": asha["summary"]["trials"],
        "max_epochs": max_t,
        "same_trials_in_both_sweeps": same_trials,
        "asha_stopped": asha["summary"]["stopped_early"],
        "asha_trial_epochs_seen": sum(int(row["epochs"]) for row in asha["table"]),
        "asha_trial_epochs_run": ran,
        "budget_trial_epochs": budget,
        "fraction_seen": round(sum(int(row["epochs"]) for row in asha["table"]) / budget, 4),
        "fraction_run": round(ran / budget, 4),
        "asha_best_val": asha["summary"][metric],
        "to_end_best_val": full["summary"][metric],
        "gap_points": round(100 * (full["summary"][metric] - asha["summary"][metric]), 2),
        "asha_best_trial": asha["best"]["trial_id"],
        "to_end_best_trial": full["best"]["trial_id"],
        "asha_test_acc": asha["test_acc"],
        "to_end_test_acc": full["test_acc"],
        "scratch_best_val": runs["scratch"]["summary"][metric],
        "scratch_test_acc": runs["scratch"]["test_acc"],
        "seconds": {name: run["seconds"] for name, run in runs.items()},
        "summary_trial_epochs": seen,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report | {"runs": runs}, indent=2, default=str))


if __name__ == "__main__":
    main()
