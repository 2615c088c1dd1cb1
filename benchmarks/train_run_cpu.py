"""What one short Ray Train run costs the machine: CPU time (core-seconds, every process) and wall time.

    uv run python benchmarks/train_run_cpu.py [--runs 3] [--rounds 2] [--epochs 2]

On a small machine that runs several things at once (2 cores: a laptop, a CI runner, this project's tests) a
run's CPU matters as much as its wall time: what its processes burn, the others wait for. Each variant runs in
its own process with its own local Ray (2 CPUs; the settings are environment variables that Ray reads when it
starts): one run to warm up, then `--runs` runs, one at a time, each training a resnet20 on 320 tiny images
(10 fractal classes × 40 at 32 px) with 2 DDP workers for `--epochs` epochs through `resnet.distributed.
make_trainer` (the memory loader: no Ray Datasets). Measured per run: wall time, and the machine's CPU time
over it (/proc/stat: every process, Ray's daemons included; run it on an otherwise idle machine). Rounds
alternate the variants, so that a drift of the machine's speed falls on all of them; the medians are reported.

Variants:
- `ray_train`: Ray Train's TorchTrainer as it is: a DatasetManager actor (a process importing Ray Data) for
  every run, datasets or not;
- `trainer`: `resnet.distributed.Trainer`, which leaves it out for a run without datasets (the default);
- `no_watcher`: `trainer`, and no preemption-watcher actor (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: what the
  test session's Ray cluster runs; pipelines keep it, for runs on nodes that can be preempted).

Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from children import run_child

VARIANTS = {
    "ray_train": {},
    "trainer": {},
    "no_watcher": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
}


def _busy_seconds() -> float:
    """CPU time the whole machine has spent busy since boot, in core-seconds (/proc/stat's first line)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def child(variant: str, runs: int, epochs: int, work: Path) -> dict:
    import ray
    from ray.train.torch import TorchTrainer

    import resnet.distributed as distributed
    from resnet.config import AugmentConfig, DatasetConfig, PretrainConfig, RayConfig
    from resnet.data.prepare import prepare_dataset

    if variant == "ray_train":
        distributed.Trainer = TorchTrainer  # what make_trainer builds
    data = work / "data"
    dataset = DatasetConfig(
        source="fractals", fractals={"num_classes": 10, "per_class": 40, "points": 400}, image_size=32
    )
    prepare_dataset("fractals", dataset, data)
    cfg = RayConfig(num_workers=2, storage_path=str(work / "ray"))
    distributed.init_ray(cfg, "bench")
    job = distributed.TrainJob(
        data_dir=str(data),
        optim=PretrainConfig(epochs=epochs, batch_size=16, lr=0.05).model_dump(),
        augment=AugmentConfig(crop_padding=0).model_dump(),
    )
    storage = distributed.storage_path(cfg)

    def run(name: str) -> None:
        result = distributed.make_trainer(job, cfg, name=name, storage=storage).fit()
        assert result.error is None, result.error

    run("warm-up")
    time.sleep(5)  # the warm-up's actors gone
    walls, cpus = [], []
    for index in range(runs):
        cpu, wall = _busy_seconds(), time.perf_counter()
        run(f"run-{index}")
        walls.append(time.perf_counter() - wall)
        cpus.append(_busy_seconds() - cpu)
    ray.shutdown()
    return {"variant": variant, "wall_s": walls, "cpu_s": cpus}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="measured runs per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory(prefix="train-run-cpu-") as tmp:
            print(json.dumps(child(args.child, args.runs, args.epochs, Path(tmp))), flush=True)
        return
    variants = args.variants.split(",")
    measured: dict[str, dict[str, list[float]]] = {v: {"wall_s": [], "cpu_s": []} for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            options = ("--runs", str(args.runs), "--epochs", str(args.epochs))
            row = run_child(__file__, variant, VARIANTS[variant], *options)
            for key in ("wall_s", "cpu_s"):
                measured[variant][key] += row[key]
            print(f"round {round_ + 1} {variant}: {json.dumps(row)}", flush=True)
    base = measured[variants[0]]
    print(f"\nper run, median of {args.runs * args.rounds} ({args.epochs} epochs, 2 workers, 2 CPUs):")
    print(f"{'variant':12s} {'CPU (core-s)':>14s} {'vs ' + variants[0]:>14s} {'wall (s)':>10s} {'vs':>8s}")
    for variant in variants:
        cpu, wall = (statistics.median(measured[variant][key]) for key in ("cpu_s", "wall_s"))
        cpu0, wall0 = statistics.median(base["cpu_s"]), statistics.median(base["wall_s"])
        print(f"{variant:12s} {cpu:14.1f} {cpu / cpu0 - 1:+13.0%} {wall:10.1f} {wall / wall0 - 1:+7.0%}")


if __name__ == "__main__":
    main()
