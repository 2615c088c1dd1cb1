"""McNemar's exact test and the promotion rule, on tables worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from resnet.compare import decide, mcnemar_exact


def paired(only_candidate: int, only_champion: int, both: int = 50) -> tuple[np.ndarray, np.ndarray]:
    cand = np.array([True] * only_candidate + [False] * only_champion + [True] * both)
    champ = np.array([False] * only_candidate + [True] * only_champion + [True] * both)
    return cand, champ


def test_mcnemar_exact_p_value_by_hand():
    # 9 discordant pairs for the candidate, 1 for the champion: p = 2·P(X ≤ 1), X ~ Bin(10, 1/2) = 2·11/1024.
    test = mcnemar_exact(*paired(9, 1))
    assert (test.only_candidate, test.only_champion) == (9, 1)
    assert test.p_value == pytest.approx(22 / 1024)
    assert mcnemar_exact(*paired(0, 0)).p_value == 1.0  # identical predictions: no evidence


def test_promotes_only_a_significant_improvement_beyond_the_margin():
    kwargs = {"min_improvement": 0.0, "alpha": 0.05, "lower_is_better": False}
    strong = decide("test_acc", 0.95, 0.80, mcnemar_exact(*paired(9, 1)), **kwargs)
    assert strong.promote and strong.reason.startswith(
        "better and significant: test_acc 0.9500 vs champion 0.8000"
    )
    weak = decide("test_acc", 0.82, 0.80, mcnemar_exact(*paired(3, 1)), **kwargs)
    assert not weak.promote and weak.reason.startswith("better, but not significantly (alpha 0.05)")
    assert "p=0.625" in weak.reason
    worse = decide("test_acc", 0.70, 0.80, mcnemar_exact(*paired(1, 9)), **kwargs)
    assert not worse.promote and worse.reason.startswith("not better by more than 0")
    margin = decide(
        "test_acc", 0.95, 0.80, mcnemar_exact(*paired(9, 1)), **(kwargs | {"min_improvement": 0.2})
    )
    assert not margin.promote and margin.reason.startswith("not better by more than 0.2")


def test_lower_is_better_metrics_compare_the_other_way():
    test = mcnemar_exact(*paired(9, 1))
    kwargs = {"min_improvement": 0.0, "alpha": 0.05}
    assert decide("test_loss", 0.1, 0.5, test, lower_is_better=True, **kwargs).promote
    assert not decide("test_loss", 0.5, 0.1, test, lower_is_better=True, **kwargs).promote
