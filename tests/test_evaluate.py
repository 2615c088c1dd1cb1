"""The evaluation's numbers, checked against values worked out by hand, and the evaluate stage's refusal of a
model trained on other data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet.evaluate import Scores, calibration, confusion, summary_metrics, worst_errors

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["a", "b", "c"]


def scores_of(rows: list[tuple[int, list[float]]]) -> Scores:
    labels = np.array([label for label, _ in rows])
    probs = np.array([p for _, p in rows], dtype=np.float64)
    return Scores(CLASSES, labels, probs)


# Six images: a, a, b, b, c, c. Predicted a, b, b, b, c, a.
SIX = scores_of(
    [
        (0, [0.9, 0.05, 0.05]),
        (0, [0.3, 0.6, 0.1]),
        (1, [0.1, 0.8, 0.1]),
        (1, [0.2, 0.7, 0.1]),
        (2, [0.1, 0.1, 0.8]),
        (2, [0.5, 0.2, 0.3]),
    ]
)


def test_summary_metrics_match_hand_computed_values():
    m = summary_metrics(SIX)
    assert m["test_acc"] == pytest.approx(4 / 6)
    assert m["test_images"] == 6
    assert m["test_top5_acc"] == 1.0  # 3 classes: every label is among the top 5
    expected_loss = -np.mean(np.log([0.9, 0.3, 0.8, 0.7, 0.8, 0.3]))
    assert m["test_loss"] == pytest.approx(expected_loss)
    # a: predicted a for 1 of 2 a's, and once for a c → precision 1/2, recall 1/2
    # b: predicted b 3 times, 2 right → precision 2/3, recall 1;  c: precision 1, recall 1/2
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["per_class"]["b"]["recall"] == 1.0 and m["per_class"]["c"]["recall"] == 0.5
    f1 = [0.5, 0.8, 2 / 3]
    assert m["test_f1_macro"] == pytest.approx(np.mean(f1))
    assert m["test_f1_weighted"] == pytest.approx(np.mean(f1))  # equal supports
    assert m["test_precision_macro"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert confusion(SIX).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_top5_counts_labels_among_the_five_most_probable_classes():
    classes = [str(i) for i in range(7)]
    probs = np.tile(np.arange(7, 0, -1, dtype=float), (2, 1))  # class 0 most probable, class 6 least
    probs /= probs.sum(1, keepdims=True)
    m = summary_metrics(Scores(classes, np.array([4, 6]), probs))  # rank 5 (in the top 5) and rank 7 (not)
    assert m["test_acc"] == 0.0 and m["test_top5_acc"] == 0.5


def test_expected_calibration_error_by_hand():
    # Confidences 0.9, 0.6, 0.8, 0.7, 0.8, 0.5; correct: T F T T T F (6 images, 15 bins of width 1/15).
    ece, rows = calibration(SIX)
    by_bin = {}
    for conf, ok in [(0.9, 1), (0.6, 0), (0.8, 1), (0.7, 1), (0.8, 1), (0.5, 0)]:
        by_bin.setdefault(int(np.ceil(conf * 15)) - 1, []).append((conf, ok))
    expected = sum(
        len(v) / 6 * abs(np.mean([o for _, o in v]) - np.mean([c for c, _ in v])) for v in by_bin.values()
    )
    assert ece == pytest.approx(expected)
    assert sum(r["images"] for r in rows) == 6 and len(rows) == 15
    assert [r["images"] for r in rows if r["images"]] == [len(by_bin[b]) for b in sorted(by_bin)]


def test_a_perfectly_calibrated_model_has_zero_ece():
    # Confidence 1.0 and always right.
    perfect = scores_of([(0, [1.0, 0.0, 0.0]), (1, [0.0, 1.0, 0.0])])
    assert calibration(perfect)[0] == 0.0


def test_worst_errors_are_the_most_confident_mistakes_first():
    assert worst_errors(SIX).tolist() == [1, 5]  # wrong at 0.6, then at 0.5
    assert worst_errors(SIX, n=1).tolist() == [1]


@pytest.fixture(scope="module")
def prepared_pair(tmp_path_factory):
    """Two prepared copies of the same tiny images with different splits, and a model file trained on the first."""
    from resnet.data.prepare import write_prepared
    from resnet.data.sources import RawDataset
    from resnet.engine import save_model_file
    from resnet.models import build_model

    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    images = np.where(labels[:, None, None, None] == 1, 200, 40).astype(np.uint8)
    images = (images + rng.integers(0, 30, (60, 16, 16, 3))).astype(np.uint8)
    raw = RawDataset(images, labels, ("dark", "bright"))
    write_prepared(raw, root / "d", val=0.2, test=0.2, seed=0, source="t")
    write_prepared(raw, root / "resplit", val=0.2, test=0.2, seed=1, source="t")
    manifest = json.loads((root / "d" / "manifest.json").read_text())
    torch.manual_seed(0)
    meta = {
        "model_name": "resnet20",
        "num_classes": 2,
        "classes": ["dark", "bright"],
        "image_size": 16,
        "mean": [0.47] * 3,
        "std": [0.25] * 3,
        "data_hash": manifest["content_hash"],
    }
    save_model_file(root / "m.pt", build_model("resnet20", 2), meta)
    return root


def test_evaluate_stage_writes_metrics_plots_and_figures(prepared_pair, tmp_path, monkeypatch):
    from resnet.config import load_config
    from resnet.evaluate import file_digest
    from resnet.stages import evaluate

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(REPO / "params.yaml")
    summary = evaluate.run(cfg, data=str(prepared_pair / "d"), model=str(prepared_pair / "m.pt"))
    written = json.loads((tmp_path / "metrics/eval.json").read_text())
    assert written == summary and written["model_sha256"] == file_digest(prepared_pair / "m.pt")
    rows = (tmp_path / "plots/confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 1 + written["test_images"]
    assert sum(r.split(",")[0] == r.split(",")[1] for r in rows[1:]) / written[
        "test_images"
    ] == pytest.approx(written["test_acc"])
    figures = sorted(p.name for p in (tmp_path / "plots/eval").iterdir())
    assert figures == sorted(evaluate.FIGURES)  # no best.json here: no curves
    for name in figures:
        assert (tmp_path / "plots/eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("resnet-pipeline").experiment_id])
    assert run.data.metrics["test_acc"] == pytest.approx(written["test_acc"])
    assert run.data.tags["model.sha256"] == written["model_sha256"]
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert listed == {f"evaluation/{n}" for n in (*evaluate.FIGURES, "report.txt")}
    (inp,) = [i for i in run.inputs.dataset_inputs]
    assert inp.dataset.name == "digits-test" and inp.tags[0].value == "test"


def test_evaluate_refuses_a_model_trained_on_another_split(prepared_pair, tmp_path, monkeypatch, capsys):
    from resnet.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(
        ["evaluate", "--params", str(REPO / "params.yaml"), "--data", str(prepared_pair / "resplit")]
        + ["--model", str(prepared_pair / "m.pt")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "m.pt: trained on data" in err[0] and "resplit" in err[0]
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "mlruns.db").exists()


def test_evaluate_refuses_a_truncated_model_file_in_one_line(prepared_pair, tmp_path, monkeypatch, capsys):
    from resnet.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cut.pt").write_bytes((prepared_pair / "m.pt").read_bytes()[:5000])
    argv = ["evaluate", "--params", str(REPO / "params.yaml"), "--data", str(prepared_pair / "d")]
    assert main([*argv, "--model", "cut.pt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "resnet-pipeline evaluate: error: cut.pt: not a model file of this project ("
    )
    assert not (tmp_path / "metrics").exists()
