"""``gnlm report RESULTS_DIR``: a Markdown report and PNG figures from a study's results files (never trains).

Reads ``study.yaml``, ``runs.jsonl``, the warm start's ``summary.json`` and each best run's ``metrics.jsonl``;
writes ``report.md`` and the figures beside them:

* ``steps_vs_batch.png``: steps to the target vs batch size, log-log, one line per method (the paper's key figure;
  hollow triangles mark "not reached within max_steps" at the step budget),
* ``curves_largest_batch.png``: validation loss vs step at the largest batch, best learning rate per method,
* ``final_loss_vs_batch.png`` (budget studies): final validation loss vs batch size,
* ``steps_vs_batch_fit.png``: interpolated steps to the primary target with the fitted S(B) = S_min(1 + B_crit/B),
* ``ratio_vs_target.png``: best baseline / full GN steps against target depth, one line per batch size,
* ``summary.json``: every number of the declared-target sections, machine-readable (``analysis.summarize_study``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from gnlm.analysis import (
    EARLY_STEPS,
    Best,
    all_steps_skipped,
    eval_curve,
    read_rows,
    summarize,
    summarize_study,
    target_key,
)
from gnlm.config import ConfigError, dumps_json

BASELINE_FAMILY = "baseline"
# The fields of a runs.jsonl row that the report cannot do without.
REQUIRED_ROW_FIELDS = ("run_id", "method", "batch_tokens", "lr", "seed", "run_dir")
DIVERGENCE_RULE = ("a run is diverged when its training or eval loss is non-finite, exceeds max(initial eval loss, "
                   "ln V) + train.divergence_margin, or returns to within train.collapse_tolerance of ln V (the "
                   "uniform predictor) after having been below it")


def _fmt_int(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:,.0f}"


def _fmt_sci(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _fmt_time(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.1f}"


def _fmt_loss(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _fmt_batch(b: float) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if b >= scale and b % scale == 0:
            return f"{b // scale:g}{unit}"
    return f"{b:,.0f}"


def load_results(results_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    results_dir = Path(results_dir)
    study_path = results_dir / "study.yaml"
    if not study_path.exists():
        raise ConfigError(f"{results_dir} is not a gnlm results directory (no study.yaml); give the directory that "
                          f"gnlm bench wrote")
    study = yaml.safe_load(study_path.read_text()) or {}
    for key in ("methods", "batch_tokens"):
        if not isinstance(study, dict) or not isinstance(study.get(key), list) or not study[key]:
            raise ConfigError(f"{study_path} has no {key!r} list, so it is not a complete gnlm study; restore it (gnlm "
                              f"bench writes it) or run gnlm bench STUDY --results {results_dir} again")
    if not all(isinstance(m, dict) and m.get("name") for m in study["methods"]):
        raise ConfigError(f"{study_path}: every entry of 'methods' needs a name; restore the file gnlm bench wrote")
    rows = read_rows(results_dir / "runs.jsonl")
    for i, row in enumerate(rows, 1):
        missing = [k for k in REQUIRED_ROW_FIELDS if not isinstance(row, dict) or row.get(k) is None]
        if missing:
            rid = row.get("run_id") if isinstance(row, dict) else None
            raise ConfigError(f"{results_dir / 'runs.jsonl'}: row {i}{f' ({rid})' if rid else ''} lacks "
                              f"{', '.join(missing)}; restore that line or delete it (gnlm bench then runs that run "
                              f"again)")
    return study, rows


def ratio(num: float, den: float, num_capped: bool = False) -> str:
    """``num/den`` as "5.4×"; when ``num`` did not reach the target (``num_capped``: num is the step budget, a lower
    bound) the ratio is a lower bound "> 5.4×"."""
    if den is None or not math.isfinite(den) or den <= 0 or num is None:
        return "—"
    if num_capped:
        return f"> {num / den:.1f}×"
    if not math.isfinite(num):
        return "—"
    return f"{num / den:.1f}×"


def _reference_methods(study: dict[str, Any], families: dict[str, str]) -> tuple[str | None, str | None]:
    """The method compared against ('gn', else the first full-GN-type method) and the layerwise one."""
    types = {m["name"]: (m.get("type") or m["name"]) for m in study["methods"] if not m.get("optimizer")}
    gn = "gn" if types.get("gn") == "gn" else next((n for n, t in types.items() if t == "gn"), None)
    lw = "gn_layerwise" if types.get("gn_layerwise") == "gn_layerwise" else next(
        (n for n, t in types.items() if t == "gn_layerwise"), None)
    return gn, lw


def _families(study: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, str]:
    fam = {r["method"]: r.get("family", "") for r in rows}
    for m in study["methods"]:
        if m["name"] not in fam:
            t = m.get("type") or m["name"]
            fam[m["name"]] = "gn" if (t.startswith("gn") and not m.get("optimizer")) else BASELINE_FAMILY
    return fam


def _pyplot():
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
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_batch(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(batches) == 1:
        ax.set_xlim(batches[0] / 2, batches[0] * 2)


def _save_with_legend_below(fig, ax, path: Path) -> None:
    """Put the legend under the axes (where it hides no curve and no marker), write the figure and free it."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
                  frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def _plot_steps_vs_batch(path: Path, summary: dict[str, Any], max_steps: int) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    methods, all_steps = summary["methods"], [float(max_steps)]
    for i, m in enumerate(methods):
        color = f"C{i % 10}"
        pts = [(b, summary["best"][(m, b)].result.steps) for b in summary["batches"] if (m, b) in summary["best"]]
        reached = [(b, s) for b, s in pts if math.isfinite(s)]
        missed = [b for b, s in pts if not math.isfinite(s)]
        if reached:
            ax.plot([p[0] for p in reached], [p[1] for p in reached], "o-", color=color, label=m)
            all_steps += [p[1] for p in reached]
        if missed:
            # side by side, not on top of each other: each method's triangles are shifted a little along the
            # (log2) batch axis, and named in the legend
            shift = 2.0 ** (0.08 * (i - (len(methods) - 1) / 2))
            ax.plot([b * shift for b in missed], [max_steps] * len(missed), "^", mfc="none", mew=1.5, ms=8,
                    color=color, label=f"{m}: not reached")
    ax.axhline(max_steps, color="0.5", ls=":", lw=1, label=f"step budget ({max_steps})")
    _batch_axis(ax, summary["batches"])
    ax.set_yscale("log")
    lo, hi = max(min(all_steps) / 1.4, 0.5), max(all_steps) * 1.4
    ax.set_ylim(lo, hi)
    _plain_log_axis(ax.yaxis, lo, hi)
    ax.set_xlabel("batch size (tokens)")
    ax.set_ylabel("steps to target (outer steps for GN)")
    ax.set_title("Steps to target vs batch size (best lr per point; △ = not reached)")
    ax.grid(True, which="major", alpha=0.3)
    _save_with_legend_below(fig, ax, path)


def _row_curve(results_dir: Path, row: dict[str, Any]) -> list[tuple[int, float]]:
    """A run's finite (step, eval loss) points: from its row (studies keep the curve) or its metrics file."""
    if row.get("curve"):
        steps, losses = row["curve"]["step"], row["curve"]["eval_loss"]
    else:
        steps, losses = eval_curve(read_rows(results_dir / row["run_dir"] / "metrics.jsonl"))
    return [(s, v) for s, v in zip(steps, losses) if isinstance(v, (int, float)) and math.isfinite(v)]


def _curve_entry(results_dir: Path, i: int, method: str, lr: float, run: dict[str, Any]) -> tuple | None:
    pts = _row_curve(results_dir, run)
    if not pts:
        return None
    note = " — diverged" if run.get("diverged") else " — every step skipped" if all_steps_skipped(run) else ""
    return f"{method} (lr {lr:.3g}){note}", f"C{i % 10}", pts, bool(run.get("diverged"))


def _best_lr_curves(results_dir: Path, summary: dict[str, Any], batch: int) -> list[tuple]:
    """Per method, the lowest seed of its best lr at ``batch`` (studies without a selection seed)."""
    curves = []
    for i, m in enumerate(summary["methods"]):
        best = summary["best"].get((m, batch))
        if best is not None:
            curves.append(_curve_entry(results_dir, i, m, best.lr, min(best.result.rows, key=lambda r: r["seed"])))
    return [c for c in curves if c is not None]


def _selected_lr_curves(results_dir: Path, study: dict[str, Any], rows: list[dict[str, Any]],
                        cells: dict[str, Any], batch: int) -> list[tuple]:
    """Per method (controls aside), the lowest reported seed at its selected lr at ``batch``."""
    curves = []
    for i, m in enumerate(m["name"] for m in study["methods"] if not m.get("control_of")):
        cell = cells.get(f"{m}/{batch}")
        runs = [r for r in rows if cell and r["method"] == m and r["batch_tokens"] == batch
                and float(r["lr"]) == cell["best_lr"] and r["seed"] in (study.get("seeds") or [])]
        if runs:
            curves.append(_curve_entry(results_dir, i, m, cell["best_lr"], min(runs, key=lambda r: r["seed"])))
    return [c for c in curves if c is not None]


def _plot_curves(path: Path, curves: list[tuple], batch: int, target: float | None, which: str) -> None:
    """Validation loss vs step of ``curves`` ((label, color, points, diverged) each). A curve that blows up (1e13)
    would squash every other curve into a line, so values far above where the curves start (more than twice the
    curves' range above the highest start) are clipped: drawn at the top edge with ▲ and the curve's largest value
    written beside it. The target line and every other value stay in view."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plt = _pyplot()
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
    ax.set_title(f"Validation loss at batch {_fmt_batch(batch)} tokens\n({which})")
    ax.grid(True, alpha=0.3)
    _save_with_legend_below(fig, ax, path)


def _plot_final_loss(path: Path, summary: dict[str, Any]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, m in enumerate(summary["methods"]):
        pts = [(b, summary["best"][(m, b)].result.final_eval_loss) for b in summary["batches"]
               if (m, b) in summary["best"]]
        pts = [p for p in pts if math.isfinite(p[1])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i % 10}", label=m)
    _batch_axis(ax, summary["batches"])
    ax.set_xlabel("batch size (tokens)")
    ax.set_ylabel("final validation loss")
    ax.set_title("Final validation loss at a fixed token budget (best lr per point)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _batch_table(summary: dict[str, Any], batch: int, kind: str) -> list[str]:
    lines = []
    if kind == "budget":
        lines += ["| method | best lr | steps | tokens | final eval loss | time (s) |", "|---|---|---|---|---|---|"]
    else:
        lines += ["| method | best lr | steps | tokens (line search) | forward-equiv. | time (s) | reached | "
                  "final eval loss |", "|---|---|---|---|---|---|---|---|"]
    for m in summary["methods"]:
        best: Best | None = summary["best"].get((m, batch))
        if best is None:
            continue
        r = best.result
        lr = f"{r.lr:g}" + (" ⚠" if best.edge else "") + (" (every step skipped)" if r.all_skipped else "")
        if kind == "budget":
            run = min(r.rows, key=lambda x: x["seed"])
            lines.append(f"| {m} | {lr} | {_fmt_int(run.get('steps_run'))} | {_fmt_int(run.get('tokens_run'))} | "
                         f"{_fmt_loss(r.final_eval_loss)} | {_fmt_time(run.get('total_wall_time'))} |")
            continue
        if r.reached:
            toks = _fmt_int(r.tokens) + (f" ({_fmt_int(r.line_search_tokens)})" if r.line_search_tokens else "")
            cells = [_fmt_int(r.steps), toks, _fmt_sci(r.forward_equivalents), _fmt_time(r.wall_time)]
        else:
            cells = ["not reached", "—", "—", "—"]
        lines.append(f"| {m} | {lr} | " + " | ".join(cells) +
                     f" | {r.reached_seeds}/{r.seeds} | {_fmt_loss(r.final_eval_loss)} |")
    return lines


def _ratio_lines(summary: dict[str, Any], batch: int, gn: str | None, lw: str | None,
                 families: dict[str, str], max_steps: int) -> list[str]:
    best = summary["best"]
    if gn is None or (gn, batch) not in best or not best[(gn, batch)].result.reached:
        return [f"- {gn or 'GN'} did not reach the target at this batch: no ratios."] if gn else []
    g = best[(gn, batch)].result
    out = []
    baselines = [best[(m, batch)].result for m in summary["methods"]
                 if families.get(m) == BASELINE_FAMILY and (m, batch) in best]
    if baselines:
        reached = [r for r in baselines if r.reached]
        if reached:
            b = min(reached, key=lambda r: r.steps)
            out.append(f"- best baseline ({b.method}) / {gn}: steps {ratio(b.steps, g.steps)}, tokens "
                       f"{ratio(b.tokens, g.tokens)}, forward-equivalents {ratio(b.forward_equivalents, g.forward_equivalents)}, "
                       f"time {ratio(b.wall_time, g.wall_time)}")
        else:
            out.append(f"- no baseline reached the target within {max_steps} steps: best baseline / {gn} steps "
                       f"{ratio(max_steps, g.steps, num_capped=True)}")
    if lw is not None and (lw, batch) in best:
        w = best[(lw, batch)].result
        if w.reached:
            out.append(f"- {lw} / {gn}: steps {ratio(w.steps, g.steps)}, tokens {ratio(w.tokens, g.tokens)}, "
                       f"forward-equivalents {ratio(w.forward_equivalents, g.forward_equivalents)}, "
                       f"time {ratio(w.wall_time, g.wall_time)}")
        else:
            out.append(f"- {lw} / {gn}: steps {ratio(max_steps, g.steps, num_capped=True)} ({lw} did not reach the "
                       f"target within {max_steps} steps)")
    return out


def _critical_lines(summary: dict[str, Any], fraction: float) -> list[str]:
    batches = summary["batches"]
    if len(batches) < 2:
        return [f"Not estimated: the critical batch size needs steps to target at two or more batch sizes, and this "
                f"study measured one ({_fmt_batch(batches[0])} tokens)."]
    lines = [f"The critical batch size of a method is the smallest measured batch B from which on every doubling of "
             f"the batch saves less than {fraction:.0%} of the steps to target (saving at B = 1 − S(2B)/S(B), S "
             f"interpolated geometrically between measured batches; at the end of the grid the span up to the largest "
             f"batch is scaled to one doubling).", "",
             "| method | critical batch (tokens) | " + " | ".join(f"saving at {_fmt_batch(b)}" for b in batches[:-1]) + " |",
             "|---|---|" + "---|" * (len(batches) - 1)]
    for m in summary["methods"]:
        c = summary["critical"].get(m)
        if c is None:
            continue
        if c["bound"] == "none":
            crit = "target never reached"
        elif c["bound"] == "above":
            crit = f"> {_fmt_batch(batches[-1])} (still improving)"
        elif c["bound"] == "at_or_below":
            crit = f"≤ {_fmt_batch(c['batch'])}"
        else:
            crit = _fmt_batch(c["batch"])
        cells = []
        for b in batches[:-1]:
            r = c["reductions"].get(float(b))
            cells.append("—" if r is None or math.isnan(r) else ("−∞" if r == -math.inf else f"{r:.0%}"))
        lines.append(f"| {m} | {crit} | " + " | ".join(cells) + " |")
    return lines


def write_report(results_dir: str | Path) -> Path:
    """Write ``report.md`` and the figures into ``results_dir``; returns the report's path."""
    results_dir = Path(results_dir)
    study, rows = load_results(results_dir)
    kind = study.get("kind", "steps_to_target")
    summary = summarize(study, rows)
    families = _families(study, rows)
    max_steps = study.get("max_steps", 0)
    target = study.get("primary_target", study.get("target_loss"))
    batches = summary["batches"]
    gn, lw = _reference_methods(study, families)
    n_expected = sum(len(m.get("lrs_by_batch", {}).get(b, m.get("lrs", []))) for m in study["methods"]
                     for b in batches) * len(study.get("seeds", [0]))
    # A study that selects lrs on one seed and declares its targets is reported by _declared_target_sections alone
    # (the older sections judge every lr by its median over whatever seeds ran it).
    declared = kind != "budget" and bool(study.get("targets"))
    selection = declared and study.get("selection_seed") is not None
    study_summary = summarize_study(study, rows) if declared else {}

    md = [f"# gnlm study `{study.get('name', 'study')}`", ""]
    ws_summary = results_dir / "warm_start" / "summary.json"
    facts = [f"- kind: {kind}; batch sizes (tokens): {', '.join(f'{b:,}' for b in batches)}; "
             f"seeds: {study.get('seeds')}"
             + (f" (learning rates selected on seed {study['selection_seed']})" if selection else ""),
             f"- runs recorded: {len({r['run_id'] for r in rows})}"
             + (" (the learning-rate search plans its runs as results come in)" if selection else f" of {n_expected}")]
    if kind == "budget":
        facts.append(f"- token budget per run: {study.get('token_budget'):,} tokens (GN line-search tokens "
                     f"{'count' if study.get('count_line_search_tokens', True) else 'do not count'})")
    elif declared:
        budgets = sorted({(m.get("max_steps") or max_steps, families.get(m["name"]) == "gn")
                          for m in study["methods"]})
        facts.append(f"- declared targets: {', '.join(f'{t:g}' for t in study['targets'])} (primary {target:g}); "
                     f"step budget: " + ", ".join(f"{n} {'outer steps (GN)' if g else 'steps'}" for n, g in budgets))
    else:
        facts.append(f"- target validation loss: {target}; step budget: {max_steps} steps (outer steps for GN)")
    if ws_summary.exists():
        import json

        ws = json.loads(ws_summary.read_text())
        facts.append(f"- shared AdamW warm start: {ws.get('tokens', 0):,} tokens, {ws.get('step')} steps, "
                     f"validation loss {_fmt_loss(ws.get('final_eval_loss'))}")
    md += facts + [""]
    if not rows:
        md += ["No finished runs yet."]
        out = results_dir / "report.md"
        out.write_text("\n".join(md) + "\n")
        return out

    if kind == "budget":
        _plot_final_loss(results_dir / "final_loss_vs_batch.png", summary)
        md += ["## Final validation loss vs batch size", "", "![final loss vs batch](final_loss_vs_batch.png)", "",
               "| method | " + " | ".join(_fmt_batch(b) for b in batches) + " |",
               "|---|" + "---|" * len(batches)]
        for m in summary["methods"]:
            cells = [_fmt_loss(summary["best"][(m, b)].result.final_eval_loss) if (m, b) in summary["best"] else "—"
                     for b in batches]
            md.append(f"| {m} | " + " | ".join(cells) + " |")
        md.append("")
    elif selection:
        largest = batches[-1]
        _plot_curves(results_dir / "curves_largest_batch.png",
                     _selected_lr_curves(results_dir, study, rows, study_summary["cells"], largest), largest, target,
                     "selected lr per method, lowest reported seed")
        md += [f"## Loss curves at the largest batch ({largest:,} tokens)", "",
               "![loss curves at the largest batch](curves_largest_batch.png)", ""]
    else:
        _plot_steps_vs_batch(results_dir / "steps_vs_batch.png", summary, max_steps)
        md += ["## Steps to target vs batch size", "", "![steps to target vs batch](steps_vs_batch.png)", "",
               "| method | " + " | ".join(_fmt_batch(b) for b in batches) + " |", "|---|" + "---|" * len(batches)]
        for m in summary["methods"]:
            cells = []
            for b in batches:
                best = summary["best"].get((m, b))
                cells.append("—" if best is None else (_fmt_int(best.result.steps) if best.result.reached
                                                        else f"> {max_steps}"))
            md.append(f"| {m} | " + " | ".join(cells) + " |")
        md += ["", "## Critical batch size", ""] + _critical_lines(summary, study.get("critical_fraction", 0.2)) + [""]
        largest = batches[-1]
        _plot_curves(results_dir / "curves_largest_batch.png", _best_lr_curves(results_dir, summary, largest),
                     largest, target, "best lr per method")
        md += [f"## Loss curves at the largest batch ({largest:,} tokens)", "",
               "![loss curves at the largest batch](curves_largest_batch.png)", ""]

    if declared:
        md += _declared_target_sections(results_dir, study, study_summary, families)

    if not selection:
        md += ["## Per batch size", "",
               "Best learning rate per method (fewest steps to target; ties and no-reach go to the lowest final loss). "
               "Steps are outer steps for GN methods; tokens include GN line-search tokens (in parentheses); "
               "forward-equivalents count a backward as two forwards; time is the training wall time to the target "
               "(evaluation excluded). Medians over seeds. ⚠ = best lr on the edge of its grid.", ""]
        for b in batches:
            md += [f"### batch {b:,} tokens", ""] + _batch_table(summary, b, kind) + [""]
            if kind != "budget":
                md += _ratio_lines(summary, b, gn, lw, families, max_steps) + [""]

        md += ["## Learning-rate grid edges", ""]
        if summary["edges"]:
            md.append("The best learning rate sits on the edge of its grid for these points: the grid must grow in that "
                      "direction before the comparison is fair.")
            md.append("")
            for m, b, best in summary["edges"]:
                where = {"low": "smallest", "high": "largest", "single": "only"}[best.edge]
                md.append(f"- ⚠ {m} at batch {b:,}: best lr {best.lr:g} is the {where} value of "
                          f"{[float(f'{x:g}') for x in best.grid]}")
        else:
            md.append("Every best learning rate lies inside its grid.")
        md.append("")
    if summary["errors"]:
        md += ["## Failed runs", ""] + [f"- {r['run_id']}: {r.get('error')}" for r in summary["errors"]] + [""]
    diverged = [r for r in rows if r.get("diverged")]
    stuck = [r for r in rows if not r.get("diverged") and all_steps_skipped(r)]
    if diverged or stuck:
        md += ["## Diverged runs and runs that never moved", "", f"Divergence rule: {DIVERGENCE_RULE}. A diverged "
               f"run counts as not reached and is never a best learning rate unless every learning rate diverged. "
               f"A run whose every step was skipped (GN: no line-search step size lowered the loss) never moved from "
               f"its start; it is never the best learning rate over one that reached a lower loss.", ""]
        md += [f"- {r['run_id']}: diverged ({r.get('diverged_reason') or 'reason not recorded'}): {r.get('error')}"
               for r in diverged]
        md += [f"- {r['run_id']}: every one of its {r.get('steps_run')} steps was skipped; final eval loss "
               f"{_fmt_loss(r.get('final_eval_loss'))}" for r in stuck]
        md.append("")

    md += ["## All runs", "", "<details><summary>every run</summary>", "",
           "| run | reached | steps | tokens | time (s) | final eval loss | skipped steps | diverged |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["batch_tokens"], r["lr"], r["seed"])):
        skipped = f"{r.get('skipped_steps')}/{r.get('steps_run')}" if r.get("skipped_steps") else ""
        reached = "yes" if r.get("reached") else "no" + (" (lr search: stopped early)" if r.get("stopped_early") else "")
        md.append(f"| {r['run_id']} | {reached} | {_fmt_int(r.get('steps'))} | "
                  f"{_fmt_int(r.get('tokens'))} | {_fmt_time(r.get('wall_time'))} | "
                  f"{_fmt_loss(r.get('final_eval_loss'))} | {skipped} | "
                  f"{(r.get('diverged_reason') or 'yes') if r.get('diverged') else ''} |")
    md += ["", "</details>", ""]
    out = results_dir / "report.md"
    out.write_text("\n".join(md))
    return out


def _best_baseline(summary: dict[str, Any], families: dict[str, str], batch: int, target: float) -> tuple[str, float]:
    """The baseline with the fewest interpolated steps to ``target`` at ``batch`` (inf when none reached it)."""
    best = ("—", math.inf)
    for m, fam in families.items():
        cell = summary["cells"].get(f"{m}/{batch}")
        if fam != BASELINE_FAMILY or cell is None:
            continue
        s = cell["per_target"].get(target_key(target), {}).get("steps_interp")
        if s is not None and s < best[1]:
            best = (m, s)
    return best


def _headline_lines(summary: dict[str, Any], families: dict[str, str], gn: str) -> list[str]:
    """Per batch size, at the primary target: GN against the baseline with the fewest steps, in steps, FLOPs and
    measured time side by side (a step saving that costs more compute or time shows as a ratio below 1), and every
    other GN variant's steps against GN's."""
    primary = summary["primary_target"]
    key = target_key(primary)
    others = [m for m, f in families.items() if f == "gn" and m != gn]

    def point(m: str, b: int) -> dict[str, Any]:
        return summary["cells"].get(f"{m}/{b}", {}).get("per_target", {}).get(key) or {}

    def times(num: float | None, den: float | None) -> str:
        return f"{num / den:.2f}×" if num and den else "—"

    md = ["", f"### {gn} vs the best baseline at the primary target ({primary:g})", "",
          "Best baseline = the baseline with the fewest interpolated steps at that batch size. Ratios are baseline / "
          f"{gn} (above 1: {gn} needs less); medians over the reported seeds. "
          + (f"Last columns: steps of {', '.join(others)} / {gn} (above 1: slower than {gn})." if others else ""), "",
          f"| batch | {gn} steps | best baseline | its steps | steps ratio | FLOPs ratio | time ratio | "
          + "".join(f"{m} / {gn} | " for m in others), "|---|---|---|---|---|---|---|" + "---|" * len(others)]
    for b in summary["batch_tokens"]:
        g = point(gn, b)
        name, base_steps = _best_baseline(summary, families, b, primary)
        base = point(name, b) if math.isfinite(base_steps) else {}
        gs = g.get("steps_interp")
        ran = summary["cells"].get(f"{gn}/{b}", {}).get("seeds")
        cells = [f"{gs:.1f}" if gs else "not reached" if ran else "—", name if base else "none reached",
                 f"{base_steps:.1f}" if base else "—", times(base.get("steps_interp"), gs),
                 times(base.get("flops_to_target"), g.get("flops_to_target")),
                 times(base.get("time_to_target_s"), g.get("time_to_target_s"))]
        cells += [times(point(m, b).get("steps_interp"), gs) for m in others]
        md.append(f"| {_fmt_batch(b)} | " + " | ".join(cells) + " |")
    return md


def _plot_fit(path: Path, summary: dict[str, Any]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    primary, batches = summary["primary_target"], summary["batch_tokens"]
    ys = []
    controls = {c["method"] for c in summary["cells"].values() if c["control_of"]}  # they have a table of their own
    for i, (m, fit) in enumerate((m, f) for m, f in summary["fit"].items() if m not in controls):
        pts = [(b, summary["cells"].get(f"{m}/{b}", {}).get("per_target", {}).get(target_key(primary), {})
                .get("steps_interp")) for b in batches]
        pts = [(b, s) for b, s in pts if s is not None]
        if not pts:
            continue
        ys += [s for _, s in pts]
        ax.plot([b for b, _ in pts], [s for _, s in pts], "o", color=f"C{i % 10}", label=m)
        if "s_min" in fit:
            lo, hi = pts[0][0], pts[-1][0]  # drawn over the batches it was fitted to
            grid = [lo * (hi / lo) ** (k / 60) for k in range(61)]
            if fit.get("b_crit_unbounded"):
                curve, label = [fit["steps_times_batch"] / b for b in grid], f"{m}: fit, S ∝ 1/B (B_crit unbounded)"
            else:
                curve = [fit["s_min"] * (1 + fit["b_crit"] / b) for b in grid]
                label = f"{m}: fit, B_crit {fit['b_crit']:,.0f}"
            ax.plot(grid, curve, "-", color=f"C{i % 10}", lw=1, alpha=0.8, label=label)
    _batch_axis(ax, batches)
    ax.set_yscale("log")
    if ys:
        lo, hi = min(ys) / 1.4, max(ys) * 1.4
        ax.set_ylim(lo, hi)
        _plain_log_axis(ax.yaxis, lo, hi)
    ax.set_xlabel("batch size (tokens)")
    ax.set_ylabel(f"steps to {primary:g} (interpolated; median over seeds)")
    ax.set_title("Steps vs batch with S(B) = S_min(1 + B_crit/B)")
    ax.grid(True, which="major", alpha=0.3)
    _save_with_legend_below(fig, ax, path)


def _plot_ratio_vs_target(path: Path, summary: dict[str, Any], families: dict[str, str], gn: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    targets = summary["targets"]
    for i, b in enumerate(summary["batch_tokens"]):
        pts = []
        for t in targets:
            g = summary["cells"].get(f"{gn}/{b}", {}).get("per_target", {}).get(target_key(t), {}).get("steps_interp")
            _, base = _best_baseline(summary, families, b, t)
            if g and math.isfinite(base):
                pts.append((t, base / g))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i % 10}", label=f"batch {_fmt_batch(b)}")
    ax.axvline(summary["primary_target"], color="0.5", ls=":", lw=1, label="primary target")
    ax.invert_xaxis()
    ax.set_xlabel("target validation loss (deeper →)")
    ax.set_ylabel(f"best baseline steps / {gn} steps (interpolated)")
    ax.set_title("How many times fewer steps GN needs, by target depth")
    ax.grid(True, alpha=0.3)
    _save_with_legend_below(fig, ax, path)


def _declared_target_sections(results_dir: Path, study: dict[str, Any], summary: dict[str, Any],
                              families: dict[str, str]) -> list[str]:
    """Steps to every declared target (interpolated), the selected lrs with their trials, the fitted critical
    batch, FLOPs and time to the primary target, the GN/baseline ratio by target depth (``summary``:
    :func:`analysis.summarize_study`); writes summary.json."""
    (results_dir / "summary.json").write_text(dumps_json(summary, indent=2) + "\n")
    families = {m: f for m, f in families.items() if not any(x["name"] == m and x.get("control_of")
                                                              for x in study["methods"])}
    primary, batches, targets = summary["primary_target"], summary["batch_tokens"], summary["targets"]
    methods = [m["name"] for m in study["methods"] if not m.get("control_of")]
    controls = [m for m in study["methods"] if m.get("control_of")]
    sel = study.get("selection_seed")
    md = ["## Declared targets", "",
          f"Targets {', '.join(f'{t:g}' for t in targets)} (primary {primary:g}), declared in the study before any "
          f"run. Steps are interpolated crossings (linear in loss between the last evaluation above the target and "
          f"the first at or below it), median over the reported seeds; the integer step of the first evaluation at "
          f"or below the target is in parentheses. "
          + (f"Learning rates are selected on seed {sel} (fewest steps to the primary target, ties to the lower final "
             f"loss"
             + (f"; lr search: up to {study.get('lr_budget')} lrs per method and batch, extended beyond an edge"
                if study.get("lr_budget") else "")
             + f"); the reported seeds {summary['seeds']} then run at the selected lr only."
             if sel is not None else "Learning rates are selected by the median over seeds."), ""]
    for t in targets:
        md += [f"### target {t:g}" + (" (primary)" if t == primary else ""), "",
               "| method | " + " | ".join(_fmt_batch(b) for b in batches) + " |", "|---|" + "---|" * len(batches)]
        for m in methods:
            cells = []
            for b in batches:
                c = summary["cells"].get(f"{m}/{b}")
                pt = c["per_target"][target_key(t)] if c else None
                if pt is None:
                    cells.append("—")
                elif not c["seeds"]:
                    cells.append("seeds not run yet")
                elif pt["steps_interp"] is None:
                    cells.append(f"not reached ({pt['reached']}/{c['seeds']})")
                else:
                    cells.append(f"{pt['steps_interp']:.1f} ({_fmt_int(pt['steps'])})")
            md.append(f"| {m} | " + " | ".join(cells) + " |")
        md.append("")
    md += ["### Selected learning rates", "", "lr (trials used; ⚠ = still on an edge of what was tried; N = GN inner "
           "steps per outer step; skipped = median skipped outer steps; η floor = share of outer steps whose line "
           "search chose its smallest step size)", "",
           "| method | " + " | ".join(_fmt_batch(b) for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for m in methods:
        cells = []
        for b in batches:
            c = summary["cells"].get(f"{m}/{b}")
            if c is None:
                cells.append("—")
                continue
            extra = f"; N {c['inner_steps']}; skipped {c['skipped_steps']:g}" if "inner_steps" in c else ""
            if c.get("eta_at_floor") is not None:
                extra += f"; η floor {c['eta_at_floor']:.0%}"
            cells.append(f"{c['best_lr']:.3g} ({c['trials']}{extra}){' ⚠' if c['lr_on_edge'] else ''}")
        md.append(f"| {m} | " + " | ".join(cells) + " |")
    binding = [k for k, c in summary["cells"].items() if (c.get("eta_at_floor") or 0) >= 0.5 and not c["control_of"]]
    if binding:
        md += ["", f"⚠ The GN line search chose its smallest step size in at least half of the outer steps at "
               f"{', '.join(binding)}: its range binds there (the step wanted to be shorter still). A larger "
               f"`gn.ls_range` extends it downwards."]
    md += ["", "### Fitted critical batch", "",
           "S(B) = S_min·(1 + B_crit/B) fitted by least squares on log S (McCandlish et al. 2018) to the interpolated "
           "steps to the primary target; 90% interval by bootstrap over seeds. Second view: the fraction of steps "
           "each doubling of the batch saves on the same medians (1 − S(2B)/S(B)).", "",
           "![steps vs batch with fits](steps_vs_batch_fit.png)", "",
           "| method | S_min | B_crit (tokens) | 90% interval | note | saving per doubling from "
           + ", ".join(_fmt_batch(b) for b in batches[:-1]) + " |", "|---|---|---|---|---|---|"]
    for m in methods:
        f = summary["fit"].get(m, {})
        doubling = ", ".join("—" if (v := f.get("per_doubling", {}).get(str(b))) is None else f"{v:.0%}"
                             for b in batches[:-1])
        if "s_min" not in f:
            md.append(f"| {m} | — | — | — | {f.get('reason', '')} | {doubling} |")
            continue
        lo, hi = f.get("b_crit_lo"), f.get("b_crit_hi")
        if f.get("b_crit_unbounded") or hi is None:  # an unbounded end of the interval
            interval = f"[{lo:,.0f}, ∞)" if lo is not None else "unbounded"
        else:
            interval = f"[{lo:,.0f}, {hi:,.0f}]" if lo is not None else "—"
        if f.get("b_crit_unbounded"):
            md.append(f"| {m} | → 0 | > {batches[-1]:,} (unbounded) | {interval} | steps fall like 1/B over the whole "
                      f"measured range: no plateau, only a lower bound on B_crit | {doubling} |")
            continue
        note = "" if f["in_range"] else "B_crit outside the measured batch sizes"
        md.append(f"| {m} | {f['s_min']:.2f} | {f['b_crit']:,.0f} | {interval} | {note} | {doubling} |")
    _plot_fit(results_dir / "steps_vs_batch_fit.png", summary)
    md += ["", f"### Compute and time to the primary target ({primary:g})", "",
           "FLOPs counted with torch's FlopCounterMode on each run's first step (matrix products: forward, backward, "
           "jvp, optimizer); time is the measured training wall time (evaluation excluded); tokens include GN's "
           "line-search tokens. Medians over the seeds that reached the target.", "",
           "| method | batch | steps | tokens | FLOPs | time (s) |", "|---|---|---|---|---|---|"]
    for m in methods:
        for b in batches:
            c = summary["cells"].get(f"{m}/{b}")
            pt = c["per_target"][target_key(primary)] if c else None
            if pt is None or pt["steps_interp"] is None:
                continue
            md.append(f"| {m} | {_fmt_batch(b)} | {pt['steps_interp']:.1f} | {_fmt_int(pt['tokens_to_target'])} | "
                      f"{_fmt_sci(pt['flops_to_target'])} | {_fmt_time(pt['time_to_target_s'])} |")
    if controls:
        md += ["", "### Controls", "", "Each control runs the reported seeds at the lr selected for the method it "
               "controls, with one change (its overrides); interpolated steps to each target, median over seeds. "
               f"Rise: how far the eval loss rose above its start within the first {EARLY_STEPS} steps (the restart "
               "spike; negative: it only fell), median over seeds.", "",
               "| control | of | changes | batch | " + " | ".join(f"{t:g}" for t in targets) + " | rise | "
               + " | ".join(f"method it controls, {t:g}" for t in targets) + " | its rise |",
               "|---|---|---|---|" + "---|" * (2 * len(targets) + 2)]
        for c in controls:
            for b in batches:
                cell, ref = summary["cells"].get(f"{c['name']}/{b}"), summary["cells"].get(f"{c['control_of']}/{b}")
                if cell is None or ref is None:
                    continue
                own = [cell["per_target"][target_key(t)]["steps_interp"] for t in targets]
                base = [ref["per_target"][target_key(t)]["steps_interp"] for t in targets]
                changes = ", ".join(f"{k}={v}" for k, v in (c.get("overrides") or {}).items())
                steps = ["—" if v is None else f"{v:.1f}" for v in own + base]
                rises = ["—" if x.get("early_rise") is None else f"{x['early_rise']:+.3f}" for x in (cell, ref)]
                md.append(f"| {c['name']} | {c['control_of']} | {changes} | {_fmt_batch(b)} | "
                          + " | ".join(steps[:len(targets)] + rises[:1] + steps[len(targets):] + rises[1:]) + " |")
    gn = "gn" if "gn" in families else next((m for m, f in families.items() if f == "gn"), None)
    if gn is not None:
        md += _headline_lines(summary, families, gn)
    if gn is not None and len(targets) > 1:
        _plot_ratio_vs_target(results_dir / "ratio_vs_target.png", summary, families, gn)
        md += ["", "### GN vs the best baseline by target depth", "", "![ratio vs target](ratio_vs_target.png)", "",
               "| batch | " + " | ".join(f"{t:g}" for t in targets) + " |", "|---|" + "---|" * len(targets)]
        for b in batches:
            cells = []
            for t in targets:
                g = summary["cells"].get(f"{gn}/{b}", {}).get("per_target", {}).get(target_key(t), {}).get(
                    "steps_interp")
                name, base = _best_baseline(summary, families, b, t)
                cells.append(f"{base / g:.2f}× ({name})" if g and math.isfinite(base) else "—")
            md.append(f"| {_fmt_batch(b)} | " + " | ".join(cells) + " |")
    return md + [""]
