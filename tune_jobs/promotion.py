"""Whether a retrain's challenger replaces the champion: both scored on the same rows.

The champion and the challenger are both scored today, with today's code, on
today's promotion set (``trainers.data`` holds those rows out by a stable hash
of each text). The challenger is promoted only when it beats the champion by at
least ``min_improvement`` and, if asked, when a paired test on those same rows
(McNemar's exact test on the examples exactly one of the two gets right) says
the difference is unlikely to be chance. Ties keep the champion; the first
retrain promotes its best.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """The outcome of one retrain, as the history records it."""

    promote: bool
    reason: str
    challenger: float
    champion: float | None
    p_value: float | None = None


def mcnemar_p(champion_right: Sequence[bool], challenger_right: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value on paired per-example outcomes (same rows, same order)."""
    from scipy.stats import binomtest

    if len(champion_right) != len(challenger_right):
        raise ValueError("paired outcomes must cover the same rows")
    only_challenger = sum(
        1 for a, b in zip(champion_right, challenger_right, strict=True) if b and not a
    )
    only_champion = sum(
        1 for a, b in zip(champion_right, challenger_right, strict=True) if a and not b
    )
    discordant = only_challenger + only_champion
    if discordant == 0:
        return 1.0
    return float(binomtest(only_challenger, discordant, 0.5, alternative="two-sided").pvalue)


def decide(
    challenger: float,
    champion: float | None,
    min_improvement: float,
    p_value: float | None = None,
    alpha: float | None = None,
) -> Decision:
    """Promote or keep, with the reason in words (scores are accuracies: higher is better)."""
    if champion is None:
        return Decision(True, "first retrain: no champion yet", challenger, None, p_value)
    gain = challenger - champion
    if gain <= 0:
        how = "ties with" if gain == 0 else "does not beat"
        return Decision(
            False,
            f"challenger {challenger:.4f} {how} champion {champion:.4f}"
            + (" (ties keep the champion)" if gain == 0 else ""),
            challenger,
            champion,
            p_value,
        )
    if gain < min_improvement:
        return Decision(
            False,
            f"gain {gain:+.4f} is below retrain.min_improvement {min_improvement:g}",
            challenger,
            champion,
            p_value,
        )
    if alpha is not None and p_value is not None and p_value >= alpha:
        return Decision(
            False,
            f"gain {gain:+.4f} is not significant (McNemar p={p_value:.3g} >= {alpha:g})",
            challenger,
            champion,
            p_value,
        )
    return Decision(
        True, f"challenger beats champion by {gain:+.4f}", challenger, champion, p_value
    )
