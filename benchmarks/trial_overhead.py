"""What a Ray Tune trial costs besides its training: start-up, per-epoch and tear-down overhead.

    uv run python benchmarks/trial_overhead.py [--trials 4] [--epochs 3] [--variants ray_defaults,tuned]

Each variant runs in its own process with its own local Ray (the settings are environment variables that Ray
reads when it starts): a sweep of `--trials` trials, one at a time, each fine-tuning a resnet20 on a tiny
prepared dataset (10 fractal classes × 40 at 32 px) for `--epochs` epochs with one worker, exactly as the tune
stage runs them (`resnet.sweep.run_sweep`: a trial function fitting its own TorchTrainer). A Tune callback on
the driver timestamps every trial's start, each reported epoch and its end; the training compute of each
epoch is the `epoch_seconds` the training loop itself reports. From those:

- start-up: trial start → its first report, minus that epoch's compute (the trial actor, the Train
  controller and its helper actors, the worker group with its process group, loading the data);
- per epoch: the time between two reports minus the epoch's compute (checkpoint written and registered, the
  report's way back to Tune);
- tear-down: the last report → the trial's end (the controller noticing the end, shutting the workers down);
- gap: one trial's end → the next one's start (Tune scheduling the next trial).

Variants: `ray_defaults` (Ray Train's own settings: a preemption-watcher actor per run, the controller
polling its workers every 2 s), `no_watcher` (no preemption watcher), `fast_poll` (polling every 0.5 s) and
`tuned` (what `resnet/__init__.py` sets). Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from children import run_child

import resnet  # noqa: E402, F401  (sets its environment defaults before Ray is imported, below)

TIMES: dict[str, dict] = {"start": {}, "results": {}, "end": {}}


def _callback_base():
    from ray import tune

    return tune.Callback


class Timing(_callback_base()):
    """Timestamps of every trial's start, reports and end, on the driver."""

    def on_trial_start(self, iteration, trials, trial, **info):
        TIMES["start"][trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        TIMES["results"].setdefault(trial.trial_id, []).append((time.time(), result["epoch_seconds"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        TIMES["end"][trial.trial_id] = time.time()


# Environment for each variant, applied before Ray starts (a value of None: leave it to resnet/__init__.py).
RAY_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}
# name → environment
VARIANTS = {
    "ray_defaults": RAY_DEFAULTS,
    "no_watcher": RAY_DEFAULTS | {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
    "fast_poll": RAY_DEFAULTS | {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"},
    "tuned": {},  # what resnet/__init__.py sets
}


def child(variant: str, trials: int, epochs: int, work: Path) -> dict:
    env = VARIANTS[variant]  # set by the parent in this process's environment, before Ray started
    import ray
    import torch

    from resnet.config import DatasetConfig, parse_config
    from resnet.data.prepare import prepare_dataset
    from resnet.distributed import TrainJob, init_ray, storage_path
    from resnet.engine import save_model_file
    from resnet.models import build_model
    from resnet.pretrained import load_pretrained
    from resnet.sweep import run_sweep

    data = work / "data"
    dataset = DatasetConfig(source="fractals", fractals={"num_classes": 10, "per_class": 40, "points": 400})
    prepare_dataset("fractals", dataset, data)
    torch.manual_seed(0)
    save_model_file(
        work / "start.pt", build_model("resnet20", 10), {"model_name": "resnet20", "num_classes": 10}
    )
    cfg = parse_config(
        {
            "datasets": {"fractals": {"source": "fractals"}},
            "finetune": {"dataset": "fractals", "epochs": epochs, "batch_size": 16, "lr": 0.05},
            "augment": {"crop_padding": 0},
            "tune": {
                "num_samples": trials,
                "max_concurrent_trials": 1,
                "workers_per_trial": 1,
                "asha": {"grace_period": epochs},  # no trial stopped: every trial runs every epoch
                "search_space": {"lr": {"distribution": "choice", "values": [0.05, 0.02]}},
            },
            "ray": {"storage_path": str(work / "ray")},
        }
    )
    started = time.perf_counter()
    init_ray(cfg.ray, "bench")
    ray_init_s = time.perf_counter() - started
    start = load_pretrained(str(work / "start.pt"), 10)
    base = TrainJob(
        data_dir=str(data),
        optim={},
        augment=cfg.augment.model_dump(),
        kind="finetune",
        init_weights=ray.put({"model_name": start.model_name, "model": start.model.state_dict()}),
        stage="finetune",
    )

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trial_overhead import TIMES, Timing  # by module: Tune copies callbacks, and the copies write to it

    timing = Timing()
    started = time.perf_counter()
    run_sweep(
        cfg,
        base,
        storage=storage_path(cfg.ray),
        name="bench",
        root=str(work),
        parent=None,
        callbacks=[timing],
    )
    sweep_s = time.perf_counter() - started
    ray.shutdown()

    starts, results, ends = TIMES["start"], TIMES["results"], TIMES["end"]
    order = sorted(starts, key=starts.get)
    startup, per_epoch, teardown, gaps, compute = [], [], [], [], []
    for index, trial in enumerate(order):
        reports = results[trial]
        assert len(reports) == epochs, (trial, len(reports))
        startup.append(reports[0][0] - starts[trial] - reports[0][1])
        per_epoch += [
            (t - t_prev) - secs for (t_prev, _), (t, secs) in zip(reports, reports[1:], strict=False)
        ]
        teardown.append(ends[trial] - reports[-1][0])
        compute += [secs for _, secs in reports]
        if index + 1 < len(order):
            gaps.append(starts[order[index + 1]] - ends[trial])
    return {
        "variant": variant,
        "env": env,
        "trials": trials,
        "epochs": epochs,
        "ray_init_s": round(ray_init_s, 2),
        "sweep_s": round(sweep_s, 2),
        "startup_s": round(statistics.mean(startup), 2),
        "per_epoch_overhead_s": round(statistics.mean(per_epoch), 2),
        "teardown_s": round(statistics.mean(teardown), 2),
        "gap_s": round(statistics.mean(gaps), 2) if gaps else 0.0,
        "epoch_compute_s": round(statistics.mean(compute), 2),
        "overhead_per_trial_s": round(
            statistics.mean(startup)
            + (epochs - 1) * statistics.mean(per_epoch)
            + statistics.mean(teardown)
            + (statistics.mean(gaps) if gaps else 0.0),
            2,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--variants", default="ray_defaults,tuned")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory(prefix="trial-overhead-") as tmp:
            print(json.dumps(child(args.child, args.trials, args.epochs, Path(tmp))), flush=True)
        return
    rows = []
    for variant in args.variants.split(","):
        options = ("--trials", str(args.trials), "--epochs", str(args.epochs))
        rows.append(run_child(__file__, variant, VARIANTS[variant], *options))
        print(json.dumps(rows[-1]), flush=True)
    columns = (
        "startup_s",
        "per_epoch_overhead_s",
        "teardown_s",
        "gap_s",
        "overhead_per_trial_s",
        "epoch_compute_s",
    )
    print(f"{'variant':<14}" + "".join(f"{c:>22}" for c in columns))
    for row in rows:
        print(f"{row['variant']:<14}" + "".join(f"{row[c]:>22}" for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
