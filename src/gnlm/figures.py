"""The figures of ``gnlm report`` and ``gnlm compare`` (matplotlib, Agg backend): loss curves, steps against batch
with the fitted S(B), final loss against batch (budget studies), the GN/baseline ratio by target depth, and the axes
and legend conventions they share (a log2 batch axis labelled 2K, 16K, 1M; plain labels on log axes; the legend
under the axes)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gnlm.analysis import best_baseline
from gnlm.results import target_key
from gnlm.study import StudyConfig

__all__ = ["fmt_batch", "plot_curves", "plot_final_loss", "plot_fit", "plot_ratio_vs_target", "pyplot",
           "save_with_legend_below", "steps_vs_batch_axes"]


def fmt_batch(b: float) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if b >= scale and b % scale == 0:
            return f"{b // scale:g}{unit}"
    return f"{b:,.0f}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axis(axis, lo: float, hi: float) -> None:
    """Ticks of a log axis labelled as plain numbers ("2", "50", not "2×10⁰"): 1-2-5 per decade (1-2-3-5 on a
    short range, every decade on a long one)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(max(hi, 1e-300) / max(lo, 1e-300))
    subs = (tuple(float(k) for k in range(1, 10)) if decades <= 1 else (1.0, 2.0, 3.0, 5.0) if decades <= 2
            else (1.0, 2.0, 5.0) if decades <= 3 else (1.0,))
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _batch_axis(ax, batches: list[int]) -> None:
    """A log2 batch-size axis with a tick at every measured batch, labelled 2K, 16K, 1M."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(batches))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_batch(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(batches) == 1:
        ax.set_xlim(batches[0] / 2, batches[0] * 2)


def steps_vs_batch_axes(ax, batches: list[int], ys: list[float]) -> None:
    """The axes of a steps-vs-batch figure: the batch axis, a log steps axis around ``ys`` with plain labels, a grid."""
    _batch_axis(ax, batches)
    ax.set_yscale("log")
    if ys:
        lo, hi = min(ys) / 1.4, max(ys) * 1.4
        ax.set_ylim(lo, hi)
        _plain_log_axis(ax.yaxis, lo, hi)
    ax.set_xlabel("batch size (tokens)")
    ax.grid(True, which="major", alpha=0.3)


def save_with_legend_below(fig, ax, path: Path) -> None:
    """Put the legend under the axes (where it hides no curve and no marker), write the figure and free it."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
                  frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_curves(path: Path, curves: list[tuple], batch: int, target: float | None, which: str) -> None:
    """Validation loss vs step of ``curves`` ((label, color, points, diverged) each). A curve that blows up (1e13)
    would squash every other curve into a line, so values far above where the curves start (more than twice the
    curves' range above the highest start) are clipped: drawn at the top edge with ▲ and the curve's largest value
    written beside it. The target line and every other value stay in view."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    values = [v for _, _, pts, _ in curves for _, v in pts]
    clip = None
    if values:
        starts = [pts[0][1] for _, _, pts, _ in curves] + ([target] if target is not None else [])
        lo, ref = min(values + starts), max(starts)
        span = max(ref - lo, 0.05 * abs(ref), 1e-3)
        wild = ref + 2 * span
        if max(values) > wild:  # a blow-up: clip just above the highest value that is not one
            clip = max([v for v in values if v <= wild] + [ref]) + 0.15 * span
            ax.set_ylim(lo - 0.05 * span, clip + 0.1 * span)
    peaks = []  # (step, value, color) of each clipped curve's largest value, written once the axes are final
    for label, color, pts, diverged in curves:
        xs = [s for s, _ in pts]
        ys = [min(v, clip) if clip is not None else v for _, v in pts]
        ax.plot(xs, ys, "-", marker=".", color=color, label=label)
        over = [(s, v) for s, v in pts if clip is not None and v > clip]
        if over:
            ax.plot([s for s, _ in over], [clip] * len(over), "^", color=color, ms=7)
            peaks.append((over[0][0], max(v for _, v in over), color))
        if diverged:
            ax.plot([xs[-1]], [ys[-1]], "x", color=color, ms=9, mew=2)
    if clip is not None:
        ax.axhline(clip, color="0.6", lw=0.8, label=f"▲ values above {clip:.3g} clipped")
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
    last = max((pts[-1][0] for _, _, pts, _ in curves), default=1)
    if last <= 100:  # short runs: a linear axis with integer ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=4))
    else:
        ax.set_xscale("symlog", linthresh=1)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlim(left=0)
    for step, peak, color in peaks:  # beside the ▲, on the side with room
        right = ax.transAxes.inverted().transform(ax.transData.transform((step, clip)))[0] > 0.6
        ax.annotate(f"max {peak:.3g}", (step, clip), textcoords="offset points", xytext=(-6 if right else 6, -12),
                    ha="right" if right else "left", fontsize=7, color=color)
    ax.set_xlabel("step (outer steps for GN)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Validation loss at batch {fmt_batch(batch)} tokens\n({which})")
    ax.grid(True, alpha=0.3)
    save_with_legend_below(fig, ax, path)


def plot_final_loss(path: Path, study: StudyConfig, summary: dict[str, Any]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    names = [m.name for m in study.methods if m.control_of is None]
    for i, m in enumerate(names):
        shift = 1.04 ** (i - (len(names) - 1) / 2)  # side by side at each batch, so the seeds' ranges do not overlap
        cells = [(b, summary["cells"].get(f"{m}/{b}", {})) for b in study.batch_tokens]
        pts = [(b * shift, c["final_eval_loss"], c.get("final_eval_loss_range")) for b, c in cells
               if c.get("final_eval_loss") is not None]
        if pts:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, "o-", color=f"C{i % 10}", label=m)
            spans = [(b, y, r) for b, y, r in pts if r]
            if spans:  # the seeds' range around each median
                ax.errorbar([s[0] for s in spans], [s[1] for s in spans], fmt="none", ecolor=f"C{i % 10}", capsize=3,
                            yerr=[[y - r[0] for _, y, r in spans], [r[1] - y for _, y, r in spans]])
    _batch_axis(ax, study.batch_tokens)
    ax.set_xlabel("batch size (tokens)")
    ax.set_ylabel("final validation loss (median, range over seeds)")
    ax.set_title("Final validation loss at a fixed token budget (selected lr per point)")
    ax.grid(True, which="both", alpha=0.3)
    save_with_legend_below(fig, ax, path)


def plot_fit(path: Path, study: StudyConfig, summary: dict[str, Any]) -> None:
    """Steps to the primary target against batch, each method's fit over the batches it was fitted to with its
    CBS (Zhang et al.) as a hollow diamond on the curve where it lies in that range, and a hollow triangle at the
    method's own step budget where its reported seeds ran but the median did not reach the target (not reached is
    not the same as not run)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    primary, batches = summary["primary_target"], summary["batch_tokens"]
    ys = []
    methods = [m for m in study.methods if m.control_of is None]  # controls have a table of their own
    for i, m in enumerate(methods):
        fit = summary["fit"].get(m.name, {})
        cells = [summary["cells"].get(f"{m.name}/{b}") for b in batches]
        pts = [(b, c["per_target"][target_key(primary)]["steps_interp"]) for b, c in zip(batches, cells) if c]
        missed = [b for b, c in zip(batches, cells)
                  if c and c["seeds"] and c["per_target"][target_key(primary)]["steps_interp"] is None]
        pts = [(b, s) for b, s in pts if s is not None]
        budgets = {b: study.step_budget(m, b) for b in batches}
        if missed:  # side by side, not on top of each other: shifted a little along the (log2) batch axis
            shift = 2.0 ** (0.06 * (i - (len(methods) - 1) / 2))
            ax.plot([b * shift for b in missed], [budgets[b] for b in missed], "^", mfc="none", mew=1.5, ms=8,
                    color=f"C{i % 10}", label=f"{m.name}: not reached in its step budget")
            ys += [budgets[b] for b in missed]
        if not pts:
            continue
        ys += [s for _, s in pts]
        ax.plot([b for b, _ in pts], [s for _, s in pts], "o", color=f"C{i % 10}", label=m.name)
        if "s_min" in fit:
            lo, hi = pts[0][0], pts[-1][0]  # drawn over the batches it was fitted to
            grid = [lo * (hi / lo) ** (k / 60) for k in range(61)]
            if fit.get("b_crit_unbounded"):
                curve, label = [fit["steps_times_batch"] / b for b in grid], f"{m.name}: fit, S ∝ 1/B (B_crit unbounded)"
            else:
                curve = [fit["s_min"] * (1 + fit["b_crit"] / b) for b in grid]
                label = f"{m.name}: fit, B_crit {fit['b_crit']:,.0f}, CBS {fit['cbs']:,.0f}"
            ax.plot(grid, curve, "-", color=f"C{i % 10}", lw=1, alpha=0.8, label=label)
            if fit.get("cbs") is not None and lo <= fit["cbs"] <= hi:
                ax.plot([fit["cbs"]], [fit["s_min"] * (1 + fit["b_crit"] / fit["cbs"])], "D", mfc="none", mew=1.5,
                        ms=7, color=f"C{i % 10}")
    steps_vs_batch_axes(ax, batches, ys)
    ax.set_ylabel(f"steps to {primary:g} (interpolated; median over seeds)")
    ax.set_title("Steps vs batch with S(B) = S_min(1 + B_crit/B)\n(◇ = CBS, Zhang et al.; △ = not reached)")
    save_with_legend_below(fig, ax, path)


def plot_ratio_vs_target(path: Path, summary: dict[str, Any], baselines: list[str], gn: str) -> None:
    """Best baseline steps / ``gn`` steps against target depth, one line per batch size; a cross on the parity line
    where ``gn`` did not reach a target."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    targets = summary["targets"]
    for i, b in enumerate(summary["batch_tokens"]):
        pts = []
        for t in targets:
            g = summary["cells"].get(f"{gn}/{b}", {}).get("per_target", {}).get(target_key(t), {}).get("steps_interp")
            _, base = best_baseline(summary["cells"], baselines, b, t, pending=summary.get("pending_baselines", {}))
            if g and math.isfinite(base):
                pts.append((t, base / g))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i % 10}", label=f"batch {fmt_batch(b)}")
        ran = summary["cells"].get(f"{gn}/{b}", {}).get("seeds")
        missed = [t for t in targets if ran and summary["cells"][f"{gn}/{b}"]["per_target"][target_key(t)]
                  ["steps_interp"] is None]
        if missed:  # GN did not reach these targets at this batch: no ratio, a cross on the parity line
            ax.plot(missed, [1.0] * len(missed), "x", color=f"C{i % 10}", ms=8, mew=2,
                    label=f"batch {fmt_batch(b)}: {gn} did not reach")
    ax.axhline(1.0, color="k", lw=0.8, label="parity (no saving)")
    ax.axvline(summary["primary_target"], color="0.5", ls=":", lw=1, label="primary target")
    ax.invert_xaxis()
    ax.set_xlabel("target validation loss (deeper →)")
    ax.set_ylabel(f"best baseline steps / {gn} steps (interpolated)")
    ax.set_title("How many times fewer steps GN needs, by target depth")
    ax.grid(True, alpha=0.3)
    save_with_legend_below(fig, ax, path)
