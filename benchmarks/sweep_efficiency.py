"""What early stopping saves and what it misses, over several seeds of the sweep, for several schedulers.

    uv run python benchmarks/sweep_efficiency.py [--seeds 0,1,2] [--trials 20] [--sizes 8,10] [--confirm] [--scratch]
        [--params params.yaml] [-S key=value ...] [--cache DIR] [--json PATH]

Needs the prepared target and the pretrain stage's model (`make repro`, or `dvc repro pretrain`).

1. For each seed (`tune.seed`: which trials the sweep draws), the tune stage itself (`python -m pipelines.tune`,
   its own local Ray, an MLflow store and Ray storage in `--cache`) runs `--trials` trials of the params' search
   space to the end (no early stopping), keeping every epoch's checkpoint. Its MLflow child runs hold every
   trial's curve and the time of every epoch (the first one from the trial's start, so it includes start-up).
   A cached seed is not run again.
2. Each scheduler below is replayed on those curves (benchmarks/asha_sim.py: Ray Tune's ASHA, two trials at
   once as on 2 CPUs, each epoch taking its recorded time), for the first 10 trials and for all: the sweeps are
   seeded and reproducible to the digit, so a replay is what the same sweep with that scheduler would do
   (`--sizes 8,10`: replay the first 8 and the first 10 trials instead).
   Reported per scheduler: the trial-epochs it runs ÷ every trial run to the end (cost), the gap between the
   checkpoint it picks and the one the same trials run to the end pick, in the sweep's metric (× 100: accuracy
   points, or a loss × 100) and in validation accuracy points, and the test accuracy of the checkpoint it picks
   (the evaluate stage's code). Picks are the tune stage's: the first trial with the best result, its latest
   epoch with that result.
3. `--confirm`: the tune stage with the params as they are (the default scheduler) for each seed, and the
   replay of that same scheduler beside it: the trials each stopped where, and the best each found, must agree.
4. `--scratch`: the same sweep from a random init (`finetune.pretrained: none`, full fine-tuning only), run to
   the end: what pretraining buys.

Goal: ≤ 40% of the budget and ≤ 1 point. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from asha_sim import Asha, Curve, replay  # noqa: E402

from resnet.cli import parse_override  # noqa: E402
from resnet.config import load_config, set_dotted  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SLOTS = 2  # trials at once: 2 CPUs, one worker per trial

# name → scheduler factory (max_t: the trial length)
SCHEDULERS = {
    "asha epoch g1 rf3": lambda t: Asha(1, 3, t, "epoch"),
    "asha epoch g1 rf2": lambda t: Asha(1, 2, t, "epoch"),
    "asha epoch g3 rf3": lambda t: Asha(3, 3, t, "epoch"),
    "asha backbone g1 rf3": lambda t: Asha(1, 3, t, "backbone_epochs"),
    "asha backbone g1 rf2": lambda t: Asha(1, 2, t, "backbone_epochs"),
    "asha backbone g2 rf3": lambda t: Asha(2, 3, t, "backbone_epochs"),
}


def run_tune(name: str, params: dict, out: Path, data: str, pretrain_model: str) -> dict:
    """The tune stage with `params` in `out`; returns its summary (tune.json)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "pipelines.tune", "--params", str(out / "params.yaml"), "--data", data]
    command += ["--pretrained", "pretrain", "--pretrain-model", pretrain_model, "--out", str(out / "models")]
    command += ["--table", str(out / "sweep.csv"), "--metrics", str(out / "tune.json"), "--name", name]
    print(f"[{name}] tune stage: {out}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"[{name}] failed:\n{(done.stdout + done.stderr)[-4000:]}")
    (out / "stdout.txt").write_text(done.stdout)
    summary = json.loads((out / "tune.json").read_text())
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "tune.json").write_text(json.dumps(summary))
    return summary


def read_curves(out: Path, cfg) -> list[Curve]:
    """Every trial's curve and epoch times from the sweep's MLflow child runs, in trial order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    children = [
        run for run in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in run.data.tags
    ]
    curves = []
    for run in sorted(children, key=lambda r: r.data.tags["tune.trial_id"]):
        history = sorted(client.get_metric_history(run.info.run_id, cfg.tune.metric), key=lambda m: m.step)
        accuracy = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
        times = [run.info.start_time] + [m.timestamp for m in history]
        config = {k.split(".", 1)[1]: v for k, v in run.data.params.items()}
        strategy, lp_epochs = config["strategy"], int(config["lp_epochs"])
        curves.append(
            Curve(
                trial_id=run.data.tags["tune.trial_id"],
                config=config,
                values=[m.value if cfg.tune.mode == "max" else -m.value for m in history],
                seconds=[(b - a) / 1000 for a, b in zip(times, times[1:], strict=False)],
                head_only_epochs=lp_epochs if strategy in ("lp_ft", "gradual") else 0,
                accuracy=[m.value for m in accuracy],
            )
        )
    return curves


def checkpoint_test_acc(out: Path, trial_id: str, epoch: int, data: str) -> float:
    """Test accuracy of a trial's checkpoint of `epoch` (the to-the-end sweep keeps every epoch's)."""
    from resnet.evaluate import evaluate_model_file

    for model in out.glob(f"ray/*-trainers/{trial_id}/checkpoint_*/model.pt"):
        if torch.load(model, weights_only=True)["meta"]["metrics"]["epoch"] == epoch:
            return evaluate_model_file(model, data).metrics["test_acc"]
    raise SystemExit(f"{out}: no checkpoint of trial {trial_id} epoch {epoch}")


def val_acc(curves: list[Curve], pick: tuple[float, str, int]) -> float:
    """The validation accuracy of a picked (metric, trial, epoch)."""
    curve = next(c for c in curves if c.trial_id == pick[1])
    return curve.accuracy[pick[2] - 1]


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", type=parse_override, default=[])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=20, help="trials per seed, run to the end")
    parser.add_argument(
        "--sizes", default=None, help="sweep sizes to replay, e.g. 8,10 (default: 10 and --trials)"
    )
    parser.add_argument("--confirm", action="store_true", help="also run the configured scheduler for real")
    parser.add_argument("--scratch", action="store_true", help="also run the sweep from a random init")
    parser.add_argument("--pretrain-model", default="models/pretrain/model.pt")
    parser.add_argument("--cache", default="/tmp/sweep-efficiency", help="sweeps already run are kept here")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    raw = yaml.safe_load(Path(args.params).read_text())
    for key, value in args.overrides:
        raw = set_dotted(raw, key, value)
    cfg = load_config(args.params, dict(args.overrides))
    max_t = cfg.max_trial_epochs
    data = str(REPO / "data" / "prepared" / cfg.finetune.dataset)
    if not Path(args.pretrain_model).is_file():
        raise SystemExit(f"{args.pretrain_model}: no such file; run `dvc repro pretrain` first")
    pretrain_model = str(Path(args.pretrain_model).resolve())
    cache = Path(args.cache)
    seeds = [int(s) for s in args.seeds.split(",")]

    report: dict = {"trials": args.trials, "max_epochs": max_t, "seeds": seeds, "schedulers": {}, "runs": {}}
    curves_by_seed = {}
    for seed in seeds:
        out = cache / f"to_end-seed{seed}-n{args.trials}"
        if not (out / "tune.json").is_file():
            params = set_dotted(raw, "tune.seed", seed)
            params = set_dotted(params, "tune.num_samples", args.trials)
            params = set_dotted(params, "tune.asha.grace_period", max_t)  # ASHA cannot stop any trial
            params = set_dotted(params, "ray.checkpoints_to_keep", max_t)  # every epoch's, for test accuracy
            params = set_dotted(params, "ray.storage_path", str(out / "ray"))
            report["runs"][f"to_end-{seed}"] = run_tune(f"to-end-{seed}", params, out, data, pretrain_model)
        curves_by_seed[seed] = read_curves(out, cfg)
        assert len(curves_by_seed[seed]) == args.trials, (seed, len(curves_by_seed[seed]))

    sizes = sorted({min(10, args.trials), args.trials})
    if args.sizes:
        sizes = sorted({min(int(n), args.trials) for n in args.sizes.split(",")})
    for name, make in {"to the end": None, **SCHEDULERS}.items():
        for n in sizes:
            costs, gaps, accuracy_gaps, tests, walls = [], [], [], [], []
            for seed in seeds:
                out = cache / f"to_end-seed{seed}-n{args.trials}"
                curves = curves_by_seed[seed][:n]
                full = replay(curves, lambda: None, SLOTS)
                run = replay(curves, (lambda make=make: make(max_t)) if make else (lambda: None), SLOTS)
                costs.append(sum(run.epochs_run.values()) / (n * max_t))
                gaps.append(100 * (full.best[0] - run.best[0]))
                accuracy_gaps.append(100 * (val_acc(curves, full.best) - val_acc(curves, run.best)))
                tests.append(checkpoint_test_acc(out, run.best[1], run.best[2], data))
                walls.append(run.seconds)
            key = f"{name} · {n} trials"
            report["schedulers"][key] = {
                "cost": spread(costs),
                "gap_points": spread(gaps),  # in the sweep metric (×100: accuracy points, or loss × 100)
                "val_acc_gap_points": spread(accuracy_gaps),
                "test_acc": spread(tests),
                "wall_s": spread(walls),
            }
            print(
                f"{key:<34} cost {statistics.mean(costs):6.1%} ± {statistics.pstdev(costs):5.1%}   "
                f"gap {statistics.mean(gaps):5.2f} ± {statistics.pstdev(gaps):4.2f} (max {max(gaps):.2f})   "
                f"val acc gap {statistics.mean(accuracy_gaps):5.2f} pts (max {max(accuracy_gaps):.2f})   "
                f"test {statistics.mean(tests):.4f} ± {statistics.pstdev(tests):.4f}   "
                f"wall {statistics.mean(walls):5.0f} s",
                flush=True,
            )

    if args.confirm:
        scheduler = f"asha {'backbone' if cfg.tune.asha.clock == 'backbone_epochs' else 'epoch'}"
        report["confirm"] = {}
        for seed in seeds:
            out = cache / f"configured-seed{seed}"
            params = set_dotted(set_dotted(raw, "tune.seed", seed), "ray.storage_path", str(out / "ray"))
            summary = run_tune(f"configured-{seed}", params, out, data, pretrain_model)
            asha = Asha(
                cfg.tune.asha.grace_period, cfg.tune.asha.reduction_factor, max_t, cfg.tune.asha.clock
            )
            n = cfg.tune.num_samples
            simulated = replay(curves_by_seed[seed][:n], lambda asha=asha: asha, SLOTS)
            real = read_curves(out, cfg)
            report["confirm"][seed] = {
                "scheduler": f"{scheduler} g{cfg.tune.asha.grace_period} rf{cfg.tune.asha.reduction_factor:g}",
                "real": {c.trial_id[-5:]: len(c.values) for c in real},
                "replayed": {t[-5:]: e for t, e in simulated.epochs_run.items()},
                "real_best": summary[f"best_{cfg.tune.metric}"],
                "replayed_best": simulated.best[0],
                "real_summary": summary,
            }
            print(json.dumps(report["confirm"][seed]), flush=True)

    if args.scratch:
        for seed in seeds:
            out = cache / f"scratch-seed{seed}-n{cfg.tune.num_samples}"
            params = set_dotted(raw, "tune.seed", seed)
            params = set_dotted(params, "tune.asha.grace_period", max_t)
            params = set_dotted(params, "finetune.pretrained", "none")
            params = set_dotted(params, "finetune.model", cfg.pretrain.model)
            strategy = {"distribution": "choice", "values": ["full"]}
            params = set_dotted(params, "tune.search_space.strategy", strategy)
            params = set_dotted(params, "ray.storage_path", str(out / "ray"))
            if not (out / "tune.json").is_file():
                run_tune(f"scratch-{seed}", params, out, data, pretrain_model)
            from resnet.evaluate import evaluate_model_file

            test = evaluate_model_file(out / "models" / "model.pt", data).metrics["test_acc"]
            summary = json.loads((out / "tune.json").read_text())
            report.setdefault("scratch", {})[seed] = {
                "best_val": summary[f"best_{cfg.tune.metric}"],
                "test": test,
            }
            print(f"scratch seed {seed}: {report['scratch'][seed]}", flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
