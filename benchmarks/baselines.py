"""The fine-tuned champion against classical baselines, on the same prepared split, in the same run.

    uv run python benchmarks/baselines.py [--params params.yaml] [--data DIR] [--model PATH ...] [--json PATH]

Loads the prepared target (default data/prepared/<finetune.dataset>), flattens its uint8 images to [0, 1]
pixel vectors and, with scikit-learn, fits each baseline on train+val and scores it once on the test split:

- knn, svc_rbf, logreg: hyperparameters chosen by 5-fold stratified cross-validation on train+val only
  (GridSearchCV, fixed seed, n_jobs=1), then refit on all of train+val. SVC and logistic regression see
  standardised pixels (StandardScaler inside the pipeline, so every fold scales with its own statistics).
- knn_3, svc_default: the fixed versions usually quoted (3-NN; SVC() defaults on standardised pixels), with
  their accuracy on the same folds for comparison.

Grids: k-NN k ∈ {1, 3, 5, 7} × uniform/distance weights; SVC C ∈ {1, 3, 10, 30} × gamma ∈ {"scale", scale/3,
scale×3} (scale = 1 / (features × variance) of the standardised train+val pixels); logistic regression (lbfgs,
max_iter 10,000; convergence warnings are counted, not printed) C ∈ {1e-4, ..., 1}.

Each model file (`--model`, repeatable; default models/tune/model.pt) must have been trained on this prepared
data (its meta's data_hash = the manifest's content_hash) and is scored by resnet.evaluate, the evaluate
stage's code. Reported: test accuracy and errors (one test image is 100/N points) per method and per model,
each model's margin in points over the best baseline's test accuracy (the best by test accuracy: a margin
that flatters the baselines, not the model) and, with several models (e.g. one per pipeline seed), the mean,
min, max and sample standard deviation of the accuracies and margins. cv_s: seconds of the cross-validation,
fit_s: of the final fit. Runs with one BLAS/OpenMP thread (threadpoolctl): on a loaded machine more threads
made logistic regression ~30× slower. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from resnet.config import load_config
from resnet.data.loading import load_prepared
from resnet.engine import load_model_file
from resnet.errors import PipelineError
from resnet.evaluate import evaluate_model_file

REPO = Path(__file__).resolve().parent.parent
SEED = 0


def pixels(split) -> tuple[np.ndarray, np.ndarray]:
    return split.images.reshape(len(split), -1).numpy() / 255.0, split.labels.numpy()


def baselines(scale_gamma: float) -> dict:
    """name → (estimator, grid); an empty grid is a fixed-hyperparameter version."""
    return {
        "knn": (
            KNeighborsClassifier(),
            {"n_neighbors": [1, 3, 5, 7], "weights": ["uniform", "distance"]},
        ),
        "knn_3": (KNeighborsClassifier(n_neighbors=3), {}),
        "svc_rbf": (
            make_pipeline(StandardScaler(), SVC()),
            {"svc__C": [1, 3, 10, 30], "svc__gamma": ["scale", scale_gamma / 3, scale_gamma * 3]},
        ),
        "svc_default": (make_pipeline(StandardScaler(), SVC()), {}),
        "logreg": (
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=10_000)),
            {"logisticregression__C": np.logspace(-4, 0, 5).tolist()},
        ),
    }


def fit_baseline(estimator, grid: dict, x, y, folds) -> tuple[object, dict, float, float]:
    """(fitted estimator, chosen hyperparameters, CV accuracy, seconds of the final fit on x)."""
    if grid:
        search = GridSearchCV(estimator, grid, cv=folds, scoring="accuracy", n_jobs=1).fit(x, y)
        return search.best_estimator_, search.best_params_, search.best_score_, search.refit_time_
    cv_acc = cross_val_score(estimator, x, y, cv=folds, scoring="accuracy", n_jobs=1).mean()
    started = time.perf_counter()
    estimator.fit(x, y)
    return estimator, {}, cv_acc, time.perf_counter() - started


def describe(params: dict) -> str:
    short = {key.split("__")[-1]: value for key, value in params.items()}  # svc__C → C
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in short.items())


def spread(values: list[float]) -> dict:
    return {
        "mean": float(np.mean(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "std": float(np.std(values, ddof=1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--data", default=None, help="prepared dataset; default data/prepared/<finetune.dataset>"
    )
    parser.add_argument("--model", action="append", default=None, help="a model file (repeatable)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    data_dir = args.data or str(REPO / "data" / "prepared" / load_config(args.params).finetune.dataset)
    default_model = REPO / "models" / "tune" / "model.pt"
    models = args.model or ([str(default_model)] if default_model.is_file() else [])

    data = load_prepared(data_dir)
    for path in models:  # refuse before spending minutes on the baselines
        if not Path(path).is_file():
            raise SystemExit(f"{path}: no such model file")
        data_hash = str(load_model_file(path)[1].get("data_hash"))
        if data_hash != data.content_hash:
            raise SystemExit(
                f"{path}: trained on prepared data {data_hash[:12]}, but {data_dir} is "
                f"{data.content_hash[:12]}; compare on the data the model was trained on"
            )
    (x_tr, y_tr), (x_val, y_val) = pixels(data.splits["train"]), pixels(data.splits["val"])
    x_train, y_train = np.concatenate([x_tr, x_val]), np.concatenate([y_tr, y_val])
    x_test, y_test = pixels(data.splits["test"])
    n_test = len(y_test)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED)
    standardised = StandardScaler().fit_transform(x_train)
    scale_gamma = 1.0 / (x_train.shape[1] * standardised.var())  # what gamma="scale" is on this data

    results = {}
    for name, (estimator, grid) in baselines(scale_gamma).items():
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # counted and reported, not printed
            warnings.simplefilter("always", ConvergenceWarning)
            fitted, params, cv_acc, seconds = fit_baseline(estimator, grid, x_train, y_train, folds)
        predicted = fitted.predict(x_test)
        results[name] = {
            "test_acc": accuracy_score(y_test, predicted),
            "errors": int(n_test - accuracy_score(y_test, predicted, normalize=False)),
            "cv_acc": float(cv_acc),
            "params": params,
            "fit_s": round(seconds, 2),
            "cv_s": round(time.perf_counter() - started - seconds, 2),
            "convergence_warnings": sum(issubclass(w.category, ConvergenceWarning) for w in caught),
        }
    best = max(results, key=lambda name: results[name]["test_acc"])
    best_acc = results[best]["test_acc"]

    scored = []
    for path in models:
        report = evaluate_model_file(path, data_dir)
        acc = report.metrics["test_acc"]
        errors = sum(p["actual"] != p["predicted"] for p in report.predictions)
        scored.append(
            {"path": path, "test_acc": acc, "errors": errors, "margin_points": 100 * (acc - best_acc)}
        )

    print(
        f"{data_dir}: {len(y_train)} train+val, {n_test} test images (one error = {100 / n_test:.2f} points)"
    )
    print(
        f"{'method':<12} {'test_acc':>8} {'errors':>6} {'cv_acc':>7} {'cv_s':>6} {'fit_s':>6}  hyperparameters"
    )
    for name, r in results.items():
        note = f" ({r['convergence_warnings']} convergence warnings)" if r["convergence_warnings"] else ""
        print(
            f"{name:<12} {r['test_acc']:>8.4f} {r['errors']:>6} {r['cv_acc']:>7.4f} {r['cv_s']:>6.1f} "
            f"{r['fit_s']:>6.2f}  {describe(r['params']) or 'fixed'}{note}"
        )
    print(f"best baseline by test accuracy: {best} ({best_acc:.4f}, {results[best]['errors']} errors)")
    for r in scored:
        print(
            f"model {r['path']}: test_acc {r['test_acc']:.4f}, {r['errors']} errors, "
            f"margin {r['margin_points']:+.2f} points over {best}"
        )
    summary = {}
    if len(scored) > 1:
        summary = {key: spread([r[key] for r in scored]) for key in ("test_acc", "margin_points")}
        for key, v in summary.items():
            print(
                f"{len(scored)} models, {key}: mean {v['mean']:.4f}, min {v['min']:.4f}, "
                f"max {v['max']:.4f}, std {v['std']:.4f} (ddof=1)"
            )
    if not models:
        print("no model file: pass --model PATH (or run the tune stage for models/tune/model.pt)")
    if args.json:
        report = {
            "data": data_dir,
            "data_hash": data.content_hash,
            "train_val_images": len(y_train),
            "test_images": n_test,
            "baselines": results,
            "best_baseline": best,
            "models": scored,
            "model_spread": summary,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    # One BLAS/OpenMP thread: on a loaded machine more threads are far slower.
    with threadpool_limits(limits=1):
        try:
            main()
        except PipelineError as err:  # missing prepared data, a bad params file: one line, no traceback
            raise SystemExit(str(err)) from None
