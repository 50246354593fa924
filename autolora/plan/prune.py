"""Rank decisions: which components each layer keeps.

Rules work on component scores (``{module: scores}``, see :mod:`autolora.plan.scores`: the
singular values of each module's gated update, relative to its base weight) and return the kept
component indices per module, in ascending order. Shrinking the adapters is the trainer's
business; this module is pure. :func:`kept_counts` is the one place that counts the components a
threshold keeps.

The default rule keeps, everywhere, the components whose score is at least ``DEFAULT_CUT`` times
the reference score (the median over modules of each module's top score): one global level, so a
module whose strongest direction is weak gets a low rank instead of a share of noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from autolora.errors import ConfigError, StateError
from autolora.plan.scores import agreement, margins, reference_score

# A relative slack on thresholds, so that float rounding never drops a component whose score sits
# exactly on the cut (the top score when the cut is 1 x the reference, uniform values, ...).
THRESHOLD_RTOL = 1e-6

# The default cut, relative to the reference score. Chosen on search splits only (no dev data):
# it recovers planted ranks exactly (experiments/rank_signal.py) and keeps the seed agreement of
# GLUE's per-module ranks >= 0.65 on every task (experiments/rank_signal_glue.md; a per-module
# 10% cut agreed a little more there, 0.78-0.92, but cannot give a weak module a low rank).
DEFAULT_CUT = 0.1
# Tail of the search whose plans give a rank its confidence (see assess()).
TAIL_FRACTION = 0.25
# Below this mean confidence the plan is reported as not distinguishable from any other.
MIN_CONFIDENCE = 0.5
# ... and below this separation (median kept score / median dropped score).
MIN_SEPARATION = 3.0


@dataclass(frozen=True)
class PrunePlan:
    """The outcome of a pruning rule.

    Attributes:
        keep: {module: kept component indices (ascending)}; an empty list removes the module.
        rule: ``"threshold"`` (per-module default thresholds or a fixed one) or ``"budget"``.
        threshold: The fixed threshold, if one was given.
        target_rank: The budget per module, for the budget rule.
        min_rank: Lower bound per module.
        max_rank_per_module: Upper bound per module, if any.
        gates: {module: gate values at pruning time}, for the record.
        scores: {module: component scores at pruning time, descending}.
        level: The absolute score level of the cut (threshold rule) or between the last kept
            and the first dropped component (budget rule).
        confidence: {module: fraction of the plans in the last part of the search that gave the
            module this rank}.
        margins: {module: log distance of its cut from ``level``}.
        warning: Set when the components were not separated (see :func:`assess`).
    """

    keep: dict[str, list[int]]
    rule: str
    threshold: float | None = None
    target_rank: int | None = None
    min_rank: int = 1
    max_rank_per_module: int | None = None
    gates: dict[str, list[float]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    level: float | None = None
    confidence: dict[str, float] = field(default_factory=dict)
    margins: dict[str, float] = field(default_factory=dict)
    warning: str | None = None

    @property
    def ranks(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.keep.items()}

    def same_rule(self, **kwargs: object) -> bool:
        return all(getattr(self, k) == v for k, v in kwargs.items())


def kept_counts(gates: Sequence[torch.Tensor], thresholds: Sequence[float]) -> torch.Tensor:
    """How many components of each module have a gate >= its threshold: the one rank rule.

    Args:
        gates: One (r,) gate tensor per module.
        thresholds: One threshold per module.

    Returns:
        An (M,) integer tensor on the gates' device (no host sync; ``ranks()`` reads all layers
        with one ``tolist``).
    """
    return torch.stack([(g >= t * (1 - THRESHOLD_RTOL)).sum() for g, t in zip(gates, thresholds)])


def _order(values: torch.Tensor) -> list[int]:
    """Component indices by score, highest first; ties by index."""
    vals = values.tolist()
    return sorted(range(len(vals)), key=lambda j: (-vals[j], j))


def _check_bounds(gates: Mapping[str, torch.Tensor], min_rank: int, max_rank_per_module: int | None) -> None:
    if not isinstance(min_rank, int) or min_rank < 0:
        raise ConfigError(f"min_rank={min_rank!r} is invalid; it must be an integer >= 0.")
    if max_rank_per_module is not None and (
        not isinstance(max_rank_per_module, int) or max_rank_per_module < max(min_rank, 1)
    ):
        raise ConfigError(
            f"max_rank_per_module={max_rank_per_module!r} is invalid; it must be an integer >= "
            f"max(min_rank, 1) = {max(min_rank, 1)}."
        )


def threshold_keep(
    gates: Mapping[str, torch.Tensor],
    thresholds: Mapping[str, float],
    *,
    min_rank: int = 1,
    max_rank_per_module: int | None = None,
) -> dict[str, list[int]]:
    """Keep components whose gate is >= the module's threshold, within [min_rank, max] per module."""
    _check_bounds(gates, min_rank, max_rank_per_module)
    keep: dict[str, list[int]] = {}
    for name, g in gates.items():
        t = thresholds[name]
        order = _order(g)
        n_pass = int(kept_counts([g], [t])[0])
        hi = len(order) if max_rank_per_module is None else max_rank_per_module
        n = min(max(n_pass, min(min_rank, len(order))), hi)
        keep[name] = sorted(order[:n])
    return keep


def budget_keep(
    gates: Mapping[str, torch.Tensor],
    budget: int,
    *,
    min_rank: int = 1,
    max_rank_per_module: int | None = None,
) -> dict[str, list[int]]:
    """Keep the ``budget`` components with the highest scores across all modules.

    Each module first keeps its top ``min_rank``; the rest of the budget goes to the highest
    remaining gates anywhere, at most ``max_rank_per_module`` per module. Ties break by module
    order, then component index.

    Raises:
        ConfigError: if the budget cannot be met, with the numbers.
    """
    _check_bounds(gates, min_rank, max_rank_per_module)
    names = list(gates)
    caps = {n: len(g) if max_rank_per_module is None else min(len(g), max_rank_per_module) for n, g in gates.items()}
    floor = sum(min(min_rank, caps[n]) for n in names)
    ceiling = sum(caps.values())
    if not floor <= budget <= ceiling:
        raise ConfigError(
            f"a budget of {budget} components across {len(names)} modules cannot be met: with "
            f"min_rank={min_rank} and max_rank_per_module={max_rank_per_module} it must lie between "
            f"{floor} and {ceiling}. Change target_rank or the bounds."
        )
    orders = {n: _order(g) for n, g in gates.items()}
    keep = {n: orders[n][: min(min_rank, caps[n])] for n in names}
    left = budget - floor
    rest = [(-float(gates[n][j]), m, j, n) for m, n in enumerate(names) for j in orders[n][len(keep[n]) :]]
    for _, _, j, n in sorted(rest):
        if left == 0:
            break
        if len(keep[n]) < caps[n]:
            keep[n].append(j)
            left -= 1
    return {n: sorted(k) for n, k in keep.items()}


def adapter_parameters(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int]) -> int:
    """LoRA parameters r * (in + out) summed over modules; ``shapes`` are (in, out)."""
    return sum(r * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items())


def parameter_summary(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int]) -> dict[str, int]:
    """Adapter parameters under ``ranks``, and those of a uniform LoRA with the same number of
    components spread evenly (rounded to the nearest rank).

    Raises:
        ConfigError: for a module that is not in ``shapes``.
    """
    if not set(ranks) <= set(shapes):
        raise ConfigError(f"parameter_count() got modules that are not adapted: {sorted(set(ranks) - set(shapes))}.")
    uniform_r = round(sum(ranks.values()) / max(len(ranks), 1))
    return {
        "adapter": adapter_parameters(shapes, ranks),
        "uniform_rank": uniform_r,
        "uniform": adapter_parameters(shapes, {n: uniform_r for n in ranks}),
    }


def check_threshold(field: str, threshold: object) -> None:
    """A cut must be a finite number >= 0 (relative to the reference score).

    Raises:
        ConfigError: naming ``field`` (the Python argument or the YAML key).
    """
    ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)
    if not ok or threshold < 0:
        raise ConfigError(
            f"{field}={threshold!r} is invalid; it must be a number >= 0, the cut relative to the reference "
            f"score (the median module's top score; default {DEFAULT_CUT})."
        )


def cut_level(scores: Mapping[str, torch.Tensor], threshold: float | None = None) -> float:
    """The absolute level of the threshold rule: ``threshold`` (default ``DEFAULT_CUT``) times the
    reference score."""
    return (DEFAULT_CUT if threshold is None else float(threshold)) * reference_score(scores)


def choose_keep(
    scores: Mapping[str, torch.Tensor],
    *,
    threshold: float | None = None,
    target_rank: int | None = None,
    min_rank: int = 1,
    max_rank_per_module: int | None = None,
) -> tuple[dict[str, list[int]], float]:
    """The kept components under ``prune()``'s arguments, and the level of the cut: a
    ``target_rank`` budget of ``target_rank * len(scores)`` components, else components scoring
    >= ``threshold`` (default ``DEFAULT_CUT``) times the reference score.

    Raises:
        ConfigError: if both rules are given, or either is out of range.
    """
    if threshold is not None and target_rank is not None:
        raise ConfigError("give a threshold or a target rank to prune, not both.")
    if target_rank is not None:
        max_rank = max(len(g) for g in scores.values())
        if not isinstance(target_rank, int) or isinstance(target_rank, bool) or not 1 <= target_rank <= max_rank:
            raise ConfigError(
                f"target_rank={target_rank!r} is invalid; it must be an integer from 1 to max_rank={max_rank}."
            )
        keep = budget_keep(
            scores, target_rank * len(scores), min_rank=min_rank, max_rank_per_module=max_rank_per_module
        )
        return keep, _budget_level(scores, keep)
    if threshold is not None:
        check_threshold("threshold", threshold)
    level = cut_level(scores, threshold)
    keep = threshold_keep(
        scores, dict.fromkeys(scores, level), min_rank=min_rank, max_rank_per_module=max_rank_per_module
    )
    return keep, level


def _kept_and_dropped(
    scores: Mapping[str, torch.Tensor], keep: Mapping[str, list[int]]
) -> tuple[list[float], list[float]]:
    """The scores of the kept and of the dropped components, all modules pooled."""
    kept, dropped = [], []
    for n, s in scores.items():
        wanted = set(keep[n])
        for j, v in enumerate(s.tolist()):
            (kept if j in wanted else dropped).append(v)
    return kept, dropped


def _budget_level(scores: Mapping[str, torch.Tensor], keep: Mapping[str, list[int]]) -> float:
    """The geometric mean of the weakest kept and the strongest dropped score anywhere."""
    kept, dropped = _kept_and_dropped(scores, keep)
    lo, hi = (min(kept) if kept else 0.0), (max(dropped) if dropped else 0.0)
    return math.sqrt(max(lo, 1e-12) * max(hi, 1e-12)) if kept and dropped else (lo or hi)


def assess(
    scores: Mapping[str, torch.Tensor],
    keep: Mapping[str, list[int]],
    level: float,
    tail: Sequence[Mapping[str, int]],
) -> tuple[dict[str, float], dict[str, float], str | None]:
    """How sure the plan is: per-module confidence and margin, and a warning when it is not.

    Args:
        scores: The scores the plan was cut from.
        keep: The plan.
        level: The level of its cut.
        tail: The plans the same rule gave at the snapshots of the last ``TAIL_FRACTION`` of
            the search (empty: no snapshots, every confidence 1 and no warning from it).

    Returns:
        (confidence, margins, warning): confidence = the fraction of ``tail`` plans that gave the
        module its final rank; margin = log distance of its cut from ``level``; warning when the
        mean confidence is below ``MIN_CONFIDENCE``: the search did not settle on an allocation.
    """
    ranks = {n: len(k) for n, k in keep.items()}
    confidence = agreement(ranks, tail)
    margin = margins(scores, ranks, level) if level > 0 else dict.fromkeys(ranks, 0.0)
    mean_conf = sum(confidence.values()) / max(len(confidence), 1)
    sep = separation(scores, keep)
    why = None
    if tail and mean_conf < MIN_CONFIDENCE:
        why = f"mean confidence {mean_conf:.2f} over the last {len(tail)} plans of the search"
    elif all(len(k) == len(scores[n]) for n, k in keep.items()):
        why = "every module kept all its components, so none was told apart from the rest"
    elif sep is not None and sep < MIN_SEPARATION:
        why = f"the kept components score only {sep:.1f}x the dropped ones"
    warning = None
    if why:
        uniform = max(1, round(sum(ranks.values()) / max(len(ranks), 1)))
        warning = (
            f"ranks are not distinguishable ({why}); any allocation of this size is as good; consider a "
            f"uniform LoRA r={uniform}."
        )
    return confidence, margin, warning


def separation(scores: Mapping[str, torch.Tensor], keep: Mapping[str, list[int]]) -> float | None:
    """The median kept score over the median dropped score, all modules pooled (``None`` when
    nothing was kept or nothing dropped): how far the plan's cut stands from a cut through noise."""
    kept, dropped = _kept_and_dropped(scores, keep)
    if not dropped or not kept:
        return None
    return statistics.median(kept) / max(statistics.median(dropped), 1e-12)


def rank_record(
    plan: PrunePlan | None,
    gates: Mapping[str, list[float]],
    ranks: Mapping[str, int],
    *,
    retrained: bool,
    max_rank: int,
    gate: str,
    parameters: Mapping[str, int],
) -> dict:
    """The rank plan as JSON-able data (``ranks.json``): ranks, the gates behind them, rule and
    budget; ``plan=None`` records an unpruned search."""
    return {
        "ranks": dict(ranks),
        "confidence": plan.confidence if plan else {},
        "margins": plan.margins if plan else {},
        "warning": plan.warning if plan else None,
        "level": plan.level if plan else None,
        "scores": plan.scores if plan else {},
        "gates": plan.gates if plan else dict(gates),
        "rule": plan.rule if plan else "threshold (not pruned)",
        "retrained": retrained,
        "threshold": plan.threshold if plan else None,
        "target_rank": plan.target_rank if plan else None,
        "min_rank": plan.min_rank if plan else 1,
        "max_rank_per_module": plan.max_rank_per_module if plan else None,
        "max_rank": max_rank,
        "gate": gate,
        "parameters": dict(parameters),
    }


def same_plan(plan: PrunePlan | None, rule: Mapping[str, object]) -> bool:
    """Whether ``prune()`` with ``rule`` was already called (then it returns that plan).

    Raises:
        StateError: if it was called with another rule; the adapters are shrunk already.
    """
    if plan is None:
        return False
    if plan.same_rule(**rule):
        return True
    raise StateError(
        "prune() was already called with other arguments; the adapters are already "
        f"shrunk to {plan.ranks}. Build a new trainer to prune differently."
    )
