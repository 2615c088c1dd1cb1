"""Ray Tune: a sweep of fine-tuning configurations, each trial fitting its own TorchTrainer (Ray Train V2).

A trial is a function: it merges its sampled values into the `finetune` section, opens an MLflow child run under
the sweep's run, and fits a `TorchTrainer` whose workers report every epoch through `TuneReportCallback`, which
is what ASHA sees to stop weak trials early. The trial itself holds a token 0.01 CPU; its workers take the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import ray
import ray.tune
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from resnet.config import Config, FinetuneConfig
from resnet.distributed import Storage, TrainJob, make_trainer
from resnet.tracking import RunHandle, start_run

TRIAL_CPU = 0.01  # Tune refuses 0; the trial function only waits on its trainer


def search_space(cfg: Config) -> dict[str, Any]:
    """params.yaml's typed distributions → Ray Tune's sampling objects."""
    space = {}
    for key, dist in cfg.tune.search_space.items():
        if dist.distribution == "loguniform":
            space[key] = tune.loguniform(dist.low, dist.high)
        elif dist.distribution == "uniform":
            space[key] = tune.uniform(dist.low, dist.high)
        elif dist.distribution == "randint":
            space[key] = tune.randint(dist.low, dist.high)
        else:
            space[key] = tune.choice(dist.values)
    return space


def max_epochs(cfg: Config) -> int:
    """The longest a trial may run: ASHA's `max_t`."""
    dist = cfg.tune.search_space.get("epochs")
    if dist is None:
        return cfg.finetune.epochs
    if dist.distribution == "choice":
        return max(int(v) for v in dist.values)
    return int(dist.high) - (1 if dist.distribution == "randint" else 0)


def max_concurrent_trials(cfg: Config) -> int:
    """As many trials as the cluster's CPUs hold at once, given each trial's workers (at least one)."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    per_trial = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    return max(1, math.floor(ray.cluster_resources().get("CPU", 1) / per_trial))


@dataclass(frozen=True)
class SweepJob:
    """What every trial shares (pickled to the trial actors)."""

    base: TrainJob
    finetune: dict[str, Any]
    ray_cfg: dict[str, Any]
    storage: Storage
    metric: str
    mode: str
    experiment: str
    root: str
    parent: RunHandle | None


def run_trial(sampled: dict[str, Any], sweep: SweepJob) -> None:
    """One Tune trial: validate the sampled fine-tuning config, then fit a TorchTrainer with it."""
    from resnet.config import RayConfig

    trial_id = ray.tune.get_context().get_trial_id()
    optim = FinetuneConfig(**(sweep.finetune | sampled))
    ray_cfg = RayConfig(**sweep.ray_cfg)
    run = None
    if sweep.parent is not None:
        run = start_run(
            sweep.parent.tracking_uri,
            sweep.experiment,
            f"trial-{trial_id}",
            root=sweep.root,
            parent=sweep.parent,
            tags={"pipeline.stage": "tune", "tune.trial_id": trial_id},
        )
        run.log_params(optim.model_dump())
    job = replace(sweep.base, optim=optim.model_dump(), mlflow_run=run)
    # Leave room for this trial's own 0.01 CPU: on a 2-CPU machine 2 workers × 1.0 would never be placed.
    cpus = ray_cfg.cpus_per_worker - TRIAL_CPU / ray_cfg.num_workers
    trainer = make_trainer(
        job,
        ray_cfg,
        name=f"train-{trial_id}",
        storage=sweep.storage,
        metric=sweep.metric,
        mode=sweep.mode,
        cpus_per_worker=round(cpus, 4),
        callbacks=[TuneReportCallback()],
    )
    # No try/finally around this: when ASHA stops the trial, Tune kills this function mid-fit, so the child
    # run is closed by the sweep's driver (`close_trial_runs`), which sees how every trial ended.
    trainer.fit()


def run_sweep(
    cfg: Config, base: TrainJob, *, storage: Storage, name: str, root: str, parent: RunHandle | None
):
    """Fit the sweep; returns the Tune `ResultGrid`."""
    sweep = SweepJob(
        base=base,
        finetune=cfg.finetune.model_dump(),
        ray_cfg=cfg.ray.model_dump(),
        storage=storage,
        metric=cfg.tune.metric,
        mode=cfg.tune.mode,
        experiment=cfg.mlflow.experiment,
        root=root,
        parent=parent,
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_epochs(cfg),
        grace_period=min(cfg.tune.asha.grace_period, max_epochs(cfg)),
        reduction_factor=cfg.tune.asha.reduction_factor,
    )
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"CPU": TRIAL_CPU}),
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            num_samples=cfg.tune.num_samples,
            scheduler=scheduler,
            # Tune applies max_concurrent_trials only to a search algorithm it builds itself: give ours the limit.
            search_alg=BasicVariantGenerator(
                max_concurrent=max_concurrent_trials(cfg), random_state=cfg.tune.seed
            ),
        ),
        run_config=ray.tune.RunConfig(name=name, **storage.run_config_kwargs()),
    )
    return tuner.fit()


def sweep_table(results, metric: str, mode: str, max_t: int) -> list[dict[str, Any]]:
    """One row per trial: its sampled values, epochs run, best metric, and whether ASHA stopped it early."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        epochs = 0 if history is None or history.empty else int(history["epoch"].max())
        values = [] if history is None or history.empty else history[metric].tolist()
        best = (max if mode == "max" else min)(values) if values else float("nan")
        row = {"trial_id": result.metrics.get("trial_id") if result.metrics else None}
        row.update({k: v for k, v in (result.config or {}).items()})
        row.update(
            {
                "epochs": epochs,
                f"best_{metric}": best,
                "stopped_early": bool(epochs < max_t and result.error is None),
                "error": None if result.error is None else type(result.error).__name__,
            }
        )
        rows.append(row)
    return rows


def close_trial_runs(parent: RunHandle, experiment: str, table: list[dict[str, Any]], metric: str) -> int:
    """End every trial's MLflow child run with what the sweep table says about it: FINISHED (stopped early or
    not, tagged so) or FAILED, plus its best metric. Returns how many child runs were found."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent.tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    rows = {row["trial_id"]: row for row in table}
    for child in children:
        row = rows.get(child.data.tags.get("tune.trial_id"))
        if row is None:
            continue
        handle = RunHandle(parent.tracking_uri, child.info.run_id)
        handle.set_tags({"tune.stopped_early": row["stopped_early"], "tune.epochs": row["epochs"]})
        if row[f"best_{metric}"] == row[f"best_{metric}"]:  # not NaN: the trial reported at least once
            handle.log_metrics({f"best_{metric}": row[f"best_{metric}"]})
        handle.end("FAILED" if row["error"] else "FINISHED")
    return len(children)


def best_checkpoint_path(results, metric: str, mode: str) -> tuple[Any, str]:
    """(best result, path of its best epoch's checkpoint) over every epoch of every trial."""
    best = results.get_best_result(metric=metric, mode=mode, scope="all")
    history = best.metrics_dataframe
    # Newest first: on a tie Ray Train keeps the later checkpoint, and idxmax/idxmin return the first match.
    history = history[history[CHECKPOINT_PATH_KEY].notna()].iloc[::-1]
    index = history[metric].idxmax() if mode == "max" else history[metric].idxmin()
    return best, history.loc[index, CHECKPOINT_PATH_KEY]
