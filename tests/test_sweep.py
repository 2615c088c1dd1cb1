"""The tune stage against a real (session) Ray cluster and a real MLflow store: a sweep whose driver is killed,
twice, resumes each time the stage runs again (finished trials are not re-run, the unfinished one continues from
its checkpoint, Optuna's study goes on) and its table agrees with its MLflow child runs; ASHA stops trials that
fall behind, with the sweep's state and checkpoints in S3."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from stagerun import REPO, run_stage_ok, stage_command, stage_env, wait_for

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints
EPOCHS = 8  # the killed sweep's trial length


# ---------------------------------------------------------------- helpers without a cluster


def test_split_draw_sends_each_key_to_its_section():
    from resnet.sweep import split_draw

    finetune, augment = split_draw({"lr": 0.1, "mixup_alpha": 0.2, "strategy": "lp_ft", "batch_size": 64})
    assert finetune == {"lr": 0.1, "strategy": "lp_ft", "batch_size": 64}
    assert augment == {"mixup_alpha": 0.2}


def test_max_epochs_and_summary():
    from resnet.config import parse_config
    from resnet.sweep import sweep_summary

    cfg = parse_config({"finetune": {"epochs": 6}})
    assert cfg.max_trial_epochs == 6
    space = {"epochs": {"distribution": "randint", "low": 2, "high": 9}}
    assert parse_config({"tune": {"search_space": space}}).max_trial_epochs == 8
    assert (
        parse_config({"finetune": {"epochs": 6}, "tune": {"asha": {"max_epochs": 6}}}).max_trial_epochs == 6
    )
    # Each trial's budget is its own length: a drawn 4-epoch trial costs 4, not the longest trial's 8.
    table = [
        {
            "max_epochs": 8,
            "epochs_reported": 8,
            "stopped_early": False,
            "early_stopped": False,
            "error": None,
        },
        {
            "max_epochs": 4,
            "epochs_reported": 4,
            "stopped_early": False,
            "early_stopped": False,
            "error": None,
        },
        {"max_epochs": 8, "epochs_reported": 1, "stopped_early": True, "early_stopped": False, "error": None},
        {"max_epochs": 8, "epochs_reported": 5, "stopped_early": False, "early_stopped": True, "error": None},
        {"max_epochs": 4, "epochs_reported": 2, "stopped_early": False, "early_stopped": False, "error": "X"},
    ]
    assert sweep_summary(table) == {
        "trials": 5,
        "stopped_early": 1,
        "early_stopped": 1,
        "failed": 1,
        "trial_epochs": 20,
        "budget_epochs": 32,
        "epochs_fraction": 0.625,
    }


class _Result:
    """What sweep_table reads of a Tune Result."""

    def __init__(self, trial_id, config, epochs, values, early_stopped=False, error=None):
        import pandas as pd

        self.config, self.error, self.path = config, error, f"/runs/sweep/run_trial_{trial_id}"
        self.metrics = {"trial_id": trial_id}
        rows = [
            {"epoch": e, "val_acc": v, "early_stopped": False} for e, v in zip(epochs, values, strict=True)
        ]
        if rows:
            rows[-1]["early_stopped"] = early_stopped
        self.metrics_dataframe = pd.DataFrame(rows)


def test_sweep_table_keeps_a_drawn_epochs_and_says_who_stopped_a_trial():
    from resnet.config import parse_config
    from resnet.sweep import sweep_table

    space = {"epochs": {"distribution": "choice", "values": [3, 6]}}
    cfg = parse_config({"finetune": {"epochs": 6}, "tune": {"metric": "val_acc", "search_space": space}})
    results = [
        _Result("a", {"epochs": 3}, [1, 2, 3], [0.5, 0.6, 0.7]),  # a short trial run to its own end
        _Result("b", {"epochs": 6}, [1, 2], [0.4, 0.45]),  # ASHA stopped it
        _Result("c", {"epochs": 6}, [1, 2, 3, 4], [0.5, 0.8, 0.7, 0.7], early_stopped=True),  # patience
        _Result("d", {"epochs": 6}, [1], [0.3], error=RuntimeError("died")),
    ]
    rows = {row["trial_id"]: row for row in sweep_table(results, cfg)}
    assert [(r["epochs"], r["max_epochs"], r["epochs_reported"]) for r in rows.values()] == [
        (3, 3, 3),
        (6, 6, 2),
        (6, 6, 4),
        (6, 6, 1),
    ]
    assert [(r["stopped_early"], r["early_stopped"], r["error"]) for r in rows.values()] == [
        (False, False, None),
        (True, False, None),
        (False, True, None),
        (False, False, "RuntimeError"),
    ]
    assert (rows["c"]["best_val_acc"], rows["c"]["best_epoch"]) == (0.8, 2)


def test_trial_resources_count_workers_per_trial_and_gpus():
    from resnet.config import parse_config
    from resnet.sweep import trial_ray_config, trial_resources

    cfg = parse_config(
        {
            "ray": {"num_workers": 4, "cpus_per_worker": 2},
            "finetune": {"batch_size": 48},
            "tune": {"workers_per_trial": 3, "search_space": {}},
        }
    )
    assert trial_resources(cfg) == {"CPU": 6}
    assert trial_ray_config(cfg).num_workers == 3
    gpu = parse_config(
        {
            "ray": {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 0.5},
            "tune": {"workers_per_trial": None},
        }
    )
    assert trial_resources(gpu) == {"CPU": 2, "GPU": 1.0}


# ---------------------------------------------------------------- against the session's Ray cluster


@pytest.fixture(scope="module")
def target(tiny_fractals, tmp_path_factory) -> dict:
    """A tiny target (tests/conftest.py) and a 'pretrained' resnet20 file with 7 classes to start from."""
    from resnet.engine import save_model_file
    from resnet.models import build_model

    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("sweep") / "start.pt"
    save_model_file(weights, build_model("resnet20", 7), {"model_name": "resnet20", "num_classes": 7})
    return {"data": tiny_fractals, "weights": weights}


def _params(work: Path, weights: Path, **tune) -> dict:
    return {
        "datasets": {"fractals": {"source": "fractals"}},
        "finetune": {
            "dataset": "fractals",
            "pretrained": str(weights),  # a local model file with 7 classes: the head is replaced for 10
            "epochs": 6,
            "batch_size": 16,
            "lr": 0.05,
        },
        "augment": {"crop_padding": 0},
        "tune": {"workers_per_trial": 1, "metric": "val_acc", **tune},  # the tests read accuracies
        "ray": {"storage_path": str(work / "ray"), "max_failures": 0},
    }


def _command(work: Path, data: Path) -> list[str]:
    return stage_command("tune", work, data, out="models", table="sweep.csv", metrics="tune.json")


def _registered_epoch(run_dir: Path) -> int:
    """The last epoch Ray Train registered for a trial's run (0: none yet)."""
    try:
        snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("epoch", 0))


def _files(directory: Path) -> dict[str, float]:
    return {str(p.relative_to(directory)): p.stat().st_mtime for p in directory.rglob("*") if p.is_file()}


def _sweep_runs(work: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resnet-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def _table(work: Path) -> list[dict[str, str]]:
    with open(work / "sweep.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _trial_runs(work: Path) -> list[Path]:
    """The trials' Ray Train run directories (named by trial ID), in the order the sweep started them: Tune
    numbers its trials in their own directories' names, run_trial_<ID>_<N>_…"""
    names = [path.name for path in work.glob("ray/tune-*/run_trial_*")]
    numbered = []
    for run in work.glob("ray/tune-*-trainers/*"):
        prefix = f"run_trial_{run.name}_"
        for name in names:
            if name.startswith(prefix):
                numbered.append((int(name[len(prefix) :].split("_")[0]), run))
    return [run for _, run in sorted(numbered)]


def _kill_the_driver_when(command, env, trial: int, tmp_path: Path) -> tuple[list[Path], str]:
    """Run the stage and SIGKILL its driver once trial `trial` (0-based) has registered 2 epochs and the ones
    before it have finished; returns the trials' run directories then and the driver's output."""
    driver = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:

        def mid_run() -> list[Path] | None:
            runs = _trial_runs(tmp_path)
            if len(runs) > trial and _registered_epoch(runs[trial]) >= 2:
                assert all(_registered_epoch(run) == EPOCHS for run in runs[:trial])
                return runs
            return None

        runs = wait_for(mid_run, 420, f"trial {trial + 1} to save 2 epochs")
        # The sweep's state was saved since this trial started (every resnet.sweep.STATE_SAVE_SECONDS): its
        # start-up alone takes longer.
        driver.send_signal(signal.SIGKILL)  # the driver dies without any cleanup of its own
        output, _ = driver.communicate(timeout=60)
    finally:
        driver.kill()
    return runs, output


@pytest.mark.integration
def test_a_sweep_driver_killed_twice_resumes_finished_trials_kept_unfinished_continued(
    ray_address, target, tmp_path
):
    # One trial at a time and no early stopping (grace period = the full length), so that when the driver is
    # killed, the trials before have finished, one is mid-run, and the rest have not started. 8 epochs of
    # ~0.5 s: each kill lands well inside a trial. Killed in the first trial, then (resumed: the first
    # continued to its end) in the second, which Optuna's TPE drew after the restore: its state (the study) is
    # restored with the sweep's.
    params = _params(
        tmp_path,
        target["weights"],
        num_samples=2,
        search="optuna",
        seed=6,  # draws lp_ft, then full
        max_concurrent_trials=1,
        asha={"grace_period": EPOCHS},
    )
    params["finetune"] |= {"epochs": EPOCHS, "lp_epochs": 1}
    params["tune"]["search_space"] = {
        "lr": {"distribution": "loguniform", "low": 0.02, "high": 0.1},
        "strategy": {"distribution": "choice", "values": ["full", "lp_ft", "gradual"]},
        "lr_decay": {"distribution": "uniform", "low": 0.5, "high": 1.0},
        "mixup_alpha": {"distribution": "choice", "values": [0.0, 0.2]},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command, env = _command(tmp_path, target["data"]), stage_env(ray_address, tmp_path)

    killed_at, kept = [], {}  # the interrupted trial's last registered epoch; finished trials' files
    for trial in (0, 1):
        runs, output = _kill_the_driver_when(command, env, trial, tmp_path)
        killed_at.append(_registered_epoch(runs[trial]))
        assert 2 <= killed_at[-1] < EPOCHS, output[-3000:]
        assert not (tmp_path / "models" / "model.pt").exists()
        for finished in runs[:trial]:
            # A finished trial is not run again: its Ray Train run is what it was when it finished.
            kept.setdefault(finished, _files(finished))
            assert _files(finished) == kept[finished], f"{finished.name} changed after it finished"
        assert ("resuming sweep" in output) == (trial == 1), output[-3000:]

    assert "resuming sweep" in run_stage_ok(command, env)

    trials = _trial_runs(tmp_path)
    assert len(trials) == 2
    for finished, files in kept.items():
        assert _files(finished) == files, f"{finished.name} changed after it finished"
    # Each interrupted trial continued from its last registered epoch to the end, in the same run.
    for trial, at in zip((0, 1), killed_at, strict=True):
        checkpoints = sorted(trials[trial].glob("checkpoint_*/model.pt"))
        last = torch.load(checkpoints[-1], weights_only=True)["meta"]["metrics"]
        assert last["epoch"] == EPOCHS and last["start_epoch"] == at

    summary = json.loads((tmp_path / "tune.json").read_text())
    assert summary["resumed"] is True and summary["trials"] == 2 and summary["trial_epochs"] == 2 * EPOCHS
    table = _table(tmp_path)
    assert sorted(row["trial_id"] for row in table) == sorted(path.name for path in trials)
    assert sorted(row["strategy"] for row in table) == ["full", "lp_ft"]  # tune.seed 6's draws
    assert all(row["epochs_reported"] == str(EPOCHS) and row["stopped_early"] == "False" for row in table)

    # MLflow: the sweep's run was reopened (one parent), each trial has one child run (the interrupted ones
    # were reopened too) with one curve point per epoch, and each resume is recorded where it happened.
    client, parents, children = _sweep_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert (
        parents[0].data.tags["tune.resumed"] == "True" and parents[0].data.params["tune.search"] == "optuna"
    )
    assert len(children) == 2 and all(child.info.status == "FINISHED" for child in children)
    by_trial = {child.data.tags["tune.trial_id"]: child for child in children}
    for row in table:
        history = client.get_metric_history(by_trial[row["trial_id"]].info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # each once, the resumed too
    resumed = {
        path.name: [
            m.value for m in client.get_metric_history(by_trial[path.name].info.run_id, "resumed_from_epoch")
        ]
        for path in trials
    }
    assert resumed == {trials[0].name: [killed_at[0]], trials[1].name: [killed_at[1]]}

    # Each row of the table and its child run say the same things, and Optuna's draws are inside the space.
    by_id = {child.info.run_id: child for child in children}
    for row in table:
        assert 0.02 <= float(row["lr"]) <= 0.1 and row["strategy"] in ("full", "lp_ft", "gradual")
        assert row["mixup_alpha"] in ("0.0", "0.2")
        child = by_id[row["mlflow_run_id"]]
        assert child.data.tags["tune.trial_id"] == row["trial_id"]
        assert float(child.data.params["finetune.lr"]) == pytest.approx(float(row["lr"]))
        assert child.data.params["finetune.strategy"] == row["strategy"]
        assert float(child.data.params["augment.mixup_alpha"]) == float(row["mixup_alpha"])
        assert child.data.tags["tune.epochs_reported"] == row["epochs_reported"]
        curve = client.get_metric_history(child.info.run_id, "val_acc")
        assert max(m.value for m in curve) == pytest.approx(float(row["best_val_acc"]))
        assert child.data.metrics["best_val_acc"] == pytest.approx(float(row["best_val_acc"]))
        assert child.data.tags["tune.stopped_early"] == row["stopped_early"]
        # Each layer group's LR is logged per epoch: the head at the drawn LR's schedule, the stem below it.
        head, stem = (
            sorted(client.get_metric_history(child.info.run_id, f"lr_{g}"), key=lambda m: m.step)[0].value
            for g in ("head", "stem")
        )
        if row["strategy"] == "full":
            assert stem == pytest.approx(head * float(row["lr_decay"]) ** 4)
        else:  # head-only first epoch
            assert stem == 0.0 and head > 0
    best = json.loads((tmp_path / "models" / "best.json").read_text())
    top = max(table, key=lambda row: float(row["best_val_acc"]))
    assert best["metrics"]["val_acc"] == pytest.approx(float(top["best_val_acc"]))
    assert best["trial_id"] == top["trial_id"] and best["config"]["finetune"]["strategy"] == top["strategy"]
    meta = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["meta"]
    assert meta["num_classes"] == 10 and meta["pretrained"] == str(target["weights"])
    assert not math.isnan(summary["best_val_acc"])


@pytest.mark.integration
def test_asha_stops_trials_that_fall_behind_with_state_and_checkpoints_in_s3(
    ray_address, target, tmp_path, s3_env
):
    """Trials one at a time, the first learning (lr 0.05) and the second not at all (lr 1e-7; tune.seed 1 draws
    them in that order): at the rung after epoch 1 the second is below the cutoff of the first, so ASHA stops it
    there, and the table, MLflow, the summary and the output say so.
    With `ray.storage_path: s3://…` on the S3 server: the Tune experiment and every trial's checkpoints are in the
    bucket, nothing is on local disk, and the best model is read back from there."""
    from resnet.data import s3

    params = _params(
        tmp_path,
        target["weights"],
        num_samples=2,
        seed=1,
        max_concurrent_trials=1,
        asha={"grace_period": 1, "reduction_factor": 2},
    )
    params["finetune"]["epochs"] = 2
    params["ray"]["storage_path"] = "s3://ray/asha"
    params["tune"]["search_space"] = {"lr": {"distribution": "choice", "values": [0.05, 1e-7]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # The stage's environment carries the s3_env fixture's AWS_* variables.
    output = run_stage_ok(_command(tmp_path, target["data"]), stage_env(ray_address, tmp_path))
    table = _table(tmp_path)
    assert [(row["lr"], row["epochs_reported"], row["stopped_early"]) for row in table] == [
        ("0.05", "2", "False"),
        ("1e-07", "1", "True"),
    ]
    client, _, children = _sweep_runs(tmp_path)
    stopped = {c.data.tags["tune.trial_id"]: c.data.tags["tune.stopped_early"] for c in children}
    assert stopped == {row["trial_id"]: row["stopped_early"] for row in table}
    by_trial = {c.data.tags["tune.trial_id"]: c for c in children}
    for row in table:
        # A stopped trial's workers may finish the epoch in flight when ASHA's stop arrives: logged, run, counted.
        curve = client.get_metric_history(by_trial[row["trial_id"]].info.run_id, "val_acc")
        assert sorted(m.step for m in curve) == list(range(1, int(row["epochs_run"]) + 1))
        assert int(row["epochs_run"]) in (int(row["epochs_reported"]), int(row["epochs_reported"]) + 1)
    summary = json.loads((tmp_path / "tune.json").read_text())
    assert (summary["stopped_early"], summary["budget_epochs"]) == (1, 4)
    assert summary["trial_epochs"] in (3, 4)  # a stopped trial may finish the epoch in flight
    for row in table[1:]:
        assert f"tune: trial {row['trial_id']} epoch 1/2: val_acc" in output
        assert f"tune: trial {row['trial_id']} stopped by ASHA after epoch 1" in output
    assert "tune: 2/2 trials done; best: 1. " + table[0]["trial_id"] in output

    keys = [key for key, _ in s3.list_objects("s3://ray/asha")]
    assert any(key.rsplit("/", 1)[-1].startswith("experiment_state") for key in keys)  # what a resume reads
    states = [key for key in keys if "-trainers/" in key and key.endswith("/state.pt")]
    assert len({key.split("-trainers/")[1].split("/")[0] for key in states}) == 2  # every trial's run
    assert not list(tmp_path.glob("**/checkpoint_*"))  # nothing on local disk
    best = json.loads((tmp_path / "models" / "best.json").read_text())
    assert best["checkpoint"].startswith("ray/asha/")  # a path in the bucket (on the S3 filesystem)
    assert best["trial_id"] == table[0]["trial_id"]
    meta = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["meta"]
    assert meta["metrics"]["val_acc"] == pytest.approx(best["metrics"]["val_acc"])


def test_the_replayed_asha_takes_the_decisions_of_ray_tunes(repo_root):
    """benchmarks/asha_sim.py replays early stopping on recorded curves: its ASHA must stop exactly where Ray
    Tune's own bracket does, for random results in a random arrival order."""
    import random
    import sys
    from types import SimpleNamespace

    from ray.tune.schedulers.async_hyperband import _Bracket

    sys.path.insert(0, str(repo_root / "benchmarks"))
    from asha_sim import Asha, Curve

    rng = random.Random(0)
    for grace, rf in ((1, 3), (1, 2), (2, 3)):
        ours, theirs = Asha(grace, rf, 9), _Bracket(grace, 9, rf, 0)
        curves = [Curve(f"t{i}", {}, [rng.random() for _ in range(9)], [1.0] * 9) for i in range(12)]
        progress = dict.fromkeys(range(12), 0)
        decisions = []
        while progress:
            index = rng.choice(sorted(progress))
            progress[index] += 1
            epoch, curve = progress[index], curves[index]
            value = curve.values[epoch - 1]
            stop = ours.on_result(curve, epoch, value)
            expected = theirs.on_result(SimpleNamespace(trial_id=curve.trial_id), epoch, value) == "STOP"
            decisions.append(stop)
            assert stop == (expected or epoch >= 9), (grace, rf, curve.trial_id, epoch)
            if stop or epoch == 9:
                del progress[index]
        assert any(decisions) and not all(decisions)
