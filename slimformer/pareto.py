"""Candidates, budgets and the Pareto frontier: the pure logic of choosing a model.

Every measured quantity knows whether higher or lower is better, so the frontier code is generic in the
number of objectives, and a budget such as ``accuracy_drop<=1.0,latency_ms<=5`` is checked the same way
for any quantity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from slimformer.errors import SlimformerError

Goal = Literal["min", "max"]

# Quantities a search measures for every candidate, with their direction and unit. Quality drops are in
# points (percentage points for accuracy/F1, relative percent for perplexity), against the baseline.
QUANTITIES: dict[str, tuple[Goal, str, str]] = {
    # quality's goal is the task's: max for accuracy/F1, min for perplexity (each Measurement carries it).
    "quality": ("max", "", "the task metric (accuracy, F1, perplexity) on the tuning split"),
    "quality_drop": ("min", "points", "quality lost against the baseline: points (accuracy, F1) or % (perplexity)"),
    "accuracy_drop": ("min", "points", "baseline accuracy minus candidate accuracy, x100"),
    "f1_drop": ("min", "points", "baseline entity F1 minus candidate F1, x100"),
    "perplexity_increase": ("min", "%", "relative perplexity increase over the baseline, in percent"),
    "perplexity_ratio": ("min", "x", "candidate perplexity / baseline perplexity"),
    "latency_ms": ("min", "ms", "p50 latency at the measured batch and sequence length"),
    "latency_ms_p95": ("min", "ms", "p95 latency"),
    "throughput": ("max", "items/s", "items per second at the throughput batch"),
    "size_mb": ("min", "MB", "weights on disk"),
    "memory_mb": ("min", "MB", "peak resident memory while running"),
    "parameters": ("min", "", "parameters (tied weights once)"),
    "speedup": ("max", "x", "baseline latency / candidate latency"),
    "compression": ("max", "x", "baseline size / candidate size"),
}

OBJECTIVES = {"latency": "latency_ms", "size": "size_mb", "throughput": "throughput", "memory": "memory_mb"}


def goal_of(name: str) -> Goal:
    if name not in QUANTITIES:
        raise SlimformerError(f"unknown quantity '{name}'; use one of {', '.join(QUANTITIES)}")
    return QUANTITIES[name][0]


@dataclass(frozen=True)
class Measurement:
    """One measured number: its value, unit, spread (e.g. a 95% interval half-width or std), sample count."""

    value: float
    unit: str = ""
    spread: float | None = None
    n: int | None = None
    goal: Goal = "min"

    def better_or_equal(self, other: Measurement) -> bool:
        return self.value <= other.value if self.goal == "min" else self.value >= other.value

    def strictly_better(self, other: Measurement) -> bool:
        return self.value < other.value if self.goal == "min" else self.value > other.value


@dataclass(frozen=True)
class Candidate:
    """A compressed model: how it was made, where it lives, and what was measured."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    measurements: dict[str, Measurement] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def value(self, name: str) -> float:
        return self.measurements[name].value

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "path": self.path, "notes": list(self.notes),
                "measurements": {k: vars(m) for k, m in self.measurements.items()}}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Candidate:
        return Candidate(name=d["name"], params=d.get("params", {}), path=d.get("path"),
                         measurements={k: Measurement(**m) for k, m in d.get("measurements", {}).items()},
                         notes=tuple(d.get("notes", ())))


def measurement(name: str, value: float, **kw: Any) -> Measurement:
    goal, unit, _ = QUANTITIES.get(name, ("min", "", ""))
    return Measurement(value=float(value), unit=kw.pop("unit", unit), goal=kw.pop("goal", goal), **kw)


def dominates(a: Candidate, b: Candidate, objectives: Sequence[str]) -> bool:
    """a dominates b: no worse in every objective and strictly better in at least one."""
    ma, mb = [a.measurements[o] for o in objectives], [b.measurements[o] for o in objectives]
    return all(x.better_or_equal(y) for x, y in zip(ma, mb, strict=True)) and any(
        x.strictly_better(y) for x, y in zip(ma, mb, strict=True))


def pareto_front(candidates: Iterable[Candidate], objectives: Sequence[str]) -> list[Candidate]:
    """Candidates no other candidate dominates (ties and exact duplicates all stay on the front), in
    input order. Candidates missing an objective or with a NaN value are left out."""
    if not objectives:
        raise SlimformerError("the Pareto front needs at least one objective")
    pool = [c for c in candidates
            if all(o in c.measurements and not math.isnan(c.measurements[o].value) for o in objectives)]
    return [c for c in pool if not any(dominates(o, c, objectives) for o in pool if o is not c)]


@dataclass(frozen=True)
class Constraint:
    quantity: str
    op: Literal["<=", "<", ">=", ">", "=="]
    bound: float

    def holds(self, value: float) -> bool:
        return {"<=": value <= self.bound, "<": value < self.bound, ">=": value >= self.bound,
                ">": value > self.bound, "==": value == self.bound}[self.op]

    def __str__(self) -> str:
        unit = "%" if QUANTITIES.get(self.quantity, ("", ""))[1] == "%" else ""
        return f"{self.quantity}{self.op}{self.bound:g}{unit}"


_CONSTRAINT = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|==|<|>)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*$")
_NON_NEGATIVE = {"latency_ms", "latency_ms_p95", "throughput", "size_mb", "memory_mb", "parameters", "speedup",
                 "compression", "perplexity_ratio"}
# Quantities that only exist for some tasks (a budget naming another task's quantity could never hold).
TASK_QUANTITIES = {"accuracy_drop": "sequence-classification", "f1_drop": "token-classification",
                   "perplexity_increase": "causal-lm", "perplexity_ratio": "causal-lm"}


def parse_budget(text: str | None) -> list[Constraint]:
    """Parse ``"accuracy_drop<=1.0, latency_ms<=5"`` into constraints; a one-line error for anything else."""
    if text is None or not text.strip():
        return []
    out = []
    for part in re.split(r"[,;]| and ", text):
        if not part.strip():
            continue
        m = _CONSTRAINT.match(part)
        if not m:
            raise SlimformerError(f"cannot read budget '{part.strip()}'; write e.g. accuracy_drop<=1.0")
        name, op, number = m.group(1), m.group(2), float(m.group(3))
        if name not in QUANTITIES:
            raise SlimformerError(f"unknown budget quantity '{name}'; use one of {', '.join(QUANTITIES)}")
        if m.group(4) and QUANTITIES[name][1] not in ("%", "points"):
            raise SlimformerError(f"budget '{part.strip()}': {name} is not a percentage; drop the % sign")
        if op in ("<=", "<") and name in _NON_NEGATIVE and number <= 0:
            raise SlimformerError(f"budget '{part.strip()}' is impossible ({name} is never negative); raise the bound")
        if name.endswith("_drop") and op in ("<", "<=") and number < 0 and name != "quality_drop":
            raise SlimformerError(f"budget '{part.strip()}' asks the compressed model to beat the baseline; "
                                  "use a bound of 0 or more")
        out.append(Constraint(name, op, number))  # type: ignore[arg-type]
    return out


def check_budget_for_task(budget: Sequence[Constraint], task_type: str) -> None:
    """Refuse a budget naming another task's quantity (accuracy_drop for a language model, say)."""
    for k in budget:
        wanted = TASK_QUANTITIES.get(k.quantity)
        if wanted is not None and wanted != str(task_type):
            fits = [q for q, t in TASK_QUANTITIES.items() if t == str(task_type)] + ["quality_drop"]
            raise SlimformerError(f"budget quantity '{k.quantity}' is for {wanted}, not {task_type}; "
                                  f"use {' or '.join(fits)}")


def within_budget(c: Candidate, budget: Sequence[Constraint]) -> bool:
    return all(k.quantity in c.measurements and k.holds(c.value(k.quantity)) for k in budget)


def choose(candidates: Sequence[Candidate], budget: Sequence[Constraint], objective: str,
           tolerance: float = 0.0) -> Candidate | None:
    """The best candidate under the budget for one objective. Candidates whose objective is within
    ``tolerance`` (a fraction) of the best one's count as tied, so that timing noise does not decide between
    them; ties go to better quality, then smaller size, then the better objective, then the name."""
    goal = goal_of(objective)
    ok = [c for c in candidates if within_budget(c, budget) and objective in c.measurements]
    if not ok:
        return None
    sign = 1 if goal == "min" else -1
    best = min(sign * c.value(objective) for c in ok)
    tied = [c for c in ok if sign * c.value(objective) - best <= tolerance * abs(best)]

    def key(c: Candidate):
        quality = c.measurements.get("quality")
        # Better quality first: higher accuracy, lower perplexity.
        q = 0.0 if quality is None else (quality.value if quality.goal == "min" else -quality.value)
        size = c.value("size_mb") if "size_mb" in c.measurements else math.inf
        return (q, size, sign * c.value(objective), c.name)

    return min(tied, key=key)
