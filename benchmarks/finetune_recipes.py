"""Fine-tuning recipes on the target, in one process (no Ray): what a single trial can reach, over seeds.

    uv run python benchmarks/finetune_recipes.py [--recipes ft9,ft15,ft15_mixup,...] [--seeds 0,1,2]
        [--data data/prepared/digits] [--pretrain-model models/pretrain/model.pt] [--json PATH]

Each recipe is `engine.fit` with a `FinetunePlan` (what a sweep trial runs, without Ray), from the pretrain
stage's model (or a random init for `scratch*`), on the prepared target's train split, validated every epoch. The
test split is scored after every epoch (resnet.engine.evaluate), and reported at the epoch the tune stage would
pick by validation accuracy (its latest epoch with the best value) and at the last epoch. 2 threads. Used to
choose the default trial length, learning-rate range and mixup of the sweep (benchmarks/RESULTS.md). Not run by
the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from resnet.config import AugmentConfig, FinetuneConfig
from resnet.data.loading import Normalize, eval_batches, load_prepared
from resnet.engine import evaluate, fit
from resnet.finetune import FinetunePlan
from resnet.models import build_model
from resnet.pretrained import load_pretrained

CPU = torch.device("cpu")
BASE = {"epochs": 9, "lr": 0.05, "batch_size": 32}
# name → (from the pretrained model?, finetune fields, augment fields)
RECIPES = {
    "ft9": (True, BASE, {}),
    "ft9_ema": (True, BASE | {"ema_decay": 0.98}, {}),
    "ft12": (True, BASE | {"epochs": 12}, {}),
    "ft15": (True, BASE | {"epochs": 15}, {}),
    "ft20": (True, BASE | {"epochs": 20}, {}),
    "ft15_lr0.02": (True, BASE | {"epochs": 15, "lr": 0.02}, {}),
    "ft15_lr0.1": (True, BASE | {"epochs": 15, "lr": 0.1}, {}),
    "ft15_smoothing": (True, BASE | {"epochs": 15, "label_smoothing": 0.1}, {}),
    "ft15_batch64": (True, BASE | {"epochs": 15, "batch_size": 64}, {}),
    "ft15_mixup": (True, BASE | {"epochs": 15}, {"mixup_alpha": 0.2}),
    "scratch20": (False, BASE | {"epochs": 20, "lr": 0.1}, {}),
}


def run(name: str, seed: int, data, pretrain_model: str) -> dict:
    pretrained, fields, augment = RECIPES[name]
    torch.manual_seed(seed)
    optim = FinetuneConfig(**fields, seed=seed)
    if pretrained:
        start = load_pretrained(pretrain_model, data.num_classes)
        model, model_name = start.model, start.model_name
    else:
        model_name = "resnet20"
        model = build_model(model_name, data.num_classes)
    normalize = Normalize(data.mean, data.std)
    epochs: list[tuple[float, float]] = []  # (val acc, test acc)

    def on_epoch_end(metrics, state):
        scored = build_model(model_name, data.num_classes)
        scored.load_state_dict(state.ema["module"] if state.ema else state.model)
        test = evaluate(scored, eval_batches(data.splits["test"], 256), normalize, device=CPU)
        epochs.append((metrics["val_acc"], test.accuracy))

    started = time.perf_counter()
    plan = FinetunePlan.from_config(model, optim)
    fit(model, data, optim, AugmentConfig(**augment), device=CPU, plan=plan, on_epoch_end=on_epoch_end)
    best = max(range(len(epochs)), key=lambda i: (epochs[i][0], i))
    return {
        "recipe": name,
        "seed": seed,
        "best_val": round(epochs[best][0], 4),
        "best_epoch": best + 1,
        "test_at_best_val": round(epochs[best][1], 4),
        "test_last": round(epochs[-1][1], 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", default="data/prepared/digits")
    parser.add_argument("--pretrain-model", default="models/pretrain/model.pt")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_prepared(args.data)
    rows = []
    for name in args.recipes.split(","):
        runs = [run(name, int(seed), data, args.pretrain_model) for seed in args.seeds.split(",")]
        rows += runs
        tests = [r["test_at_best_val"] for r in runs]
        print(
            f"{name:<16} test at best val {statistics.mean(tests):.4f} {tests}   "
            f"last {[r['test_last'] for r in runs]}   {statistics.mean(r['seconds'] for r in runs):.0f} s",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
