"""Which hyperparameters a study selects, from its rows: steps to a target, the ranking of runs
(:func:`selection_key`), the lr search's next point (:func:`next_lr`), a search's next points (edge extensions,
:func:`extension_points`; the lr refinement, :func:`refinement_points`) and the selected point of a method at a
batch size (:func:`selected_cell`). Used by ``plan.py`` (what to run next), ``analysis.py`` (what to report) and the
probe.

A point is what the study chose for a run (:func:`point_of`: ``{"lr": ...}`` on an lr grid; every searched
setting in a search); the rows of one point are one candidate, ranked by the median of their keys.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from typing import Any

from gnlm.results import Row, target_key
from gnlm.search import LR, Side, refined_lrs
from gnlm.study import MethodConfig, StudyConfig


def steps_to(row: Row, target: float | None, interpolated: bool = True) -> float:
    """A study row's steps to ``target`` (interpolated crossing by default); inf when not reached, diverged or
    failed, or when there is no target (a budget study)."""
    if target is None or row.failed or row.diverged:
        return math.inf
    c = row.crossings.get(target_key(target))
    if c is None:
        return math.inf
    v = c.get("step_interp" if interpolated else "step")
    return math.inf if v is None else float(v)


def selection_key(row: Row, target: float | None) -> tuple[float, float]:
    """How learning rates (points) are ranked: fewest (interpolated) steps to ``target``, ties to the lower final
    eval loss (without a target, a budget study: the lower final eval loss alone). A diverged or failed run ranks
    last; a run that never moved (every GN step skipped) keeps the warm start's loss, so any run that got lower
    ranks before it."""
    final = row.final_eval_loss
    bad = row.failed or row.diverged or final is None or not math.isfinite(final)
    return steps_to(row, target), math.inf if bad else float(final)


def point_of(row: Row) -> dict[str, Any]:
    """The point a row ran at: its ``hparams``, with its lr as a float (a row without hparams: its lr alone)."""
    return {**row.hparams, LR: float(row.lr)}


def point_key(point: dict[str, Any]) -> str:
    """A point as a key that does not depend on the order of its settings."""
    return json.dumps(point, sort_keys=True)


def _by_point(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[point_key(point_of(r))].append(r)
    return dict(groups)


def _best(groups: dict[str, list[Row]], target: float | None) -> str:
    """The point (a key of ``groups``: point key → its rows) whose rows have the lowest median
    :func:`selection_key`; ties to the smaller lr, then the smaller point key. A point whose every run skipped every
    step (it never moved, so it keeps its starting loss) is not chosen over one whose runs reached a lower loss on
    their way (median best eval loss below its final loss)."""

    def key(k: str) -> tuple[float, float, float, str]:
        keys = [selection_key(r, target) for r in groups[k]]
        return statistics.median(k[0] for k in keys), statistics.median(k[1] for k in keys), groups[k][0].lr, k

    best = min(groups, key=key)
    if all(r.all_steps_skipped for r in groups[best]):
        final = statistics.median(math.inf if r.final_eval_loss is None else r.final_eval_loss for r in groups[best])
        moved = [k for k, rs in groups.items() if not all(r.all_steps_skipped for r in rs)
                 and statistics.median(math.inf if r.best_eval_loss is None else r.best_eval_loss for r in rs) < final]
        best = min(moved, key=key) if moved else best
    return best


def best_point(rows: list[Row], target: float | None) -> dict[str, Any]:
    """The selected point of one method at one batch size from its selection rows (:func:`_best`)."""
    groups = _by_point(rows)
    return point_of(groups[_best(groups, target)][0])


def next_lr(results: dict[float, Row], ratio: float, budget: int, target: float | None) -> float | None:
    """The learning-rate search of one method at one batch size (on the selection seed): while the best lr of
    ``results`` (lr → row, every lr tried so far) sits on an edge and fewer than ``budget`` lrs were tried, the
    next point beyond that edge (×``ratio`` above, ÷``ratio`` below). None when the search is done."""
    lrs = sorted(results)
    if len(lrs) >= budget:
        return None
    best = best_point(list(results.values()), target)[LR]
    if best == lrs[-1]:
        return lrs[-1] * ratio
    if best == lrs[0]:
        return lrs[0] / ratio
    return None


def _lr_edge(lrs: list[float], best: float) -> str | None:
    """"low"/"high" when ``best`` is the smallest/largest of two or more ``lrs``, "single" for one lr."""
    lrs = sorted(set(lrs))
    return "single" if len(lrs) == 1 else "low" if best == lrs[0] else "high" if best == lrs[-1] else None


def select_lr(rows: list[Row], target: float | None) -> tuple[float, int, str | None]:
    """The selected lr of one method at one batch size from its selection rows on an lr grid: (lr, trials, edge).

    Ranked by the median over the rows' seeds of :func:`selection_key` (one seed: that seed's own key), see
    :func:`_best`; ``edge`` as :func:`_lr_edge`."""
    lr = best_point(rows, target)[LR]
    lrs = [float(r.lr) for r in rows]
    return lr, len(set(lrs)), _lr_edge(lrs, lr)


def _edges(study: StudyConfig, m: MethodConfig, batch: int, rows: list[Row]) -> dict[str, tuple[Side, dict[str, Any]]]:
    """Per dimension of ``m``'s search whose best value sits on an edge of what ``rows`` tried
    (:meth:`search.Dim.edge`): the side and the best point with that value moved beyond it
    (:meth:`search.Dim.beyond`), in declared order. No edge where a point that differs from the best in this
    setting alone was tried beyond it (a lost extension or refinement brackets it), nor where the next value is one
    the run config refuses (a weight decay below 0: the setting's own limit)."""
    best = best_point(rows, study.primary_target)
    tried = [point_of(rs[0]) for rs in _by_point(rows).values()]
    out: dict[str, tuple[Side, dict[str, Any]]] = {}
    for d in m.space():
        values = [p[d.key] for p in tried]
        side = d.edge(best[d.key], values, study.trials)
        line = [p[d.key] for p in tried if all(p[k] == v for k, v in best.items() if k != d.key)]
        if side is None or any(v > best[d.key] if side == "high" else v < best[d.key] for v in line):
            continue
        point = {**best, d.key: d.beyond(side, values, study.trials)}
        if study.point_is_valid(m, batch, point):
            out[d.key] = (side, point)
    return out


def extension_points(study: StudyConfig, m: MethodConfig, batch: int, rows: list[Row],
                     room: int) -> list[dict[str, Any]]:
    """A search's next wave of edge extensions, given the selection rows of every point tried so far: one point
    beyond each edge the best point sits on (:func:`_edges`), in declared order, at most ``room``."""
    return [point for _, point in _edges(study, m, batch, rows).values()][:max(room, 0)]


def refinement_points(study: StudyConfig, rows: list[Row]) -> list[dict[str, Any]]:
    """The best point with its lr ×√2, ÷√2, ×2, ... (``study.refine`` of them, :func:`search.refined_lrs`),
    every other setting kept; a point already tried is left out."""
    best = best_point(rows, study.primary_target)
    tried = _by_point(rows)
    points = [{**best, LR: lr} for lr in refined_lrs(best[LR], study.refine)]
    return [p for p in points if point_key(p) not in tried]


def _reported(study: StudyConfig, rows: list[Row], method: str, batch: int) -> tuple[list[Row], list[Row]]:
    """(selection rows, reported rows) of a method at a batch: the selection seed's rows and the reported seeds'
    rows (a control has no selection of its own: all its rows are reported)."""
    rs = [r for r in rows if not r.failed and r.method == method and r.batch_tokens == batch]
    if method in study.controls:
        return rs, rs
    return [r for r in rs if r.seed == study.selection_seed], [r for r in rs if r.seed in study.seeds]


def selected_cell(study: StudyConfig, rows: list[Row], method: str, batch: int) -> dict[str, Any] | None:
    """The selected point of a method at a batch: ``best_point`` (every setting chosen, e.g. ``{"lr": 0.01}``),
    ``best_lr``, ``trials`` (points run on the selection seed), ``edges`` (per dimension still on an edge of what was
    tried: "low" or "high"; an lr grid: its lr), ``edge`` (the lr's: "low", "high", "single" for one lr on a grid,
    or None), ``lr_on_edge``, and the rows of the reported seeds at the point (``reported``); None when no selection
    row is in yet."""
    sel_rows, reported = _reported(study, rows, method, batch)
    if not sel_rows:
        return None
    point = best_point(sel_rows, study.primary_target)
    m = study.method(method)
    if m.search:
        edges = {k: side for k, (side, _) in _edges(study, m, batch, sel_rows).items()}
        edge = edges.get(LR)
    else:
        edge = _lr_edge([float(r.lr) for r in sel_rows], point[LR])
        edges = {LR: edge} if edge in ("low", "high") else {}
    key = point_key(point)
    return {"best_point": point, "best_lr": point[LR], "trials": len(_by_point(sel_rows)), "edge": edge,
            "edges": edges, "lr_on_edge": LR in edges,
            "reported": [r for r in reported if point_key(point_of(r)) == key]}
