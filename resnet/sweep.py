"""Ray Tune: a sweep of fine-tuning configurations, each trial fitting its own TorchTrainer (Ray Train V2).

A trial is a function: it merges its sampled values into the `finetune` and `augment` sections, opens (or, on
a resumed sweep, reopens) an MLflow child run under the sweep's run, and fits a `TorchTrainer` whose workers
report every epoch through `TuneReportCallback`, which is what ASHA sees to stop weak trials early. The trial
itself holds a token 0.01 CPU; its workers take the rest.

Resuming. The sweep's name is a fingerprint of everything that decides its trials (config, data, starting
weights, code), and each trial's TorchTrainer is named after its trial id under the sweep's storage. Running
the stage again after its driver died restores the Tune experiment: finished trials keep their results and are
not run again; an unfinished trial's function runs again, and its TorchTrainer, finding its own earlier run
under the same name, continues from that run's last checkpoint. ASHA's rungs start empty after a restore
(Tune does not save scheduler state), so a resumed trial is judged against the results that come after it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

import ray
import ray.tune
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from resnet.config import AugmentConfig, Config, FinetuneConfig, RayConfig, searchable_section
from resnet.distributed import Storage, TrainJob, make_trainer
from resnet.tracking import RunHandle, find_unfinished_run, start_run

TRIAL_CPU = 0.01  # Tune refuses 0; the trial function only waits on its trainer
# Seconds between saves of the sweep's state (Tune's default is at least 10). What a killed driver had not
# saved is redone on resume, so a short period loses little; the state of a small sweep is a few kB.
STATE_SAVE_SECONDS = "2"


def search_space(cfg: Config) -> dict[str, Any]:
    """params.yaml's typed distributions → Ray Tune's sampling objects (flat keys: `lr`, `mixup_alpha`)."""
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


def split_draw(sampled: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's sampled values → (finetune overrides, augment overrides)."""
    finetune = {k: v for k, v in sampled.items() if searchable_section(k) == "finetune"}
    augment = {k: v for k, v in sampled.items() if searchable_section(k) == "augment"}
    return finetune, augment


def trial_epochs(config: dict[str, Any], default: int) -> int:
    """The length of the trial with the sampled `config`: its drawn epochs, else `default` (finetune.epochs)."""
    return int(config.get("epochs", default))


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial's workers hold together."""
    workers = cfg.workers_per_trial
    resources = {"CPU": workers * cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = workers * cfg.ray.gpus_per_worker
    return resources


def max_concurrent_trials(cfg: Config) -> int:
    """`tune.max_concurrent_trials`, else as many trials as the cluster's resources hold at once (at least 1)."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    cluster = ray.cluster_resources()
    fits = [math.floor(cluster.get(name, 0) / need) for name, need in trial_resources(cfg).items()]
    return max(1, min(fits))


def trial_ray_config(cfg: Config) -> RayConfig:
    """The Ray section a trial's trainer uses: `tune.workers_per_trial` workers."""
    return cfg.ray.model_copy(update={"num_workers": cfg.workers_per_trial})


@dataclass(frozen=True)
class SweepJob:
    """What every trial shares (pickled to the trial actors)."""

    base: TrainJob
    finetune: dict[str, Any]
    augment: dict[str, Any]
    ray_cfg: dict[str, Any]
    storage: Storage  # where the trials' TorchTrainers keep their runs
    metric: str
    mode: str
    experiment: str
    root: str
    parent: RunHandle | None


def trial_run(sweep: SweepJob, trial_id: str, params: dict[str, Any]) -> RunHandle | None:
    """The trial's MLflow child run: its unfinished run from before a restore, else a new one."""
    if sweep.parent is None:
        return None
    tags = {"tune.trial_id": trial_id, "mlflow.parentRunId": sweep.parent.run_id}
    previous = find_unfinished_run(sweep.parent.tracking_uri, sweep.experiment, tags)
    if previous is not None:
        return previous
    run = start_run(
        sweep.parent.tracking_uri,
        sweep.experiment,
        f"trial-{trial_id}",
        root=sweep.root,
        parent=sweep.parent,
        tags={"pipeline.stage": "tune", "tune.trial_id": trial_id},
    )
    run.log_params(params)
    return run


def run_trial(sampled: dict[str, Any], sweep: SweepJob) -> None:
    """One Tune trial: validate the sampled config, then fit (or continue) a TorchTrainer with it."""
    trial_id = ray.tune.get_context().get_trial_id()
    finetune_draw, augment_draw = split_draw(sampled)
    optim = FinetuneConfig(**(sweep.finetune | finetune_draw))
    augment = AugmentConfig(**(sweep.augment | augment_draw))
    ray_cfg = RayConfig(**sweep.ray_cfg)
    run = trial_run(sweep, trial_id, {"finetune": optim.model_dump(), "augment": augment.model_dump()})
    job = replace(sweep.base, optim=optim.model_dump(), augment=augment.model_dump(), mlflow_run=run)
    # Leave room for this trial's own 0.01 CPU: on a 2-CPU machine 2 workers × 1.0 would never be placed.
    cpus = ray_cfg.cpus_per_worker - TRIAL_CPU / ray_cfg.num_workers
    trainer = make_trainer(
        job,
        ray_cfg,
        name=trial_id,  # stable across a restore: the trainer finds and continues its earlier run
        storage=sweep.storage,
        metric=sweep.metric,
        mode=sweep.mode,
        cpus_per_worker=round(cpus, 4),
        callbacks=[TuneReportCallback()],
    )
    # No try/finally around this: when ASHA stops the trial, Tune kills this function mid-fit, so the child
    # run is closed by the sweep's driver (`close_trial_runs`), which sees how every trial ended.
    trainer.fit()


def search_algorithm(cfg: Config):
    """Random sampling or Optuna's TPE, both seeded and held to the concurrency limit (Tune applies its own
    max_concurrent_trials only to a search algorithm it builds itself)."""
    limit = max_concurrent_trials(cfg)
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.tune.seed), max_concurrent=limit)
    return BasicVariantGenerator(max_concurrent=limit, random_state=cfg.tune.seed)


# Ray Tune copies these from the driver's environment into every trial actor's runtime_env, which the dashboard
# shows and each node's runtime env agent logs. The nodes hold their own credentials (as the stages' drivers
# forward none: resnet.distributed.FORWARDED_ENV), so Tune is kept from copying them.
CREDENTIAL_ENV = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}
)


def keep_credentials_out_of_trials() -> None:
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) - CREDENTIAL_ENV


def run_sweep(
    cfg: Config,
    base: TrainJob,
    *,
    storage: Storage,
    name: str,
    root: str,
    parent: RunHandle | None,
    callbacks: list | None = None,
):
    """Fit the sweep `name` under `storage`, or resume it if an earlier driver left it unfinished; returns the
    Tune `ResultGrid` and whether it was resumed. `callbacks`: more Tune callbacks (driver side), after the
    sweep's own progress lines."""
    sweep = SweepJob(
        base=base,
        finetune=cfg.finetune.model_dump(),
        augment=cfg.augment.model_dump(),
        ray_cfg=trial_ray_config(cfg).model_dump(),
        storage=replace(storage, path=f"{storage.path}/{name}-trainers"),
        metric=cfg.tune.metric,
        mode=cfg.tune.mode,
        experiment=cfg.mlflow.experiment,
        root=root,
        parent=parent,
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"CPU": TRIAL_CPU})
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_SAVE_SECONDS)  # read when the Tuner starts
    keep_credentials_out_of_trials()
    path = f"{storage.path}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=storage.filesystem):
        print(f"tune: resuming sweep {name}: finished trials are kept, unfinished ones continue", flush=True)
        tuner = tune.Tuner.restore(
            path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,  # continue from its checkpoint a trial that failed with its driver
            param_space=search_space(cfg),
            storage_filesystem=storage.filesystem,
        )
        return tuner.fit(), True
    # An epoch count from the training loop, not Tune's training_iteration, is ASHA's clock: a trial resumed
    # after a restore reports epochs k+1.. while Tune would count its iterations from 1 again.
    scheduler = ASHAScheduler(
        time_attr=cfg.tune.asha.clock,
        max_t=cfg.max_trial_epochs,  # the longest trial's length
        grace_period=cfg.tune.asha.grace_period,
        reduction_factor=cfg.tune.asha.reduction_factor,
    )
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            num_samples=cfg.tune.num_samples,
            scheduler=scheduler,
            search_alg=search_algorithm(cfg),
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            **storage.run_config_kwargs(),
            verbose=0,  # Tune's status tables: the sweep's own lines (SweepReporter) say what happens
            callbacks=[
                SweepReporter(cfg.tune.metric, cfg.tune.mode, cfg.finetune.epochs, cfg.tune.num_samples),
                *(callbacks or []),
            ],
        ),
    )
    return tuner.fit(), False


class SweepReporter(tune.Callback):
    """The sweep's progress on the driver, from the results Tune receives: a line when a trial starts (its
    draw), per epoch (its metric, and when ASHA stops it), when it ends or fails, and the standings of the
    finished trials. Kept with the Tuner's state, so a resumed sweep reports the same way."""

    def __init__(self, metric: str, mode: str, default_epochs: int, num_samples: int):
        self.metric, self.mode, self.default_epochs, self.num_samples = (
            metric,
            mode,
            default_epochs,
            num_samples,
        )
        self.best: dict[str, tuple[float, int]] = {}  # trial id → (best metric, its epoch)
        self.ended: dict[str, str] = {}  # trial id → how it ended

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def _length(self, trial) -> int:
        return trial_epochs(trial.config or {}, self.default_epochs)

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"tune: trial {trial.trial_id} started: {describe_draw(trial.config or {})}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric not in result or "epoch" not in result:
            return
        epoch, value = int(result["epoch"]), float(result[self.metric])
        best = self.best.get(trial.trial_id)
        if best is None or self._better(value, best[0]):
            self.best[trial.trial_id] = best = (value, epoch)
        line = f"tune: trial {trial.trial_id} epoch {epoch}/{self._length(trial)}: {self.metric} {value:.4f}"
        if result.get("done") and epoch < self._length(trial) and not result.get("early_stopped"):
            self.ended[trial.trial_id] = f"stopped by ASHA after epoch {epoch}"
            line += f" (best {best[0]:.4f}): stopped by ASHA"
        print(line, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        best = self.best.get(trial.trial_id)
        how = self.ended.setdefault(trial.trial_id, "finished")
        result = f"best {self.metric} {best[0]:.4f} at epoch {best[1]}" if best else "no result"
        print(f"tune: trial {trial.trial_id} {how}: {result}", flush=True)
        self._standings()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = "failed"
        error = str(getattr(trial, "error_file", "") or "")
        print(f"tune: trial {trial.trial_id} failed{f' (see {error})' if error else ''}", flush=True)
        self._standings()

    def _standings(self) -> None:
        done = [t for t in self.ended if t in self.best]
        ranked = sorted(done, key=lambda t: self.best[t][0], reverse=self.mode == "max")
        top = " · ".join(f"{i}. {t} {self.best[t][0]:.4f}" for i, t in enumerate(ranked[:3], 1))
        print(
            f"tune: {len(self.ended)}/{self.num_samples} trials done; best: {top or 'none yet'}", flush=True
        )


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def describe_draw(config: dict) -> str:
    """A trial's drawn values for a person: `lr=0.0383, strategy=full, …` (floats to 3 significant digits)."""
    return ", ".join(f"{key}={_short(value)}" for key, value in config.items())


def _history(result):
    """A trial's reported epochs, one row each (a resumed trial can report an epoch twice: keep the last)."""
    history = result.metrics_dataframe
    if history is None or history.empty or "epoch" not in history:
        return None
    return history.drop_duplicates("epoch", keep="last").sort_values("epoch")


def sweep_table(results, cfg: Config) -> list[dict[str, Any]]:
    """One row per trial: its sampled values; its length (`max_epochs`: a drawn `epochs`, else
    finetune.epochs); the epochs it reported; its best metric and that epoch; and how it ended: run to its
    length, `stopped_early` (stopped by the scheduler, ASHA), `early_stopped` (the engine's early stopping,
    `early_stopping_patience`) or an `error`."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows = []
    for result in results:
        history = _history(result)
        config = dict(result.config or {})
        row = {"trial_id": (result.metrics or {}).get("trial_id") or _trial_id(result), **config}
        if history is None:
            reported, best, best_epoch, engine_stopped = 0, float("nan"), 0, False
        else:
            reported = int(history["epoch"].max())
            index = history[metric].idxmax() if mode == "max" else history[metric].idxmin()
            best, best_epoch = float(history.loc[index, metric]), int(history.loc[index, "epoch"])
            engine_stopped = "early_stopped" in history and bool(history["early_stopped"].iloc[-1])
        length = trial_epochs(config, cfg.finetune.epochs)
        row.update(
            {
                "max_epochs": length,
                "epochs_reported": reported,
                f"best_{metric}": best,
                "best_epoch": best_epoch,
                "stopped_early": result.error is None and reported < length and not engine_stopped,
                "early_stopped": engine_stopped,
                "error": None if result.error is None else type(result.error).__name__,
            }
        )
        rows.append(row)
    return sorted(rows, key=lambda row: row["trial_id"])


def _trial_id(result) -> str | None:
    # A trial that never reported has no metrics; its directory name ends with its id.
    path = getattr(result, "path", None) or ""
    return path.rstrip("/").rsplit("/", 1)[-1] or None


def sweep_summary(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and the sweep's cost: trial-epochs run ÷ every trial run to its own length."""
    budget = sum(row["max_epochs"] for row in table)
    used = sum(row.get("epochs_run", row["epochs_reported"]) for row in table)
    return {
        "trials": len(table),
        "stopped_early": sum(row["stopped_early"] for row in table),
        "early_stopped": sum(row["early_stopped"] for row in table),
        "failed": sum(bool(row["error"]) for row in table),
        "trial_epochs": used,
        "budget_epochs": budget,
        "epochs_fraction": round(used / budget, 4) if budget else 0.0,
    }


def close_trial_runs(parent: RunHandle, experiment: str, table: list[dict[str, Any]], metric: str) -> int:
    """End every trial's MLflow child run with what the sweep table says about it: FINISHED (stopped early or
    not, tagged so) or FAILED, plus its best metric. The run's id goes into the table's row, with `epochs_run`:
    the epochs its curve holds. That can be one more than `epochs_reported` (what Tune saw) for a stopped
    trial: its workers may finish the epoch in flight while ASHA's stop reaches them, and that epoch's compute
    was spent. Returns how many child runs were found."""
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
        row["mlflow_run_id"] = child.info.run_id
        curve = client.get_metric_history(child.info.run_id, metric)
        row["epochs_run"] = max([row["epochs_reported"]] + [point.step for point in curve])
        handle = RunHandle(parent.tracking_uri, child.info.run_id)
        handle.set_tags(
            {
                "tune.stopped_early": row["stopped_early"],
                "tune.early_stopped": row["early_stopped"],
                "tune.epochs_reported": row["epochs_reported"],
            }
        )
        if row[f"best_{metric}"] == row[f"best_{metric}"]:  # not NaN: the trial reported at least once
            handle.log_metrics({f"best_{metric}": row[f"best_{metric}"], "best_epoch": row["best_epoch"]})
        handle.end("FAILED" if row["error"] else "FINISHED")
    return len(children)


def best_checkpoint_path(results, metric: str, mode: str) -> tuple[Any, str, dict[str, Any]]:
    """(best result, path of its best epoch's checkpoint, that epoch's metrics) over every epoch of every
    trial."""
    best = results.get_best_result(metric=metric, mode=mode, scope="all")
    history = best.metrics_dataframe
    # Newest first: on a tie Ray Train keeps the later checkpoint, and idxmax/idxmin return the first match.
    history = history[history[CHECKPOINT_PATH_KEY].notna()].iloc[::-1]
    index = history[metric].idxmax() if mode == "max" else history[metric].idxmin()
    return best, history.loc[index, CHECKPOINT_PATH_KEY], history.loc[index].to_dict()
