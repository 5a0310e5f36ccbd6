"""Pure analysis of study results: a study's declaration (``study.StudyConfig``) and its rows (``results.Row``) in,
numbers out (``summary.json``): steps to every target at the selected point (``selection.py``), the S(B) fit with
both critical-batch definitions and their intervals, the saving per doubling and where GN becomes cheaper than the
best baseline in FLOPs and time (the statistics themselves, on plain numbers, are ``stats.py``), the steps per
segment between targets and from the restart level, the verdicts against a reference method. Used by
``report.py``.

Nothing here trains, reads or writes files.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from itertools import pairwise
from typing import Any

from gnlm.results import Row, target_crossing, target_key
from gnlm.selection import selected_cell, steps_to
from gnlm.stats import (
    MIN_FIT_BATCHES,
    bootstrap_fit,
    compute_crossover,
    doubling_reduction,
    finite_or_none,
    median_or_inf,
    ratio_interval,
    verdict,
)
from gnlm.study import StudyConfig


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


def restart_step(row: Row, level: float) -> float:
    """The interpolated step at which a run first reaches the study's restart level (after its restart spike): its
    recorded crossing, or, in a row recorded without one, the crossing of its logged curve. inf: never reached."""
    key = target_key(level)
    if key not in row.crossings:
        columns = {k: v for k, v in row.curve.items() if v}
        evals = [dict(zip(columns, values)) for values in zip(*columns.values())]
        row = replace(row, crossings={key: target_crossing(evals, level)})
    return steps_to(row, level)


def segment_steps(rows: list[Row], targets: list[float]) -> list[float | None]:
    """Steps between consecutive targets: warm start → t₁, t₁ → t₂, … (``targets`` from the shallowest), as the
    differences of the median steps over ``rows`` (the seeds of one cell) to each end. Each run reaches a deeper
    target later, so the medians are ordered: the segments are ≥ 0 and add up to the median steps to each target
    that the steps tables show. None where the segment's end was not reached (median over seeds)."""
    ends = [0.0] + [median_or_inf([steps_to(r, t) for r in rows]) for t in targets]
    return [b - a if math.isfinite(b) else None for a, b in pairwise(ends)]


def seed_costs(rows: list[Row], target: float, measure: str) -> list[float]:
    """Per reported seed, the interpolated ``measure`` (``flops_interp``, ``wall_time_interp``) of its crossing of
    ``target``; inf where the run did not reach it (a seed whose crossing lacks the measure is left out)."""
    out = []
    for r in rows:
        if not math.isfinite(steps_to(r, target)):
            out.append(math.inf)
        elif (v := r.crossings[target_key(target)].get(measure)) is not None:
            out.append(float(v))
    return out


def pending_baselines(study: StudyConfig, cells: dict[str, Any]) -> dict[str, list[str]]:
    """Per batch size (str) with any, the baselines declared there whose reported seeds have not all run yet
    (``summary["pending_baselines"]``). Until they have, no best baseline is named at that batch: the one with the
    fewest steps so far could still lose to one whose seeds are still to come."""
    out: dict[str, list[str]] = {}
    for b in study.batch_tokens:
        names = [m.name for m in study.methods if m.family != "gn" and m.control_of is None
                 and (m.batches is None or b in m.batches)
                 and (cells.get(f"{m.name}/{b}") or {}).get("seeds", 0) < len(study.seeds)]
        if names:
            out[str(b)] = names
    return out


def best_baseline(cells: dict[str, Any], baselines: list[str], batch: int, target: float, *,
                  pending: dict[str, list[str]], measure: str = "steps_interp") -> tuple[str | None, float]:
    """The baseline with the fewest ``measure`` (median over seeds) to ``target`` at ``batch``: (name, value);
    (None, inf) when none reached it or while any of ``baselines`` is pending there (:func:`pending_baselines`; a
    summary written before that key existed has none)."""
    best: tuple[str | None, float] = (None, math.inf)
    if set(pending.get(str(batch), ())) & set(baselines):
        return best
    for m in baselines:
        v = ((cells.get(f"{m}/{batch}") or {}).get("per_target", {}).get(target_key(target)) or {}).get(measure)
        if v is not None and v < best[1]:
            best = (m, v)
    return best


def summarize_study(study: StudyConfig, rows: list[Row], bootstrap: int = 1000) -> dict[str, Any]:
    """The machine-readable summary of a study (``summary.json``), from its declaration and the rows of runs.jsonl
    alone.

    Per method and batch size: the lr selected on ``selection_seed`` (controls: the lr they ran at), the trials
    used and whether the selected lr is on an edge; then, from the reported rows (``seeds`` at the selected lr),
    per declared target: median integer and interpolated steps, seeds that reached it, median FLOPs, wall time and
    tokens to it (interpolated), GN's total inner steps to it (outer steps × N, ``inner_steps_to_target``) and,
    when the study declares a ``restart_level``, the median over seeds of the steps from there
    (``steps_from_restart``, beside the cell's ``restart_steps``); and GN's skipped steps, inner steps N and
    line-search floor share. Per method (``fit``): the fit S(B) = S_min(1 + B_crit/B) on the primary target with
    both critical batches and their intervals (:func:`bootstrap_fit`; None, with the reason, below 4 batch sizes
    reached) and the saving per doubling. Per GN method: where it becomes cheaper than the best baseline in FLOPs
    and in measured time (``crossover``, :func:`compute_crossover`), and per batch its steps and the best
    baseline's (fewest steps to the primary target) between consecutive targets (``segments``,
    :func:`segment_steps`). While a study is still running, a batch where some baseline's reported seeds are still
    to come (``pending_baselines``) names no best baseline and is left out of the crossover. A budget study (no
    targets) reports the median final and best eval loss per cell instead."""
    targets = list(study.targets)
    primary = study.primary_target
    restart = study.restart_level
    cells: dict[str, dict[str, Any]] = {}
    fits: dict[str, Any] = {}
    reported_rows: dict[tuple[str, int], list[Row]] = {}  # (method, batch) -> its reported rows
    for m in [m.name for m in study.methods]:
        per_batch_steps: list[tuple[int, list[float]]] = []
        for b in study.batch_tokens:
            sel = selected_cell(study, rows, m, b)
            if sel is None:
                continue
            reported = reported_rows[m, b] = sel.pop("reported")
            cell: dict[str, Any] = {**{k: sel[k] for k in ("best_lr", "lr_on_edge")},
                                    "control_of": study.controls.get(m), "edge": sel["edge"], "trials": sel["trials"],
                                    "seeds": len(reported), "best_point": sel["best_point"], "edges": sel["edges"],
                                    "per_target": {}}
            rises = [early_rise(r) for r in reported]
            cell["early_rise"] = _median_or_none([x for x in rises if x is not None])
            if reported and reported[0].family == "gn":
                cell["inner_steps"] = reported[0].inner_steps
                cell["skipped_steps"] = _median_or_none([float(r.skipped_steps or 0) for r in reported])
                line_search_range = study.method_run_config(m, sel["best_point"]).gn.line_search_range
                cell["eta_at_floor"] = eta_at_floor(reported, line_search_range)
            if study.kind == "budget":
                finals = [r.final_eval_loss for r in reported if r.final_eval_loss is not None and not r.diverged]
                cell["final_eval_loss"] = _median_or_none(finals)
                cell["final_eval_loss_range"] = [min(finals), max(finals)] if finals else None
                cell["best_eval_loss"] = _median_or_none([r.best_eval_loss for r in reported
                                                          if r.best_eval_loss is not None])
                cell["diverged"] = sum(r.diverged for r in reported)
            if restart is not None:
                from_step = [restart_step(r, restart) for r in reported]
                cell["restart_steps"] = _median_or_none(from_step)
            for t in targets:
                crossing = [r.crossings.get(target_key(t)) for r in reported]
                ok = [c for c, r in zip(crossing, reported) if c is not None and not r.diverged]
                cell["per_target"][target_key(t)] = {
                    "steps": _median_or_none([steps_to(r, t, interpolated=False) for r in reported]),
                    "steps_interp": _median_or_none([steps_to(r, t) for r in reported]),
                    "reached": len(ok),
                    "flops_to_target": _median_or_none([c["flops_interp"] for c in ok if c.get("flops_interp")]),
                    "time_to_target_s": _median_or_none(times := [c["wall_time_interp"] for c in ok
                                                                   if c.get("wall_time_interp") is not None]),
                    # the seeds' spread: on a shared machine one seed's time can carry another process's load
                    "time_to_target_range": [min(times), max(times)] if times else None,
                    "tokens_to_target": _median_or_none([c["tokens_interp"] for c in ok
                                                         if c.get("tokens_interp") is not None]),
                }
                point = cell["per_target"][target_key(t)]
                if cell.get("inner_steps") and point["steps_interp"] is not None:
                    point["inner_steps_to_target"] = point["steps_interp"] * cell["inner_steps"]
                if restart is not None:  # a run that reached the target crossed the restart level before
                    point["steps_from_restart"] = _median_or_none([
                        steps_to(r, t) - s0 if math.isfinite(s0) else math.inf for r, s0 in zip(reported, from_step)])
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
    else:
        out.update(restart_level=restart, pending_baselines=pending_baselines(study, cells),
                   **_gn_against_baselines(study, cells, reported_rows, bootstrap))
        if study.reference is not None:
            out.update(reference=study.reference,
                       against_reference=against_reference(study, reported_rows, bootstrap))
    return out


def against_reference(study: StudyConfig, reported_rows: dict[tuple[str, int], list[Row]],
                      bootstrap: int = 1000) -> dict[str, Any]:
    """Every other method against the study's ``reference`` (an ablation table): per method, batch and declared
    target, the median interpolated steps over the reported seeds of the method and of the reference (None: the
    median run did not reach it), their ratio (method / reference: above 1, the method needs more steps; None when
    either is None), a 90% bootstrap interval of that ratio over seeds (:func:`ratio_interval`) and how many of the
    method's seeds reached the target; with a declared ``expect``, the ``verdict`` on the published claim
    (:func:`verdict`)."""
    out: dict[str, Any] = {}
    others = [m for m in study.methods if m.control_of is None and m.name != study.reference]
    for method in others:
        m = method.name
        out[m] = {}
        for b in study.batch_tokens:
            own, ref = reported_rows.get((m, b)), reported_rows.get((study.reference, b))
            if not own or not ref:
                continue
            out[m][str(b)] = {}
            for t in study.targets:
                mine, theirs = [steps_to(r, t) for r in own], [steps_to(r, t) for r in ref]
                a, c = statistics.median(mine), statistics.median(theirs)
                lo, hi = ratio_interval(theirs, mine, n=bootstrap)
                e = {"steps": finite_or_none(a), "reference_steps": finite_or_none(c),
                     "ratio": a / c if math.isfinite(a) and math.isfinite(c) else None,
                     "interval": [lo, hi], "reached": sum(map(math.isfinite, mine)), "seeds": len(mine)}
                if method.expect is not None:
                    e["verdict"] = verdict(method.expect, a, c, lo, hi, study.same_within)
                out[m][str(b)][target_key(t)] = e
    return out


def _gn_against_baselines(study: StudyConfig, cells: dict[str, Any], reported_rows: dict[tuple[str, int], list[Row]],
                          bootstrap: int) -> dict[str, Any]:
    """Every GN method (controls aside) against the baselines: ``crossover[gn]["flops" | "time"]``
    (:func:`compute_crossover` on the primary target) and ``segments[gn][batch]``: the best baseline there (fewest
    steps to the primary target; None while ``pending`` names baselines whose seeds are still to come) and per
    segment ``from`` (None: the warm start), ``to``, ``baseline_steps``, ``steps`` and ``ratio`` = baseline / GN
    (:func:`segment_steps`). Both empty without baselines."""
    compared = [m for m in study.methods if m.control_of is None]
    baselines = [m.name for m in compared if m.family != "gn"]
    batches, primary = list(study.batch_tokens), study.primary_target
    crossover: dict[str, Any] = {}
    segments: dict[str, Any] = {}
    if not baselines:
        return {"crossover": crossover, "segments": segments}

    pending = pending_baselines(study, cells)

    def costs(m: str, measure: str) -> list[list[float]]:
        # a batch where a baseline's seeds are still to come is not compared yet: GN there counts as not run
        return [seed_costs(reported_rows.get((m, b), []), primary, measure)
                if m in baselines or str(b) not in pending else [] for b in batches]

    for gn in [m.name for m in compared if m.family == "gn"]:
        crossover[gn] = {name: compute_crossover(batches, costs(gn, measure), {m: costs(m, measure) for m in baselines},
                                                 n=bootstrap)
                         for name, measure in (("flops", "flops_interp"), ("time", "wall_time_interp"))}
        segments[gn] = {}
        for b in batches:
            if (gn, b) not in reported_rows:
                continue
            base, _ = best_baseline(cells, baselines, b, primary, pending=pending)
            own = segment_steps(reported_rows[gn, b], study.targets)
            theirs = segment_steps(reported_rows[base, b], study.targets) if base else [None] * len(own)
            segments[gn][str(b)] = {"baseline": base, "pending": pending.get(str(b), []), "segments": [
                {"from": start, "to": end, "baseline_steps": x, "steps": y, "ratio": x / y if x and y else None}
                for start, end, x, y in zip([None, *study.targets], study.targets, theirs, own)]}
    return {"crossover": crossover, "segments": segments}
