"""Which hyperparameters a study selects, from its rows: steps to a target, the ranking of runs
(:func:`selection_key`), the lr search's next point (:func:`next_lr`) and the selected point of a method at a batch
size (:func:`selected_cell`). Used by ``plan.py`` (what to run next), ``analysis.py`` (what to report) and the probe.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from gnlm.results import Row, target_key
from gnlm.study import StudyConfig


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
    """How learning rates are ranked: fewest (interpolated) steps to ``target``, ties to the lower final eval
    loss (without a target, a budget study: the lower final eval loss alone). A diverged or failed run ranks last;
    a run that never moved (every GN step skipped) keeps the warm start's loss, so any run that got lower ranks
    before it."""
    final = row.final_eval_loss
    bad = row.failed or row.diverged or final is None or not math.isfinite(final)
    return steps_to(row, target), math.inf if bad else float(final)


def next_lr(results: dict[float, Row], ratio: float, budget: int, target: float | None) -> float | None:
    """The learning-rate search of one method at one batch size (on the selection seed): while the best lr of
    ``results`` (lr → row, every lr tried so far) sits on an edge and fewer than ``budget`` lrs were tried, the
    next point beyond that edge (×``ratio`` above, ÷``ratio`` below). None when the search is done."""
    lrs = sorted(results)
    if len(lrs) >= budget:
        return None
    best = _best_lr({lr: [row] for lr, row in results.items()}, target)
    if best == lrs[-1]:
        return lrs[-1] * ratio
    if best == lrs[0]:
        return lrs[0] / ratio
    return None


def _best_lr(by_lr: dict[float, list[Row]], target: float | None) -> float:
    """The lr whose rows have the lowest median :func:`selection_key` (ties: the smaller lr). An lr whose every run
    skipped every step (it never moved, so it keeps its starting loss) is not chosen over one whose runs reached a
    lower loss on their way (median best eval loss below its final loss)."""

    def key(lr: float) -> tuple[float, float, float]:
        keys = [selection_key(r, target) for r in by_lr[lr]]
        return statistics.median(k[0] for k in keys), statistics.median(k[1] for k in keys), lr

    best = min(by_lr, key=key)
    if all(r.all_steps_skipped for r in by_lr[best]):
        final = statistics.median(math.inf if r.final_eval_loss is None else r.final_eval_loss for r in by_lr[best])
        moved = [lr for lr, rs in by_lr.items() if not all(r.all_steps_skipped for r in rs)
                 and statistics.median(math.inf if r.best_eval_loss is None else r.best_eval_loss for r in rs) < final]
        best = min(moved, key=key) if moved else best
    return best


def select_lr(rows: list[Row], target: float | None) -> tuple[float, int, str | None]:
    """The selected lr of one method at one batch size from its selection rows: (lr, trials, edge).

    Ranked by the median over the rows' seeds of :func:`selection_key` (one seed: that seed's own key), see
    :func:`_best_lr`; ``edge`` is "low"/"high" when the winner is the smallest/largest lr tried (of two or more),
    "single" for one lr."""
    by_lr: dict[float, list[Row]] = defaultdict(list)
    for r in rows:
        by_lr[float(r.lr)].append(r)
    lrs = sorted(by_lr)
    best = _best_lr(by_lr, target)
    edge = "single" if len(lrs) == 1 else "low" if best == lrs[0] else "high" if best == lrs[-1] else None
    return best, len(lrs), edge


def _reported(study: StudyConfig, rows: list[Row], method: str, batch: int) -> tuple[list[Row], list[Row]]:
    """(selection rows, reported rows) of a method at a batch: the selection seed's rows and the reported seeds'
    rows (a control has no selection of its own: all its rows are reported)."""
    rs = [r for r in rows if not r.failed and r.method == method and r.batch_tokens == batch]
    if method in study.controls:
        return rs, rs
    return [r for r in rs if r.seed == study.selection_seed], [r for r in rs if r.seed in study.seeds]


def selected_cell(study: StudyConfig, rows: list[Row], method: str, batch: int) -> dict[str, Any] | None:
    """The selected point of a method at a batch: ``best_point`` (every setting chosen, e.g. ``{"lr": 0.01}``),
    ``best_lr``, ``trials``, ``edge``, ``lr_on_edge``, and the rows of the reported seeds at it (``reported``); None
    when no selection row is in yet."""
    sel_rows, reported = _reported(study, rows, method, batch)
    if not sel_rows:
        return None
    lr, trials, edge = select_lr(sel_rows, study.primary_target)
    point = next(r.hparams for r in sel_rows if float(r.lr) == lr)
    return {"best_point": dict(point), "best_lr": lr, "trials": trials, "edge": edge,
            "lr_on_edge": edge is not None and edge != "single", "reported": [r for r in reported if float(r.lr) == lr]}
