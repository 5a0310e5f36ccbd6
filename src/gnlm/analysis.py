"""Pure analysis of study results: rows and curves in, numbers out. Used by ``bench.py`` and ``report.py``.

Nothing here trains, writes or reads anything but the files named in its arguments.
"""

from __future__ import annotations

import json
import math
import random
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


def target_crossing(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """Where a run's eval curve first reaches ``target``: the integer step of the first evaluation at or below it
    (``step``) and the interpolated crossing (``step_interp``): linear in loss between the last evaluation above
    the target and the first at or below it. ``tokens``, ``flops`` and ``wall_time`` are interpolated the same
    way (``*_interp``) next to their values at the integer step. None when the target is never reached."""
    prev = None
    keys = ("step", "tokens", "flops", "forward_equivalents", "wall_time")
    for row in curve:
        loss = row.get("eval_loss")
        if loss is None or not math.isfinite(loss):
            continue
        if loss <= target:
            out = {k: row.get(k) for k in keys}
            t = 1.0 if prev is None else (prev["eval_loss"] - target) / (prev["eval_loss"] - loss)
            for k in keys:
                a, b = (prev or row).get(k), row.get(k)
                out[f"{k}_interp"] = None if a is None or b is None else a + t * (b - a)
            return out
        prev = row
    return None


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


def target_key(target: float) -> str:
    """How a target loss is written as a JSON key (rows' ``crossings``)."""
    return f"{target:g}"


def steps_to(row: dict[str, Any], target: float | None, interpolated: bool = True) -> float:
    """A study row's steps to ``target`` (interpolated crossing by default); inf when not reached, diverged or
    failed."""
    if target is None or row.get("status") == "error" or row.get("diverged"):
        return math.inf
    c = (row.get("crossings") or {}).get(target_key(target))
    if c is None:
        return math.inf
    v = c.get("step_interp" if interpolated else "step")
    return math.inf if v is None else float(v)


def selection_key(row: dict[str, Any], target: float | None) -> tuple[float, float]:
    """How learning rates are ranked: fewest (interpolated) steps to ``target``, ties to the lower final eval
    loss. A diverged or failed run ranks last; a run that never moved (every GN step skipped) keeps the warm
    start's loss, so any run that got lower ranks before it."""
    final = row.get("final_eval_loss")
    bad = row.get("status") == "error" or row.get("diverged") or final is None or not math.isfinite(final)
    return steps_to(row, target), math.inf if bad else float(final)


def next_lr(results: dict[float, dict[str, Any]], ratio: float, budget: int, target: float | None) -> float | None:
    """The learning-rate search of one method at one batch size (on the selection seed): while the best lr of
    ``results`` (lr → row, every lr tried so far) sits on an edge and fewer than ``budget`` lrs were tried, the
    next point beyond that edge (×``ratio`` above, ÷``ratio`` below). None when the search is done."""
    lrs = sorted(results)
    if len(lrs) >= budget:
        return None
    best = min(lrs, key=lambda lr: (*selection_key(results[lr], target), lr))
    if best == lrs[-1]:
        return lrs[-1] * ratio
    if best == lrs[0]:
        return lrs[0] / ratio
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
    best_eval_loss: float = math.inf  # the lowest eval loss a run reached on its way (median over seeds)
    all_skipped: bool = False  # every seed skipped every step it took (GN: no line-search step size helped)

    @property
    def reached(self) -> bool:
        return math.isfinite(self.steps)


def all_steps_skipped(row: dict[str, Any]) -> bool:
    """A run whose every step was skipped (GN, η = 0 each time): it never moved from its starting point."""
    skipped, ran = row.get("skipped_steps") or 0, row.get("steps_run") or 0
    return ran > 0 and skipped >= ran


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
                            final_eval_loss=final, diverged_seeds=sum(bool(r.get("diverged")) for r in rs), rows=rs,
                            best_eval_loss=_median([r.get("best_eval_loss") for r in rs]),
                            all_skipped=all(all_steps_skipped(r) for r in rs)))
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
    eval loss, then the smaller learning rate. A learning rate whose runs skipped every step (they never moved, so
    they keep their starting loss) is never chosen over one whose runs reached a lower loss on their way.
    ``edge`` is "low"/"high" when the winner is the smallest/largest lr of a grid of two or more (the grid must
    grow that way), "single" for a one-point grid."""
    if not results:
        raise ValueError("best_lr needs at least one result")

    def key(r: LrResult) -> tuple:
        return (r.final_eval_loss, r.lr) if kind == "budget" else (r.steps, r.final_eval_loss, r.lr)

    best = min(results, key=key)
    if best.all_skipped:
        moved = [r for r in results if not r.all_skipped and r.best_eval_loss < best.final_eval_loss]
        best = min(moved, key=key) if moved else best
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
    method never reached the target; "one_batch" (batch None) when only one batch size was measured."""
    order = sorted(range(len(batches)), key=lambda k: batches[k])
    bs = [float(batches[k]) for k in order]
    ss = [float(steps[k]) if steps[k] is not None else math.inf for k in order]
    reductions = {bs[i]: doubling_reduction(bs, ss, i) for i in range(len(bs) - 1)}
    if not any(math.isfinite(s) for s in ss):
        return {"batch": None, "bound": "none", "reductions": reductions}
    if len(bs) < 2:  # one point says nothing about how steps change with the batch
        return {"batch": None, "bound": "one_batch", "reductions": reductions}
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


# ------------------------------------------------------------------------------------------ declared-target studies


def _median_or_none(values: list[float]) -> float | None:
    if not values:
        return None
    m = statistics.median(values)
    return m if math.isfinite(m) else None


def select_lr(rows: list[dict[str, Any]], target: float | None) -> tuple[float, int, str | None]:
    """The selected lr of one method at one batch size from its selection rows: (lr, trials, edge).

    Ranked by the median over the rows' seeds of :func:`selection_key` (one seed: that seed's own key); ``edge`` is
    "low"/"high" when the winner is the smallest/largest lr tried (of two or more), "single" for one lr."""
    by_lr: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_lr[float(r["lr"])].append(r)

    def key(lr: float) -> tuple[float, float, float]:
        keys = [selection_key(r, target) for r in by_lr[lr]]
        return statistics.median(k[0] for k in keys), statistics.median(k[1] for k in keys), lr

    lrs = sorted(by_lr)
    best = min(lrs, key=key)
    edge = "single" if len(lrs) == 1 else "low" if best == lrs[0] else "high" if best == lrs[-1] else None
    return best, len(lrs), edge


DEFAULT_LS_RANGE = 5  # runconfig.GNConfig.ls_range (a test keeps them equal; this module imports no model code)


def ls_range_of(study: dict[str, Any], method: str) -> int:
    """The line search's ``gn.ls_range`` of a study's method (its override, else the study's base, else the
    default); rows written since it was recorded carry their own."""
    m = next(x for x in study["methods"] if x["name"] == method)
    base = (study.get("base") or {}).get("gn") or {}
    return int((m.get("overrides") or {}).get("gn.ls_range", base.get("ls_range", DEFAULT_LS_RANGE)))


def eta_at_floor(rows: list[dict[str, Any]], ls_range: int) -> float | None:
    """The share of GN outer steps, over ``rows``, whose line search chose its smallest step size (1/√2)^(range−1):
    near 1, the range binds (the step wanted to be shorter still; a larger ``gn.ls_range`` lets it). None without
    recorded η (or with the skip option's η = 0 only)."""
    at_floor = []
    for r in rows:
        floor = 2.0 ** (-(int(r.get("ls_range") or ls_range) - 1) / 2)
        at_floor += [abs(e - floor) <= 1e-9 * floor for e in r.get("etas") or [] if e > 0]
    return sum(at_floor) / len(at_floor) if at_floor else None


EARLY_STEPS = 10


def early_rise(row: dict[str, Any], steps: int = EARLY_STEPS) -> float | None:
    """How far a run's eval loss rose above where it started within its first ``steps`` steps (the restart spike
    of a fresh optimizer on a warm start; ≤ 0 when it only fell). None without a logged curve."""
    curve = row.get("curve") or {}
    pts = [(s, v) for s, v in zip(curve.get("step") or [], curve.get("eval_loss") or [])
           if v is not None and math.isfinite(v)]
    early = [v for s, v in pts[1:] if s <= steps]
    if not pts or pts[0][0] != 0 or not early:
        return None
    return max(early) - pts[0][1]


def summarize_study(study: dict[str, Any], rows: list[dict[str, Any]], bootstrap: int = 1000) -> dict[str, Any]:
    """The machine-readable summary of a steps-to-target study (``summary.json``), from the study dict and the rows
    of runs.jsonl alone.

    Per method and batch size: the selected lr (on ``selection_seed`` when the study has one, else by the median
    over seeds), the trials used and whether the selected lr is on an edge; then, per declared target, from the
    reported rows (``seeds`` at the selected lr): median integer and interpolated steps, seeds that reached it,
    median FLOPs and wall time to it (interpolated), and GN's skipped steps and inner steps N. Per method: the fit
    S(B) = S_min(1 + B_crit/B) on the primary target with a bootstrap interval over seeds (None, with the reason,
    below 4 batch sizes reached)."""
    targets = [float(t) for t in study.get("targets") or []]
    primary = study.get("primary_target")
    sel_seed = study.get("selection_seed")
    seeds = list(study.get("seeds") or [])
    finished = [r for r in rows if r.get("status") != "error"]
    controls = {m["name"]: m["control_of"] for m in study["methods"] if m.get("control_of")}
    cells: dict[str, dict[str, Any]] = {}
    fits: dict[str, Any] = {}
    for m in [m["name"] for m in study["methods"]]:
        per_batch_steps: list[tuple[int, list[float]]] = []
        for b in sorted(study["batch_tokens"]):
            rs = [r for r in finished if r["method"] == m and r["batch_tokens"] == b]
            own_selection = sel_seed is not None and m not in controls  # a control runs at another's lr
            sel_rows = [r for r in rs if r["seed"] == sel_seed] if own_selection else rs
            if not sel_rows:
                continue
            lr, trials, edge = select_lr(sel_rows, primary)
            reported = [r for r in rs if float(r["lr"]) == lr and (not own_selection or r["seed"] in seeds)]
            cell: dict[str, Any] = {"best_lr": lr, "lr_on_edge": edge is not None and edge != "single",
                                    "control_of": controls.get(m),
                                    "edge": edge, "trials": trials, "seeds": len(reported), "per_target": {}}
            rises = [early_rise(r) for r in reported]
            cell["early_rise"] = _median_or_none([x for x in rises if x is not None])
            if reported and reported[0].get("family") == "gn":
                cell["inner_steps"] = reported[0].get("inner_steps")
                cell["skipped_steps"] = _median_or_none([float(r.get("skipped_steps") or 0) for r in reported])
                cell["eta_at_floor"] = eta_at_floor(reported, ls_range_of(study, m))
            for t in targets:
                crossing = [(r.get("crossings") or {}).get(target_key(t)) for r in reported]
                ok = [c for c, r in zip(crossing, reported) if c is not None and not r.get("diverged")]
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
        reached = [(b, s) for b, s in per_batch_steps if math.isfinite(statistics.median(s))]
        if len(reached) >= MIN_FIT_BATCHES:
            fits[m] = bootstrap_fit([b for b, _ in reached], [s for _, s in reached], n=bootstrap)
        else:
            fits[m] = {"reason": f"the primary target was reached (median over seeds) at {len(reached)} batch "
                                 f"sizes; a fit needs >= {MIN_FIT_BATCHES}"}
        if len(per_batch_steps) > 1:  # the per-doubling saving on the medians, as a second view of the same points
            bs, medians = [b for b, _ in per_batch_steps], [statistics.median(s) for _, s in per_batch_steps]
            saving = [doubling_reduction(bs, medians, i) for i in range(len(bs) - 1)]
            # a saving needs S(B) itself: from a batch that did not reach the target it is unknown
            fits[m]["per_doubling"] = {str(int(b)): (v if math.isfinite(v) and math.isfinite(s) else None)
                                       for b, s, v in zip(bs, medians, saving)}
    return {"name": study.get("name"), "targets": targets, "primary_target": primary,
            "batch_tokens": sorted(study["batch_tokens"]), "lr_budget": study.get("lr_budget"),
            "selection_seed": sel_seed, "seeds": seeds, "cells": cells, "fit": fits,
            "failed_runs": sum(r.get("status") == "error" for r in rows)}
