"""Replay early-stopping schedulers on recorded learning curves: what a sweep would have cost and found.

The sweeps are seeded and every trial is reproducible to the digit (the same draw trains the same way whether
ASHA is on or not: checked in benchmarks/RESULTS.md), so a sweep whose trials all ran to the end records every
curve a scheduler could have seen. Replaying a scheduler on those curves gives, exactly, which trials it would
have stopped where, hence its cost in trial-epochs and the best result it would have found, for any scheduler
setting, without running the sweep again. The only approximation is time: which results arrive first decides
what an asynchronous scheduler compares against, and here each epoch lasts what it lasted in the recording.

The ASHA below is Ray Tune's (`ray.tune.schedulers.async_hyperband`, one bracket): rungs at
grace × rf^k below max_t; a result at or past a rung the trial has not been recorded at is compared with the
(1 - 1/rf) percentile of the results recorded there so far and stops the trial if below it. Its clock is a
function of the trial and epoch: the epoch itself (Ray's `time_attr="epoch"`), or the epochs in which the
trial's backbone trained (`backbone_epochs`, which a head-only phase does not advance).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Curve:
    """One trial run to the end: its draw, its metric per epoch, and how long each epoch took."""

    trial_id: str
    config: dict
    values: list[float]  # the sweep metric after epochs 1..n (maximised: a loss is negated)
    seconds: list[float]  # the duration of epochs 1..n (the first includes the trial's start-up)
    accuracy: list[float] = field(default_factory=list)  # validation accuracy after epochs 1..n
    head_only_epochs: int = 0  # epochs before any backbone group trains (lp_ft, gradual)


@dataclass
class Asha:
    """Ray Tune's asynchronous successive halving, one bracket, on a clock of our choice."""

    grace: int
    rf: float
    max_t: int
    clock: str = "epoch"  # "epoch" | "backbone_epochs"
    rungs: list[tuple[float, dict]] = field(init=False)

    def __post_init__(self):
        count = int(np.log(self.max_t / self.grace) / np.log(self.rf) + 1)
        self.rungs = [(self.grace * self.rf**k, {}) for k in reversed(range(count))]

    def time(self, curve: Curve, epoch: int) -> int:
        return epoch if self.clock == "epoch" else max(0, epoch - curve.head_only_epochs)

    def on_result(self, curve: Curve, epoch: int, value: float) -> bool:
        """True: stop the trial."""
        now = self.time(curve, epoch)
        if now >= self.max_t:
            return True
        for milestone, recorded in self.rungs:
            if now < milestone or curve.trial_id in recorded:
                continue
            cutoff = np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100) if recorded else None
            recorded[curve.trial_id] = value
            return cutoff is not None and value < cutoff
        return False


@dataclass
class Replay:
    epochs_run: dict[str, int]  # trial → epochs it ran
    best: tuple[float, str, int]  # (metric, trial, epoch) the tune stage would pick
    seconds: float  # wall time with `slots` trials at once


def stage_pick(curves: list[Curve], epochs_run: dict[str, int]) -> tuple[float, str, int]:
    """The checkpoint the tune stage picks (`sweep.best_checkpoint_path`): the first trial, in trial order,
    whose best result is the best of all (Tune's `get_best_result(scope="all")`), at its latest epoch with
    that result."""
    best = (-math.inf, "", 0)
    for curve in curves:
        seen = curve.values[: epochs_run.get(curve.trial_id, 0)]
        if seen and max(seen) > best[0]:
            top = max(seen)
            best = (top, curve.trial_id, max(e for e, v in enumerate(seen, 1) if v == top))
    return best


def replay(curves: list[Curve], make_scheduler: Callable[[], Asha | None], slots: int) -> Replay:
    """Run the trials in order, `slots` at a time, each epoch taking its recorded time; the scheduler sees
    every result when it arrives and may stop the trial there."""
    scheduler = make_scheduler()
    pending = list(curves)
    events: list[tuple[float, int, int]] = []  # (time, trial index, epoch just finished)
    running, epochs_run = 0, {}
    clock = 0.0

    def start(now: float) -> None:
        nonlocal running
        while pending and running < slots:
            curve = pending.pop(0)
            index = curves.index(curve)
            heapq.heappush(events, (now + curve.seconds[0], index, 1))
            running += 1

    start(0.0)
    while events:
        clock, index, epoch = heapq.heappop(events)
        curve = curves[index]
        value = curve.values[epoch - 1]
        epochs_run[curve.trial_id] = epoch
        stop = scheduler.on_result(curve, epoch, value) if scheduler is not None else False
        if stop or epoch == len(curve.values):
            running -= 1
            start(clock)
        else:
            heapq.heappush(events, (clock + curve.seconds[epoch], index, epoch + 1))
    return Replay(epochs_run, stage_pick(curves, epochs_run), clock)
