"""The statistics of a batch-size study, on plain numbers: the fit S(B) = S_min(1 + B_crit/B) with both
critical-batch definitions (McCandlish's B_crit = b/a, Zhang et al.'s CBS) and their intervals over seeds, over batch
sizes and leaving one batch size out; the saving per doubling of the batch; the crossover batch from which one cost
falls below another's, with a bootstrap interval over seeds; bootstrap ratio intervals, rank correlation and the
verdict on a published claim. ``analysis.py`` applies them to a study's rows.

Nothing here knows a study, a run or a file.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from itertools import pairwise
from typing import Any


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


def fit_steps_vs_batch(batches: list[float], steps: list[float], min_batches: int = MIN_FIT_BATCHES) -> StepsFit:
    """Least squares on log S of S(B) = S_min·(1 + B_crit/B), B_crit ≥ 0 (in Zhang et al.'s notation
    S(B) = a + b/B with a = S_min, b/a = B_crit).

    For a fixed B_crit the best log S_min is the mean of log S − log(1 + B_crit/B) (closed form), so the fit is a
    one-dimensional search over log B_crit: a grid from 10⁻⁴·B_min to 10⁴·B_max, refined by golden section, plus
    B_crit = 0 (no gain from batch size at all). Needs at least ``min_batches`` batch sizes with finite steps (4;
    the leave-one-out refits of :func:`bootstrap_fit` take 3, the fewest that leave a two-parameter fit a
    residual)."""
    pts = [(float(b), float(s)) for b, s in zip(batches, steps) if s is not None and math.isfinite(s) and s > 0]
    if len(pts) < min_batches:
        raise ValueError(f"fitting S(B) = S_min(1 + B_crit/B) needs steps at >= {min_batches} batch sizes, "
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


# Zhang et al. 2024: the critical batch is where the steps exceed perfect scaling from B_ref by this fraction
CBS_EXCESS = 0.2


def zhang_cbs(b_crit: float, b_ref: float) -> float:
    """The critical batch of Zhang et al. 2024 ("How Does Critical Batch Size Scale in Pre-training?") on the fit
    S(B) = a + b/B (a = S_min, b/a = B_crit): the batch at which the steps exceed perfect (linear) scaling from a
    reference batch B_ref by 20%. Perfect scaling from B_ref is S(B_ref)·B_ref/B, so

        a + b/B = 1.2·(a + b/B_ref)·B_ref/B  ⇔  a·B + b = 1.2·a·B_ref + 1.2·b  ⇔  B = 1.2·B_ref + 0.2·b/a,

    CBS = 0.2·B_crit + 1.2·B_ref (their notebook solves b − 5a·CBS + 5a·1.2·B_ref = 0). It is neither McCandlish's
    B_crit = b/a (where S = 2·S_min) nor the batch where a doubling saves less than 20% (1.5·b/a on the same curve).
    CBS increases with B_crit at a fixed B_ref, so interval ends of B_crit map to interval ends of CBS; an
    unbounded B_crit (inf) gives an unbounded CBS."""
    return CBS_EXCESS * b_crit + (1 + CBS_EXCESS) * b_ref


def _quantile(v: list[Any], p: float) -> Any:
    """The element of ``v`` at quantile ``p`` (nearest rank of the sorted list); None for an empty list."""
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, max(0, round(p * (len(v) - 1))))]


def ratio_interval(base: list[float], other: list[float], n: int = 1000, seed: int = 0,
                   level: float = 0.9) -> tuple[float | None, float | None]:
    """A ``level`` bootstrap interval of median(other) / median(base) over seeds (inf: not reached; a resample whose
    median is not finite is left out). (None, None) without data."""
    if not base or not other:
        return None, None
    rng, ratios = random.Random(seed), []
    for _ in range(n):
        a = statistics.median(rng.choices(base, k=len(base)))
        b = statistics.median(rng.choices(other, k=len(other)))
        if math.isfinite(a) and math.isfinite(b) and a > 0:
            ratios.append(b / a)
    if not ratios:
        return None, None
    q = (1 - level) / 2
    return _quantile(ratios, q), _quantile(ratios, 1 - q)


def rank_correlation(x: list[float], y: list[float], n: int = 1000, seed: int = 0,
                     level: float = 0.9) -> dict[str, Any]:
    """Spearman's rank correlation of paired values (``scipy.stats.spearmanr``; ties get average ranks) with a
    ``level`` bootstrap interval over the pairs (a resample in which x or y is constant has no correlation and is
    left out). ``{"spearman", "interval": [lo, hi], "n"}``; None where fewer than 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    def rho(xs: list[float], ys: list[float]) -> float | None:
        if len(set(xs)) < 2 or len(set(ys)) < 2:
            return None
        return float(spearmanr(xs, ys).statistic)

    if len(x) != len(y):
        raise ValueError(f"rank_correlation: {len(x)} x values for {len(y)} y values")
    point = rho(list(x), list(y)) if len(x) >= 3 else None
    if point is None:
        return {"spearman": None, "interval": [None, None], "n": len(x)}
    rng, pairs, draws = random.Random(seed), list(zip(x, y)), []
    for _ in range(n):
        sample = rng.choices(pairs, k=len(pairs))
        r = rho([a for a, _ in sample], [b for _, b in sample])
        if r is not None:
            draws.append(r)
    q = (1 - level) / 2
    return {"spearman": point, "interval": [_quantile(draws, q), _quantile(draws, 1 - q)], "n": len(x)}


def finite_or_none(v: float | None) -> float | None:
    """JSON has no infinity: an unbounded value (or interval end) is written as None."""
    return v if v is None or math.isfinite(v) else None


def _b_crit_or_inf(fit: StepsFit) -> float:
    return math.inf if fit.unbounded else fit.b_crit


def residual_bootstrap(batches: list[float], steps: list[float], fit: StepsFit, n: int = 1000,
                       seed: int = 0) -> list[float]:
    """B_crit of ``n`` refits to the fitted curve plus log residuals resampled across batch sizes: with
    rᵢ = log Sᵢ − log Ŝ(Bᵢ), each resample fits log S*ᵢ = log Ŝ(Bᵢ) + c·r_J, J uniform over the k batch sizes
    (with replacement), c = √(k/(k − 2)) (the residuals of a two-parameter least-squares fit are smaller than the
    noise by about that factor; they have mean 0, since log S_min is their mean). It asks how far B_crit moves if
    the scatter of the points around the curve were drawn again: the spread that resampling seeds at every batch
    cannot see. inf: an unbounded refit."""
    residuals = [math.log(s) - math.log(fit.steps(b)) for b, s in zip(batches, steps)]
    scale = math.sqrt(len(batches) / (len(batches) - 2))
    rng = random.Random(f"{seed}/residuals")  # its own stream: the seed bootstrap's resamples stay as they were
    out = []
    for _ in range(n):
        drawn = [fit.steps(b) * math.exp(scale * rng.choice(residuals)) for b in batches]
        out.append(_b_crit_or_inf(fit_steps_vs_batch(batches, drawn)))
    return out


def jackknife_fits(batches: list[float], steps: list[float]) -> dict[float, StepsFit]:
    """The fit with each batch size left out in turn (refitted on the other k − 1 ≥ 3): how much one batch size
    carries the critical batch."""
    return {b: fit_steps_vs_batch(batches[:i] + batches[i + 1:], steps[:i] + steps[i + 1:],
                                  min_batches=MIN_FIT_BATCHES - 1) for i, b in enumerate(batches)}


def bootstrap_fit(batches: list[float], steps_by_seed: list[list[float]], n: int = 1000, seed: int = 0,
                  level: float = 0.9) -> dict[str, Any]:
    """The fit of the median steps over seeds, both critical batches, and their intervals.

    ``steps_by_seed[i]`` are the steps of every seed at ``batches[i]`` (inf: not reached). Keys:
    ``s_min``, ``b_crit`` (McCandlish's B_crit = b/a), ``cbs`` (Zhang et al.'s CBS = 0.2·b/a + 1.2·B_ref,
    :func:`zhang_cbs`, with B_ref = ``cbs_reference_batch``, the smallest batch the fit used), each with three
    intervals, all on the same fixed B_ref:

    * over seeds (``b_crit_lo``/``hi``, ``cbs_lo``/``hi``; ``level``): each of ``n`` resamples draws, at every
      batch size, as many seeds as measured (with replacement) and refits the medians;
    * over batch sizes (``b_crit_residual_lo``/``hi``, ``cbs_residual_lo``/``hi``): :func:`residual_bootstrap`;
    * leaving one batch size out (``b_crit_jackknife_min``/``max``, ``cbs_jackknife_min``/``max``, and per left-out
      batch ``jackknife``): :func:`jackknife_fits`.

    A fit whose steps fall like 1/B over the whole range has ``b_crit_unbounded`` (and ``cbs_unbounded``) true and
    ``b_crit``/``cbs`` None: S(B) ≈ ``steps_times_batch``/B, S_min → 0, only a lower bound on either. None as the
    upper end of an interval (or a jackknife value) means unbounded too."""
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
        b_crits.append(_b_crit_or_inf(f))
        s_mins.append(f.s_min)
    q = (1 - level) / 2
    used = sorted((float(b), s) for b, s in zip(batches, medians) if math.isfinite(s) and s > 0)
    used_b, used_s = [b for b, _ in used], [s for _, s in used]
    b_ref = used_b[0]
    by_residuals = residual_bootstrap(used_b, used_s, fit, n=n, seed=seed)
    left_out = {b: _b_crit_or_inf(f) for b, f in jackknife_fits(used_b, used_s).items()}

    def cbs(b_crit: float | None) -> float | None:  # None (no value, or unbounded) stays None
        return None if b_crit is None else finite_or_none(zhang_cbs(b_crit, b_ref))

    out = {"s_min": fit.s_min, "b_crit": None if fit.unbounded else fit.b_crit, "residual": fit.residual,
           "in_range": fit.in_range, "b_crit_unbounded": fit.unbounded, "steps_times_batch": fit.s_min * fit.b_crit,
           "b_crit_lo": finite_or_none(_quantile(b_crits, q)), "b_crit_hi": finite_or_none(_quantile(b_crits, 1 - q)),
           "s_min_lo": _quantile(s_mins, q), "s_min_hi": _quantile(s_mins, 1 - q), "resamples": len(b_crits)}
    point = cbs(_b_crit_or_inf(fit))
    lo, hi = _quantile(b_crits, q), _quantile(b_crits, 1 - q)
    r_lo, r_hi = _quantile(by_residuals, q), _quantile(by_residuals, 1 - q)
    j_min, j_max = min(left_out.values()), max(left_out.values())
    out.update({
        "cbs": point, "cbs_reference_batch": b_ref, "cbs_unbounded": fit.unbounded,
        "cbs_in_range": point is not None and used_b[0] <= point <= used_b[-1], "cbs_lo": cbs(lo), "cbs_hi": cbs(hi),
        "b_crit_residual_lo": finite_or_none(r_lo), "b_crit_residual_hi": finite_or_none(r_hi),
        "cbs_residual_lo": cbs(r_lo), "cbs_residual_hi": cbs(r_hi), "residual_resamples": len(by_residuals),
        "b_crit_jackknife_min": finite_or_none(j_min), "b_crit_jackknife_max": finite_or_none(j_max),
        "cbs_jackknife_min": cbs(j_min), "cbs_jackknife_max": cbs(j_max),
        "jackknife": {str(int(b)): {"b_crit": finite_or_none(v), "cbs": cbs(v)} for b, v in left_out.items()},
    })
    return out


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


def median_or_inf(values: list[float]) -> float:
    return statistics.median(values) if values else math.inf


def crossover_batch(batches: list[float], ratios: list[float | None]) -> tuple[float | None, str]:
    """Where GN's cost first falls below the best baseline's: (batch, bound) from ``ratios``, the baseline's cost
    over GN's at each batch (None: not compared there). With ℓ = log ratio at the compared batches in order:

    * ``exact``: ℓ goes from ≤ 0 at B₀ to > 0 at the next compared batch B₁; linear in (log B, ℓ) in between,
      B* = B₀·(B₁/B₀)^(ℓ₀/(ℓ₀ − ℓ₁));
    * ``at_or_below``: GN is already cheaper at the smallest compared batch (returned);
    * ``above``: GN costs more at every compared batch (the largest returned: the crossover lies above it);
    * ``none``: no batch compared (None)."""
    pts = [(b, math.log(r)) for b, r in zip(batches, ratios) if r is not None]
    if not pts:
        return None, "none"
    if pts[0][1] > 0:
        return pts[0][0], "at_or_below"
    for (b0, l0), (b1, l1) in pairwise(pts):
        if l1 > 0:
            return b0 * (b1 / b0) ** (l0 / (l0 - l1)), "exact"
    return pts[-1][0], "above"


def compute_crossover(batches: list[float], gn: list[list[float]], baselines: dict[str, list[list[float]]],
                      n: int = 1000, seed: int = 0, level: float = 0.9) -> dict[str, Any]:
    """The batch from which a GN method's cost to the target falls below the best baseline's (:func:`crossover_batch`),
    with a ``level`` bootstrap interval over seeds.

    ``gn[i]``, ``baselines[m][i]``: the cost of every reported seed at ``batches[i]`` (inf: not reached; empty: not
    run). At each batch GN's median over seeds meets the cheapest baseline's median (the best baseline for this
    measure, which need not be the one with the fewest steps); a batch where either median is inf is not
    compared. Each resample draws, in every cell, as many seeds as measured (with replacement) and recomputes the
    crossover; ``lo``/``hi`` are quantiles of the resampled crossovers, ordered as batches with ``above`` last,
    each with its bound (``lo_bound``/``hi_bound``; ``none`` resamples left out). ``per_batch``: the best baseline
    and baseline / GN at each compared batch (above 1: GN cheaper)."""

    def ratios(gn_cost: list[float], base_cost: dict[str, list[float]]) -> tuple[list[float | None], list[str | None]]:
        out, names = [], []
        for i in range(len(batches)):
            name, cost = min(((m, c[i]) for m, c in base_cost.items()), key=lambda mc: mc[1], default=(None, math.inf))
            ok = math.isfinite(gn_cost[i]) and math.isfinite(cost) and gn_cost[i] > 0
            out.append(cost / gn_cost[i] if ok else None)
            names.append(name if ok else None)
        return out, names

    point, names = ratios([median_or_inf(v) for v in gn],
                          {m: [median_or_inf(v) for v in c] for m, c in baselines.items()})
    batch, bound = crossover_batch(batches, point)
    rng = random.Random(seed)

    def draw(v: list[float]) -> float:
        return statistics.median(rng.choices(v, k=len(v))) if v else math.inf

    draws = []  # (where it sorts, batch, bound): "above" after every batch
    for _ in range(n):
        b, bd = crossover_batch(batches, ratios([draw(v) for v in gn],
                                                {m: [draw(v) for v in c] for m, c in baselines.items()})[0])
        if bd != "none":
            draws.append((math.inf if bd == "above" else b, b, bd))
    q = (1 - level) / 2
    lo, hi = _quantile(draws, q) or (None, None, None), _quantile(draws, 1 - q) or (None, None, None)
    return {"batch": batch, "bound": bound, "lo": lo[1], "lo_bound": lo[2], "hi": hi[1], "hi_bound": hi[2],
            "resamples": len(draws),
            "per_batch": {str(int(b)): {"baseline": m, "baseline_over_gn": r}
                          for b, m, r in zip(batches, names, point) if r is not None}}


def verdict(expect: str, steps: float, reference_steps: float, lo: float | None, hi: float | None,
            same_within: float) -> str:
    """Does a measured ratio (median ``steps`` over median ``reference_steps``, inf: not reached, with its interval
    [lo, hi]) agree with a published claim that predicts ``more_steps``, ``fewer_steps`` or the ``same`` (ratio
    within [1/(1 + same_within), 1 + same_within])? ``agrees`` / ``disagrees`` when the whole interval says so,
    else ``not resolved``. A method whose median run did not reach the target where the reference's did counts as
    more steps (and the other way round); neither reaching it resolves nothing."""
    if not math.isfinite(steps) or not math.isfinite(reference_steps):
        if math.isfinite(steps) == math.isfinite(reference_steps):
            return "not resolved"
        measured = "more_steps" if math.isfinite(reference_steps) else "fewer_steps"
        return "agrees" if expect == measured else "disagrees"
    if lo is None or hi is None:
        return "not resolved"
    up, down = 1 + same_within, 1 / (1 + same_within)
    if expect == "same":
        return "agrees" if down <= lo and hi <= up else "disagrees" if lo > up or hi < down else "not resolved"
    more, fewer = lo > 1, hi < 1
    if expect == "fewer_steps":
        more, fewer = fewer, more
    return "agrees" if more else "disagrees" if fewer else "not resolved"
