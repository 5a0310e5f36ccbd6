"""Pure analysis of study results: rows and curves in, numbers out. Used by ``bench.py`` and ``report.py``.

Nothing here trains, writes or reads anything but the files named in its arguments.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The complete rows of a JSONL file (a torn last line, from a crash mid-write, is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows



def steps_to_target(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation row of a run's metrics with ``eval_loss <= target``: its step, tokens,
    forward-equivalents and wall time (None when the target is never reached)."""
    for row in curve:
        loss = row.get("eval_loss")
        if loss is not None and math.isfinite(loss) and loss <= target:
            return {"step": row["step"], "tokens": row.get("tokens"),
                    "forward_equivalents": row.get("forward_equivalents"), "wall_time": row.get("wall_time")}
    return None


def eval_curve(curve: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, eval losses) of the evaluation rows of a run's metrics."""
    pts = [(r["step"], r["eval_loss"]) for r in curve if r.get("eval_loss") is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


@dataclass
class LrResult:
    """One learning rate of one method at one batch size, aggregated over seeds (medians; a seed that did not
    reach the target counts as infinitely many steps, so the median is finite only if most seeds reached it)."""

    method: str
    family: str
    batch_tokens: int
    lr: float
    seeds: int
    reached_seeds: int
    steps: float
    tokens: float
    line_search_tokens: float
    forward_equivalents: float
    wall_time: float
    final_eval_loss: float
    diverged_seeds: int
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def reached(self) -> bool:
        return math.isfinite(self.steps)


def _median(values: list[float | None]) -> float:
    vals = [math.inf if v is None else float(v) for v in values]
    return statistics.median(vals) if vals else math.inf


def aggregate_lrs(rows: list[dict[str, Any]]) -> list[LrResult]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["batch_tokens"], float(r["lr"]))].append(r)
    out = []
    for (method, batch, lr), rs in groups.items():
        reached = [r for r in rs if r.get("reached")]

        def med(key: str) -> float:
            return _median([r.get(key) if r.get("reached") else None for r in rs])

        finals = [r.get("final_eval_loss") for r in rs]
        final = (statistics.fmean(finals) if all(f is not None and math.isfinite(f) for f in finals)
                 and not any(r.get("diverged") for r in rs) else math.inf)
        out.append(LrResult(method=method, family=rs[0].get("family", ""), batch_tokens=batch, lr=lr, seeds=len(rs),
                            reached_seeds=len(reached), steps=med("steps"), tokens=med("tokens"),
                            line_search_tokens=med("line_search_tokens"),
                            forward_equivalents=med("forward_equivalents"), wall_time=med("wall_time"),
                            final_eval_loss=final, diverged_seeds=sum(bool(r.get("diverged")) for r in rs), rows=rs))
    return out


@dataclass
class Best:
    """The best learning rate of a method at a batch size, and whether it sits on the edge of its grid."""

    result: LrResult
    grid: list[float]
    edge: Literal["low", "high", "single"] | None

    @property
    def lr(self) -> float:
        return self.result.lr


def best_lr(results: list[LrResult], kind: str = "steps_to_target") -> Best:
    """Fewest steps to target (budget studies: lowest final loss); ties and 'none reached' go to the lowest final
    eval loss, then the smaller learning rate. ``edge`` is "low"/"high" when the winner is the smallest/largest lr
    of a grid of two or more (the grid must grow that way), "single" for a one-point grid."""
    if not results:
        raise ValueError("best_lr needs at least one result")
    if kind == "budget":
        best = min(results, key=lambda r: (r.final_eval_loss, r.lr))
    else:
        best = min(results, key=lambda r: (r.steps, r.final_eval_loss, r.lr))
    grid = sorted(r.lr for r in results)
    edge = None
    if len(grid) == 1:
        edge = "single"
    elif best.lr == grid[0]:
        edge = "low"
    elif best.lr == grid[-1]:
        edge = "high"
    return Best(result=best, grid=grid, edge=edge)


def best_by_method_batch(rows: list[dict[str, Any]], kind: str = "steps_to_target") -> dict[tuple[str, int], Best]:
    by: dict[tuple[str, int], list[LrResult]] = defaultdict(list)
    for r in aggregate_lrs(rows):
        by[(r.method, r.batch_tokens)].append(r)
    return {key: best_lr(rs, kind) for key, rs in by.items()}


def doubling_reduction(batches: list[float], steps: list[float], i: int) -> float:
    """The fraction of steps saved by doubling the batch at ``batches[i]``: 1 − S(2B)/S(B).

    S is interpolated linearly in (log2 batch, log steps), i.e. geometrically between measured batches, so batch
    grids that are not exact doublings work. Where 2B lies beyond the largest batch, the span [B, B_max] is used
    and the saving is scaled to one doubling: 1 − (S(B_max)/S(B))^(1/log2(B_max/B)). Steps may be ``inf`` (target
    not reached): not-reached → reached counts as a saving of 1; reached → not reached as −inf (no saving); not
    reached at both ends is a saving of 0 if the method reached the target at some smaller batch (it got worse),
    else NaN (unknown)."""
    b0, s0 = batches[i], steps[i]
    end = min(2.0 * b0, batches[-1])
    span = math.log2(end / b0)
    if span <= 0:
        return math.nan
    # the measured points inside (B, end], plus end itself
    xs, ys = [math.log2(b0)], [s0]
    for b, s in zip(batches[i + 1:], steps[i + 1:]):
        if b <= end:
            xs.append(math.log2(b))
            ys.append(s)
        else:  # interpolate at end between the last point and this one
            x_end = math.log2(end)
            if xs[-1] < x_end:
                if math.isfinite(ys[-1]) and math.isfinite(s):
                    t = (x_end - xs[-1]) / (math.log2(b) - xs[-1])
                    ys.append(math.exp(math.log(ys[-1]) + t * (math.log(s) - math.log(ys[-1]))))
                else:
                    ys.append(s if not math.isfinite(s) else ys[-1])
                xs.append(x_end)
            break
    s_end = ys[-1]
    if not math.isfinite(s0) and not math.isfinite(s_end):
        return 0.0 if any(math.isfinite(s) for s in steps[:i]) else math.nan
    if not math.isfinite(s0):
        return 1.0
    if not math.isfinite(s_end):
        return -math.inf
    return 1.0 - (s_end / s0) ** (1.0 / span)


def critical_batch(batches: list[float], steps: list[float], fraction: float) -> dict[str, Any]:
    """The critical batch size: the smallest measured batch B such that at B and at every larger measured batch
    (except the largest, which has no larger neighbour) doubling the batch saves less than ``fraction`` of the
    steps (:func:`doubling_reduction`). Returns ``{"batch": B or None, "bound": ..., "reductions": {B: saving}}``
    with bound "exact"; "at_or_below" when already the smallest batch qualifies (the plateau may start earlier);
    "above" (batch None) when doubling still saves at least ``fraction`` at the end of the grid; "none" when the
    method never reached the target."""
    order = sorted(range(len(batches)), key=lambda k: batches[k])
    bs = [float(batches[k]) for k in order]
    ss = [float(steps[k]) if steps[k] is not None else math.inf for k in order]
    reductions = {bs[i]: doubling_reduction(bs, ss, i) for i in range(len(bs) - 1)}
    if not any(math.isfinite(s) for s in ss):
        return {"batch": None, "bound": "none", "reductions": reductions}
    if len(bs) < 2:
        return {"batch": None, "bound": "above", "reductions": reductions}
    candidate = None
    for i in reversed(range(len(bs) - 1)):
        r = reductions[bs[i]]
        if math.isnan(r) or r >= fraction:
            break
        candidate = i
    if candidate is None:
        return {"batch": None, "bound": "above", "reductions": reductions}
    batch = bs[candidate]
    return {"batch": int(batch) if batch.is_integer() else batch,
            "bound": "at_or_below" if candidate == 0 else "exact", "reductions": reductions}


def summarize(study: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the report shows, from the study dict and the rows of runs.jsonl."""
    kind = study.get("kind", "steps_to_target")
    best = best_by_method_batch(rows, kind)
    methods = [m["name"] for m in study["methods"]]
    batches = sorted(study["batch_tokens"])
    critical = {}
    if kind == "steps_to_target":
        for m in methods:
            pts = [(b, best[(m, b)].result.steps) for b in batches if (m, b) in best]
            if pts:
                critical[m] = critical_batch([p[0] for p in pts], [p[1] for p in pts], study["critical_fraction"])
    edges = [(m, b, best[(m, b)]) for m in methods for b in batches
             if (m, b) in best and best[(m, b)].edge is not None]
    return {"kind": kind, "best": best, "methods": methods, "batches": batches, "critical": critical,
            "edges": edges, "errors": [r for r in rows if r.get("status") == "error"]}
