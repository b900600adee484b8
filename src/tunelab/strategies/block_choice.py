"""Choosing blocks by hand (:func:`by_hand`: ``top``, ``blocks``) or from a measurement
(tunelab.strategies.importance): what ``layerwise: {select: auto}`` trains within a budget (:func:`select`),
and the measured part of the layer-wise strategy (:class:`MeasuredChoice`: the measurement it asks for, reads
from a file or is given, the options it checks against the model, what it reports)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.strategies.anatomy import StrategyError
from tunelab.strategies.capabilities import Measured, Reports
from tunelab.strategies.importance import PARTS, LayerScores


@dataclass
class Selection:
    """What ``select: auto`` chose: ``parts[i]`` the roles that train in block ``i``, and why."""

    parts: dict[int, list[str]]
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"blocks": {str(i): k for i, k in sorted(self.parts.items())}, "why": self.why}


def select(scores: LayerScores, by: str, budget: float | int, kinds: list[str]) -> Selection:
    """The highest-scoring parts that fit ``budget``: a number of blocks (an int), or a share of the blocks'
    parameters (a float in (0, 1]). With a share, and an estimator that scores attention and MLP apart, the
    units are a block's attention and MLP (those in ``kinds``), else whole blocks. Ties go to the higher
    block. A unit that would pass the budget is skipped and smaller ones are still tried."""
    s = scores.scores[by]
    n = scores.n_blocks
    by_part = isinstance(budget, float) and all(k in s for k in PARTS) and any(k in kinds for k in PARTS)
    total = sum(scores.params["block"])
    if isinstance(budget, int) and not isinstance(budget, bool):
        order = sorted(range(n), key=lambda i: (-s["block"][i], -i))[:budget]
        why = f"the {budget} blocks with the highest {by} score of {n}"
        return Selection({i: list(kinds) for i in sorted(order)}, why)
    units = [(i, k) for i in range(n) for k in PARTS if k in kinds] if by_part else [(i, None) for i in range(n)]

    def size(u) -> int:
        i, k = u
        return scores.params[k][i] if k else scores.params["block"][i]

    def score(u) -> float:
        i, k = u
        return s[k][i] if k else s["block"][i]

    allowed = budget * total
    chosen: dict[int, list[str]] = {}
    used = 0
    for u in sorted(units, key=lambda u: (-score(u), -u[0], u[1] or "")):
        if used + size(u) <= allowed:
            used += size(u)
            i, k = u
            chosen.setdefault(i, []).extend([k] if k else list(kinds))
    if not chosen:
        smallest = min(size(u) for u in units)
        raise ValueError(
            f"layerwise.budget {budget} allows {allowed:,.0f} parameters, less than the smallest unit "
            f"({smallest:,}); give a larger share or a number of blocks"
        )
    for i in chosen:
        if "norms" in kinds and "norms" not in chosen[i]:
            chosen[i].append("norms")  # a chosen part's block norms train with it
    unit = "attention and MLP parts" if by_part else "blocks"
    per = "" if by == "probe" else " per parameter"
    why = (
        f"the {unit} with the highest {by} score{per}, until {used / total:.1%} of the blocks' "
        f"{total:,} parameters (budget {budget:.0%})"
    )
    return Selection(dict(sorted(chosen.items())), why)


# ----------------------------------------------------------------------------- a strategy's measured choice


def by_hand(cfg, n: int) -> list[int]:
    """The blocks a layer-wise config names (``top``, ``blocks``; every block for LISA), of ``n``."""
    if cfg.sample is not None:
        return list(range(n))  # LISA: every block may be drawn
    if cfg.top is not None:
        if cfg.top > n:
            raise StrategyError(f"layerwise: top={cfg.top} but the model has {n} blocks")
        return list(range(n - cfg.top, n))
    chosen: set[int] = set()
    for b in cfg.blocks or []:
        if isinstance(b, int) or re.fullmatch(r"-?\d+", str(b).strip()):
            lo = hi = int(b)
        else:
            lo, hi = (int(x) for x in re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", b.strip()).groups())
        for i in range(lo, hi + 1):
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise StrategyError(f"layerwise: block {i} is out of range; the model has blocks 0-{n - 1}")
            chosen.add(j)
    return sorted(chosen)


def ranks(cfg) -> bool:
    """The options rank blocks by a measurement: select: auto, or LISA drawing by importance."""
    return bool(cfg.select) or (cfg.sample is not None and cfg.sample_by == "importance")


class MeasuredChoice(Measured, Reports):
    """The measured part of a strategy that chooses blocks (layer-wise): its options ``select``, ``by``,
    ``scores``, ``sample`` and ``sample_by``; the measurement it asks for, reads or is given, and what it
    reports. The strategy sets ``n_blocks`` and ``selection`` in ``apply``."""

    n_blocks: int
    selection: Selection | None = None

    @classmethod
    def fits(cls, config, n_blocks: int) -> None:
        if config.sample is not None and config.sample > n_blocks:
            raise ValueError(f"sample: {config.sample} blocks at a time, but the model has {n_blocks} blocks")
        if isinstance(config.budget, int) and config.budget > n_blocks:
            raise ValueError(f"budget: {config.budget} blocks, but the model has {n_blocks} blocks")
        if config.top is not None and config.top > n_blocks:
            raise ValueError(f"top: {config.top}, but the model has {n_blocks} blocks")

    def estimators(self) -> tuple[str, ...]:
        return (self.config.by,) if ranks(self.config) and self.config.scores is None else ()

    def measured(self, scores) -> None:
        self._scores = scores

    def _measurement(self):
        """The scores to rank by: the ``scores`` file, or the run's measurement (``measured``)."""
        if self.config.scores is not None and getattr(self, "_scores", None) is None:
            path = Path(self.config.scores)
            if not path.is_file():
                raise StrategyError(f"layerwise.scores: {path} is not a file (write one with `tunelab layers`)")
            self._scores = LayerScores.load(path)
        scores = getattr(self, "_scores", None)
        if scores is None:
            raise StrategyError(
                "layerwise: select: auto needs the blocks measured before apply (Need.LAYER_SCORES)"
            )
        if self.config.by not in scores.scores:
            have = ", ".join(scores.scores)
            raise StrategyError(f"layerwise.by: {self.config.by} is not in the measurement (it has {have})")
        if scores.n_blocks != self.n_blocks:
            raise StrategyError(
                f"layerwise.scores: measured {scores.n_blocks} blocks, but this model has {self.n_blocks}"
            )
        return scores

    def sampling_weights(self) -> list[float] | None:
        if self.config.sample_by != "importance":
            return None
        return self._measurement().scores[self.config.by]["block"]

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if ranks(self.config):
            scores = self._measurement()
            out["measurement"] = {
                "by": self.config.by,
                "scores": scores.scores[self.config.by],
                "seconds": scores.seconds.get(self.config.by),
                "file": self.config.scores,
            }
        if self.selection is not None:
            out["chosen"] = self.selection.as_dict()
        if self.config.sample is not None:
            out["lisa"] = {"sample": self.config.sample, "every": self.draw_every, "by": self.config.sample_by}
        return out
