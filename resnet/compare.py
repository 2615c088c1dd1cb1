"""Is the candidate better than the champion? Both scored on the same test images; the decision needs a metric
better by a margin and a significant difference in which images each gets right (McNemar's exact test).
numpy and scipy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class McNemar:
    only_candidate: int  # images the candidate gets right and the champion wrong
    only_champion: int  # and the other way round
    p_value: float


def mcnemar_exact(candidate_correct: np.ndarray, champion_correct: np.ndarray) -> McNemar:
    """McNemar's exact test on paired predictions: under "equally good", each discordant image is a fair coin
    flip, so the smaller discordant count is Binomial(discordant, 1/2); two-sided p-value."""
    if candidate_correct.shape != champion_correct.shape:
        raise ValueError("paired predictions need the same images")
    b = int(np.sum(candidate_correct & ~champion_correct))
    c = int(np.sum(~candidate_correct & champion_correct))
    p = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    return McNemar(b, c, float(p))


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate: float
    champion: float | None = None
    p_value: float | None = None


def decide(
    metric: str,
    candidate: float,
    champion: float,
    test: McNemar,
    *,
    min_improvement: float,
    alpha: float,
    lower_is_better: bool,
) -> Decision:
    """Promote only when the candidate is better by more than `min_improvement` AND p < `alpha`."""
    gain = champion - candidate if lower_is_better else candidate - champion
    scores = (
        f"{metric} {candidate:.4f} vs champion {champion:.4f}, McNemar p={test.p_value:.3g} "
        f"({test.only_candidate} images only the candidate gets right, {test.only_champion} only the champion)"
    )
    if gain <= min_improvement:
        reason = f"not better by more than {min_improvement:g}: {scores}"
        return Decision(False, reason, candidate, champion, test.p_value)
    if test.p_value >= alpha:
        reason = f"better, but not significantly (alpha {alpha:g}): {scores}"
        return Decision(False, reason, candidate, champion, test.p_value)
    return Decision(True, f"better and significant: {scores}", candidate, champion, test.p_value)
