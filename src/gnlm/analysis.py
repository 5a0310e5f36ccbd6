"""Pure analysis of study results: a study's declaration (``study.StudyConfig``) and its rows (``results.Row``) in,
numbers out (``summary.json``): steps to every target at the selected point (``selection.py``), the S(B) fit with
its bootstrap, the saving per doubling. Used by ``report.py``.

Nothing here trains, reads or writes files.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

from gnlm.results import Row, target_key
from gnlm.selection import selected_cell, steps_to
from gnlm.study import StudyConfig


@dataclass
class StepsFit:
    """S(B) = S_min·(1 + B_crit/B) fitted to steps-to-target S at batch sizes B (McCandlish et al. 2018)."""

    s_min: float
    b_crit: float
    residual: float  # root-mean-square of the log-steps residuals
    in_range: bool  # B_crit lies within the measured batch sizes
    # B_crit at the top of the search (10⁴ × the largest batch): the steps fall like 1/B over the whole measured
    # range, so the data give only a lower bound on B_crit (and S_min → 0)
    unbounded: bool = False

    def steps(self, batch: float) -> float:
        return self.s_min * (1.0 + self.b_crit / batch)


MIN_FIT_BATCHES = 4


def fit_steps_vs_batch(batches: list[float], steps: list[float]) -> StepsFit:
    """Least squares on log S of S(B) = S_min·(1 + B_crit/B), B_crit ≥ 0.

    For a fixed B_crit the best log S_min is the mean of log S − log(1 + B_crit/B) (closed form), so the fit is a
    one-dimensional search over log B_crit: a grid from 10⁻⁴·B_min to 10⁴·B_max, refined by golden section, plus
    B_crit = 0 (no gain from batch size at all). Needs at least 4 batch sizes with finite steps."""
    pts = [(float(b), float(s)) for b, s in zip(batches, steps) if s is not None and math.isfinite(s) and s > 0]
    if len(pts) < MIN_FIT_BATCHES:
        raise ValueError(f"fitting S(B) = S_min(1 + B_crit/B) needs steps at >= {MIN_FIT_BATCHES} batch sizes, "
                         f"got {len(pts)}")
    bs = [b for b, _ in pts]
    logs = [math.log(s) for _, s in pts]

    def loss_at(b_crit: float) -> tuple[float, float]:
        shifts = [math.log1p(b_crit / b) for b in bs]
        log_smin = sum(ls - sh for ls, sh in zip(logs, shifts)) / len(bs)
        return sum((ls - log_smin - sh) ** 2 for ls, sh in zip(logs, shifts)), log_smin

    lo, hi = math.log(min(bs) * 1e-4), math.log(max(bs) * 1e4)
    grid = [lo + (hi - lo) * i / 400 for i in range(401)]
    best_i = min(range(len(grid)), key=lambda i: loss_at(math.exp(grid[i]))[0])
    a, b = grid[max(best_i - 1, 0)], grid[min(best_i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(80):  # golden-section refinement inside the bracketing grid cells
        c, d = b - g * (b - a), a + g * (b - a)
        if loss_at(math.exp(c))[0] < loss_at(math.exp(d))[0]:
            b = d
        else:
            a = c
    b_crit = math.exp((a + b) / 2)
    if loss_at(0.0)[0] <= loss_at(b_crit)[0]:
        b_crit = 0.0
    sse, log_smin = loss_at(b_crit)
    return StepsFit(s_min=math.exp(log_smin), b_crit=b_crit, residual=math.sqrt(sse / len(bs)),
                    in_range=min(bs) <= b_crit <= max(bs), unbounded=math.log(b_crit or 1.0) >= hi - 1e-6)


def bootstrap_fit(batches: list[float], steps_by_seed: list[list[float]], n: int = 1000, seed: int = 0,
                  level: float = 0.9) -> dict[str, Any]:
    """The fit of the median steps over seeds, and a ``level`` bootstrap interval over seeds: each resample
    draws, at every batch size, as many seeds as measured (with replacement) and refits the medians.
    ``steps_by_seed[i]`` are the steps of every seed at ``batches[i]`` (inf: not reached)."""
    medians = [statistics.median(s) for s in steps_by_seed]
    fit = fit_steps_vs_batch(batches, medians)
    rng = random.Random(seed)
    b_crits, s_mins = [], []
    for _ in range(n):
        resampled = [statistics.median(rng.choices(s, k=len(s))) for s in steps_by_seed]
        try:
            f = fit_steps_vs_batch(batches, resampled)
        except ValueError:  # too few batch sizes reached in this resample
            continue
        b_crits.append(math.inf if f.unbounded else f.b_crit)
        s_mins.append(f.s_min)
    q = (1 - level) / 2

    def quantile(v: list[float], p: float) -> float | None:
        if not v:
            return None
        v = sorted(v)
        return v[min(len(v) - 1, max(0, round(p * (len(v) - 1))))]

    def finite(v: float | None) -> float | None:  # JSON has no infinity: an unbounded end is None
        return v if v is None or math.isfinite(v) else None

    # unbounded: S(B) ≈ steps_times_batch / B over the measured range (S_min → 0, B_crit → ∞)
    return {"s_min": fit.s_min, "b_crit": None if fit.unbounded else fit.b_crit, "residual": fit.residual,
            "in_range": fit.in_range, "b_crit_unbounded": fit.unbounded, "steps_times_batch": fit.s_min * fit.b_crit,
            "b_crit_lo": finite(quantile(b_crits, q)), "b_crit_hi": finite(quantile(b_crits, 1 - q)),
            "s_min_lo": quantile(s_mins, q), "s_min_hi": quantile(s_mins, 1 - q), "resamples": len(b_crits)}


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


def _median_or_none(values: list[float]) -> float | None:
    if not values:
        return None
    m = statistics.median(values)
    return m if math.isfinite(m) else None


def eta_at_floor(rows: list[Row], line_search_range: int) -> float | None:
    """The share of GN outer steps, over ``rows``, whose line search chose its smallest step size
    (1/√2)^(range−1): near 1, the range binds (the step wanted to be shorter still; a larger
    ``gn.line_search_range`` lets it). None without recorded η (or with the skip option's η = 0 only)."""
    floor = 2.0 ** (-(line_search_range - 1) / 2)
    at_floor = [abs(e - floor) <= 1e-9 * floor for r in rows for e in r.etas or [] if e > 0]
    return sum(at_floor) / len(at_floor) if at_floor else None


EARLY_STEPS = 10


def early_rise(row: Row, steps: int = EARLY_STEPS) -> float | None:
    """How far a run's eval loss rose above where it started within its first ``steps`` steps (the restart spike
    of a fresh optimizer on a warm start; ≤ 0 when it only fell). None without a logged curve."""
    pts = [(s, v) for s, v in zip(row.curve.get("step") or [], row.curve.get("eval_loss") or [])
           if v is not None and math.isfinite(v)]
    early = [v for s, v in pts[1:] if s <= steps]
    if not pts or pts[0][0] != 0 or not early:
        return None
    return max(early) - pts[0][1]


def summarize_study(study: StudyConfig, rows: list[Row], bootstrap: int = 1000) -> dict[str, Any]:
    """The machine-readable summary of a study (``summary.json``), from its declaration and the rows of runs.jsonl
    alone.

    Per method and batch size: the lr selected on ``selection_seed`` (controls: the lr they ran at), the trials
    used and whether the selected lr is on an edge; then, from the reported rows (``seeds`` at the selected lr),
    per declared target: median integer and interpolated steps, seeds that reached it, median FLOPs, wall time and
    tokens to it (interpolated), and GN's skipped steps, inner steps N and line-search floor share. Per method: the
    fit S(B) = S_min(1 + B_crit/B) on the primary target with a bootstrap interval over seeds (None, with the
    reason, below 4 batch sizes reached) and the saving per doubling. A budget study (no targets) reports the
    median final and best eval loss per cell instead."""
    targets = list(study.targets)
    primary = study.primary_target
    cells: dict[str, dict[str, Any]] = {}
    fits: dict[str, Any] = {}
    for m in [m.name for m in study.methods]:
        per_batch_steps: list[tuple[int, list[float]]] = []
        for b in study.batch_tokens:
            sel = selected_cell(study, rows, m, b)
            if sel is None:
                continue
            reported = sel.pop("reported")
            cell: dict[str, Any] = {**{k: sel[k] for k in ("best_lr", "lr_on_edge")},
                                    "control_of": study.controls.get(m), "edge": sel["edge"], "trials": sel["trials"],
                                    "seeds": len(reported), "best_point": sel["best_point"], "per_target": {}}
            rises = [early_rise(r) for r in reported]
            cell["early_rise"] = _median_or_none([x for x in rises if x is not None])
            if reported and reported[0].family == "gn":
                cell["inner_steps"] = reported[0].inner_steps
                cell["skipped_steps"] = _median_or_none([float(r.skipped_steps or 0) for r in reported])
                cell["eta_at_floor"] = eta_at_floor(reported, study.method_run_config(m).gn.line_search_range)
            if study.kind == "budget":
                cell["final_eval_loss"] = _median_or_none([r.final_eval_loss for r in reported
                                                           if r.final_eval_loss is not None and not r.diverged])
                cell["best_eval_loss"] = _median_or_none([r.best_eval_loss for r in reported
                                                          if r.best_eval_loss is not None])
                cell["diverged"] = sum(r.diverged for r in reported)
            for t in targets:
                crossing = [r.crossings.get(target_key(t)) for r in reported]
                ok = [c for c, r in zip(crossing, reported) if c is not None and not r.diverged]
                cell["per_target"][target_key(t)] = {
                    "steps": _median_or_none([steps_to(r, t, interpolated=False) for r in reported]),
                    "steps_interp": _median_or_none([steps_to(r, t) for r in reported]),
                    "reached": len(ok),
                    "flops_to_target": _median_or_none([c["flops_interp"] for c in ok if c.get("flops_interp")]),
                    "time_to_target_s": _median_or_none([c["wall_time_interp"] for c in ok
                                                         if c.get("wall_time_interp") is not None]),
                    "tokens_to_target": _median_or_none([c["tokens_interp"] for c in ok
                                                         if c.get("tokens_interp") is not None]),
                }
            cells[f"{m}/{b}"] = {"method": m, "batch_tokens": b, **cell}
            if primary is not None and reported:
                per_batch_steps.append((b, [steps_to(r, primary) for r in reported]))
        if study.kind == "budget":
            continue
        reached = [(b, s) for b, s in per_batch_steps if math.isfinite(statistics.median(s))]
        if len(reached) >= MIN_FIT_BATCHES:
            fits[m] = bootstrap_fit([b for b, _ in reached], [s for _, s in reached], n=bootstrap)
        else:
            fits[m] = {"reason": f"the primary target was reached (median over seeds) at {len(reached)} batch "
                                 f"size{'' if len(reached) == 1 else 's'}; a fit needs >= {MIN_FIT_BATCHES}"}
        if len(per_batch_steps) > 1:  # the per-doubling saving on the medians, as a second view of the same points
            bs, medians = [b for b, _ in per_batch_steps], [statistics.median(s) for _, s in per_batch_steps]
            saving = [doubling_reduction(bs, medians, i) for i in range(len(bs) - 1)]
            # a saving needs S(B) itself: from a batch that did not reach the target it is unknown
            fits[m]["per_doubling"] = {str(int(b)): (v if math.isfinite(v) and math.isfinite(s) else None)
                                       for b, s, v in zip(bs, medians, saving)}
    out = {"name": study.name, "targets": targets, "primary_target": primary, "batch_tokens": list(study.batch_tokens),
           "lr_budget": study.lr_budget, "selection_seed": study.selection_seed, "seeds": list(study.seeds),
           "cells": cells, "fit": fits, "failed_runs": sum(r.failed for r in rows)}
    if study.kind == "budget":
        out.update(kind="budget", token_budget=study.token_budget,
                   count_line_search_tokens=study.count_line_search_tokens)
    return out
