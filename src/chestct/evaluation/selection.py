"""Which model wins: promote's rules over two sets of metrics, each decision naming the rule
that decided (`Decision.rule`) and the figures compared (`Decision.reason`).

A library module, so that the rules read apart from the stage that applies them
(chestct.stages.promote: re-scoring, export, install) and can be tested on plain metric
dictionaries. `stale_champion` says when a champion's recorded figures cannot be compared with
a candidate's (another test split, another shift-stress set) and must be measured again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from chestct.evaluation.metrics import lower_is_better, metric_value, numeric_keys
from chestct.evaluation.uncertainty import PairedResult
from chestct.settings import PromoteParams


class SelectionError(ValueError):
    """promote.metric cannot select between these metrics; the message lists the keys that can."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    metric: str
    candidate: float
    champion: float | None
    champion_rescored: bool
    reason: str  # "<verdict> (<rule>): <the figures compared>"
    rule: str  # the RULE_* that decided
    paired: dict[str, Any] | None = None  # the paired bootstrap (PairedResult) when it ran


def selection_value(metrics: dict[str, Any], metric: str, whose: str) -> float:
    """The value of promote.metric (a dotted key of metrics.json) in `whose` metrics.

    Raises:
        SelectionError: the key names the external set (reported apart, never selected on) or
            is not a number in the metrics; the message lists the keys that are.
    """
    if metric.split(".")[0] == "external":
        raise SelectionError(
            f"promote.metric {metric!r} points at the external test set, which is reported "
            "apart and never used for selection; choose a key of metrics.json such as "
            "robust_macro_f1"
        )
    value = metric_value(metrics, metric)
    if value is None:
        raise SelectionError(
            f"promote.metric {metric!r} is not among the {whose}'s metrics (valid keys: "
            f"{', '.join(numeric_keys(metrics))}); choose one of those or rerun evaluate"
        )
    return value


# The rules promote applies, in this order; Decision.rule names the one that decided.
RULE_BELOW_MINIMUM = "below promote.minimum"
RULE_ABOVE_MAXIMUM = "above promote.minimum"  # a metric where lower is better
RULE_FIRST_MODEL = "first model"
RULE_TIE = "tie with the champion"
RULE_BETTER = "better than champion + margin"
RULE_NOT_BETTER = "not better than champion + margin"
RULE_BETTER_LOWER = "better than champion - margin"  # lower is better
RULE_NOT_BETTER_LOWER = "not better than champion - margin"
RULE_EXPORT_FAILED = "light model export failed"
RULE_BELOW_MEMORIZER = "below the memorizer"
RULE_NOISE = "difference within noise (paired bootstrap)"
# Equal scores computed from the same test images: a tie, whatever the margin.
TIE_TOLERANCE = 1e-9


def decide(
    params: PromoteParams,
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    champion_rescored: bool = False,
) -> Decision:
    """Compare on params.metric and name the rule that decided.

    A candidate worse than `promote.minimum` is rejected; a tie (equal scores) keeps the
    champion: rerunning an unchanged pipeline promotes nothing. A candidate below the
    memorizer on the test split is rejected (`promote.beat_memorizer`); without a champion it
    is promoted; otherwise it must be strictly better than the champion by more than
    `promote.margin` (and then survive `apply_paired`).
    For a metric where lower is better (metrics.lower_is_better: ECE, NLL, rates) the
    comparison turns round: `minimum` is a maximum and the candidate must be below the
    champion - margin.
    """
    metric = params.metric
    score = selection_value(candidate, metric, "candidate")
    higher = not lower_is_better(metric)
    sign = 1.0 if higher else -1.0
    best = None if champion is None else selection_value(champion, metric, "champion")
    against = "no champion" if best is None else f"champion {best:.4f}"
    plus, beats, fails = ("+", ">", "<=") if higher else ("-", "<", ">=")
    if sign * score < sign * params.minimum:
        rule = RULE_BELOW_MINIMUM if higher else RULE_ABOVE_MAXIMUM
        ok = False
        detail = (
            f"candidate {metric} {score:.4f} {'<' if higher else '>'} promote.minimum "
            f"{params.minimum} ({against}{'' if higher else '; a maximum: lower is better'})"
        )
    elif best is not None and abs(score - best) <= TIE_TOLERANCE:
        rule, ok = RULE_TIE, False
        detail = (
            f"candidate {metric} {score:.4f} = champion {best:.4f}; the champion stays and "
            "nothing is registered"
        )
    elif (memo := below_memorizer(params, candidate)) is not None:
        rule, ok = RULE_BELOW_MEMORIZER, False
        detail = f"{memo} ({against})"
    elif best is None:
        rule, ok = RULE_FIRST_MODEL, True
        detail = (
            f"no champion; candidate {metric} {score:.4f} {'>=' if higher else '<='} "
            f"promote.minimum {params.minimum}"
        )
    elif sign * score > sign * (best + sign * params.margin):
        rule, ok = (RULE_BETTER if higher else RULE_BETTER_LOWER), True
        detail = (
            f"candidate {metric} {score:.4f} {beats} champion {best:.4f} {plus} promote.margin "
            f"{params.margin}"
        )
    else:
        rule, ok = (RULE_NOT_BETTER if higher else RULE_NOT_BETTER_LOWER), False
        detail = (
            f"candidate {metric} {score:.4f} {fails} champion {best:.4f} {plus} promote.margin "
            f"{params.margin}"
        )
    verdict = "promoted" if ok else ("kept the champion" if rule == RULE_TIE else "rejected")
    reason = f"{verdict} ({rule}): {detail}"
    return Decision(ok, metric, score, best, champion_rescored, reason, rule)


# The memorizer's metrics (chestct.evaluation.novelty); another selection metric is held against
# its macro-F1, the figure the memorizer and every candidate share.
MEMORIZER_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def below_memorizer(params: PromoteParams, candidate: dict[str, Any]) -> str | None:
    """Why the candidate is below the nearest-neighbour memorizer on the test split, or None
    (above it, equal, `promote.beat_memorizer` off, or metrics from before the memorizer)."""
    if not params.beat_memorizer:
        return None
    metric = params.metric if params.metric in MEMORIZER_METRICS else "macro_f1"
    memo = metric_value(candidate, f"baseline.nearest_neighbour.{metric}")
    mine = metric_value(candidate, metric)
    if memo is None or mine is None or mine >= memo - TIE_TOLERANCE:
        return None
    return (
        f"candidate {metric} {mine:.4f} < {memo:.4f} of the nearest-neighbour memorizer "
        "(the label of the most similar training slice, no learning) on the test split; "
        "promote.beat_memorizer refuses it"
    )


def apply_paired(
    decision: Decision, params: PromoteParams, paired: PairedResult | str
) -> Decision:
    """A margin win kept only if the paired bootstrap says it is not noise.

    Args:
        decision: what `decide` found (only a RULE_BETTER* decision can change).
        paired: the paired test, or why it could not run (the win then stands on the margin
            and the reason says so).
    """
    if decision.rule not in (RULE_BETTER, RULE_BETTER_LOWER):
        return decision
    if isinstance(paired, str):
        return replace(decision, reason=f"{decision.reason}; paired test not run: {paired}")
    higher = not lower_is_better(decision.metric)
    facts = asdict(paired)
    if paired.significant(higher):
        return replace(decision, reason=f"{decision.reason}; {paired.describe()}", paired=facts)
    detail = decision.reason.split(": ", 1)[1]
    return replace(
        decision,
        promote=False,
        rule=RULE_NOISE,
        reason=f"rejected ({RULE_NOISE}): {detail}, but the {paired.describe()} > 1 - "
        f"promote.confidence ({1 - params.confidence:.2f}): the difference may be noise",
        paired=facts,
    )


def uses_stress(metric: str) -> bool:
    """Whether promote.metric is measured under the shift-stress set."""
    return metric == "robust_macro_f1" or metric.split(".")[0] == "shift"


def stale_champion(
    card: Mapping[str, Any],
    data_digest: str,
    stress_set: Mapping[str, Any] | None,
    metric: str,
) -> str | None:
    """Why the champion's recorded score cannot be held against a candidate's measured on the
    test split `data_digest` and the shift-stress set `stress_set` (so the champion must be
    re-scored on those), or None when it can."""
    if card.get("data_digest") != data_digest:
        return "the test data changed"
    if metric_value(card.get("metrics") or {}, metric) is None:
        return f"promote.metric {metric} is not among the champion's metrics"
    if uses_stress(metric):
        recorded = (card.get("stress_set") or {}).get("digest")
        mine = (stress_set or {}).get("digest")
        if recorded is None or recorded != mine:
            # A robust score measured under other conditions or items is another figure.
            return "the shift-stress set changed (or the champion's card does not name it)"
    return None
