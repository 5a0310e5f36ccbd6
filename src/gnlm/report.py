"""``gnlm report RESULTS_DIR``: a Markdown report and PNG figures from a study's results files (never trains).

Reads ``study.yaml``, ``runs.jsonl``, the warm start's ``summary.json`` and each best run's ``metrics.jsonl``;
writes ``report.md`` and the figures beside them:

* ``steps_vs_batch.png``: steps to the target vs batch size, log-log, one line per method (the paper's key figure;
  hollow triangles mark "not reached within max_steps" at the step budget),
* ``curves_largest_batch.png``: validation loss vs step at the largest batch, best learning rate per method,
* ``final_loss_vs_batch.png`` (budget studies): final validation loss vs batch size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from gnlm.analysis import Best, eval_curve, read_rows, summarize
from gnlm.config import ConfigError

BASELINE_FAMILY = "baseline"


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
    rows = read_rows(results_dir / "runs.jsonl")
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


def _plot_steps_vs_batch(path: Path, summary: dict[str, Any], max_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, m in enumerate(summary["methods"]):
        color = f"C{i % 10}"
        pts = [(b, summary["best"][(m, b)].result.steps) for b in summary["batches"] if (m, b) in summary["best"]]
        reached = [(b, s) for b, s in pts if math.isfinite(s)]
        missed = [b for b, s in pts if not math.isfinite(s)]
        if reached:
            ax.plot([p[0] for p in reached], [p[1] for p in reached], "o-", color=color, label=m)
        if missed:
            ax.plot(missed, [max_steps] * len(missed), "^", mfc="none", color=color,
                    label=None if reached else f"{m} (not reached)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (tokens)")
    ax.set_ylabel("steps to target (outer steps for GN)")
    ax.set_title("Steps to target vs batch size (best lr per point; △ = not reached)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curves(path: Path, results_dir: Path, summary: dict[str, Any], batch: int, target: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, m in enumerate(summary["methods"]):
        best = summary["best"].get((m, batch))
        if best is None:
            continue
        run = min(best.result.rows, key=lambda r: r["seed"])
        curve = read_rows(results_dir / run["run_dir"] / "metrics.jsonl")
        steps, losses = eval_curve(curve)
        if steps:
            ax.plot(steps, losses, "-", marker=".", color=f"C{i % 10}", label=f"{m} (lr {best.lr:g})")
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("step (outer steps for GN)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Validation loss at batch {_fmt_batch(batch)} tokens (best lr per method)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_final_loss(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, m in enumerate(summary["methods"]):
        pts = [(b, summary["best"][(m, b)].result.final_eval_loss) for b in summary["batches"]
               if (m, b) in summary["best"]]
        pts = [p for p in pts if math.isfinite(p[1])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i % 10}", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (tokens)")
    ax.set_ylabel("final validation loss")
    ax.set_title("Final validation loss at a fixed token budget (best lr per point)")
    ax.grid(True, which="both", alpha=0.3)
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
        lr = f"{r.lr:g}" + (" ⚠" if best.edge else "")
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
    target = study.get("target_loss")
    batches = summary["batches"]
    gn, lw = _reference_methods(study, families)
    n_expected = sum(len(m.get("lrs_by_batch", {}).get(b, m.get("lrs", []))) for m in study["methods"]
                     for b in batches) * len(study.get("seeds", [0]))

    md = [f"# gnlm study `{study.get('name', 'study')}`", ""]
    ws_summary = results_dir / "warm_start" / "summary.json"
    facts = [f"- kind: {kind}; batch sizes (tokens): {', '.join(f'{b:,}' for b in batches)}; "
             f"seeds: {study.get('seeds')}",
             f"- runs recorded: {len({r['run_id'] for r in rows})} of {n_expected}"]
    if kind == "budget":
        facts.append(f"- token budget per run: {study.get('token_budget'):,} tokens (GN line-search tokens "
                     f"{'count' if study.get('count_line_search_tokens', True) else 'do not count'})")
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
        _plot_curves(results_dir / "curves_largest_batch.png", results_dir, summary, largest, target)
        md += [f"## Loss curves at the largest batch ({largest:,} tokens)", "",
               "![loss curves at the largest batch](curves_largest_batch.png)", ""]

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
        md += ["## Failed runs", ""] + [f"- {r['run_id']}: {r['error']}" for r in summary["errors"]] + [""]

    md += ["## All runs", "", "<details><summary>every run</summary>", "",
           "| run | reached | steps | tokens | time (s) | final eval loss | diverged |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["batch_tokens"], r["lr"], r["seed"])):
        md.append(f"| {r['run_id']} | {'yes' if r.get('reached') else 'no'} | {_fmt_int(r.get('steps'))} | "
                  f"{_fmt_int(r.get('tokens'))} | {_fmt_time(r.get('wall_time'))} | "
                  f"{_fmt_loss(r.get('final_eval_loss'))} | {'yes' if r.get('diverged') else ''} |")
    md += ["", "</details>", ""]
    out = results_dir / "report.md"
    out.write_text("\n".join(md))
    return out
