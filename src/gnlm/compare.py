"""``gnlm compare RESULTS_A RESULTS_B [...]``: studies side by side (v1 against v2 of a study, your optimizer's study
against the published one), from their results directories alone (never trains).

For every target the studies share, every method of more than one study and every batch size: the median steps
(interpolated), FLOPs and time to the target over each study's reported seeds at its selected point, and the ratio of
each study's median steps to the first study's, with a 90% interval by bootstrap over seeds (each resample draws every
study's reported seeds with replacement and takes the ratio of the medians). Writes ``compare.md``, ``compare.json``,
``compare.png`` (steps to the deepest shared target against batch, one colour per method, one line style per study)
and every table as CSV in ``tables/``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from gnlm.stats import ratio_interval
from gnlm.checkpoint import atomic_write_bytes, output_dir
from gnlm.config import ConfigError, dumps_json
from gnlm.figures import fmt_batch, pyplot, save_with_legend_below, steps_vs_batch_axes
from gnlm.report import load_results
from gnlm.results import Row
from gnlm.selection import selected_cell, steps_to
from gnlm.study import StudyConfig
from gnlm.tables import write_tables

_STYLES = ("-", "--", ":", "-.")


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    m = statistics.median(values) if values else math.inf
    return m if finite and math.isfinite(m) else None


def _crossing_value(row: Row, target: float, key: str) -> float | None:
    c = row.crossings.get(f"{target:g}")
    return None if c is None or row.diverged or row.failed else c.get(key)


def compare_studies(dirs: list[str | Path], bootstrap: int = 1000) -> dict[str, Any]:
    """Everything ``compare.json`` holds, from two or more results directories; a one-line ConfigError when they
    share no target or no method."""
    if len(dirs) < 2:
        raise ConfigError("gnlm compare needs two or more results directories")
    loaded: list[tuple[str, StudyConfig, list[Row]]] = []
    for d in dirs:
        study, rows = load_results(d)
        loaded.append((str(d), study, rows))
    if any(s.kind != "steps_to_target" for _, s, _ in loaded):
        raise ConfigError("gnlm compare compares steps-to-target studies; a budget study has no targets to share")
    shared = sorted(set.intersection(*(set(s.targets) for _, s, _ in loaded)), reverse=True)
    if not shared:
        listing = "; ".join(f"{d}: {', '.join(f'{t:g}' for t in s.targets)}" for d, s, _ in loaded)
        raise ConfigError(f"the studies share no target ({listing}); compare studies that declare a common target")
    names = [[m.name for m in s.methods if m.control_of is None] for _, s, _ in loaded]
    methods = [m for m in dict.fromkeys(n for ns in names for n in ns) if sum(m in ns for ns in names) > 1]
    if not methods:
        raise ConfigError("the studies share no method (by name); nothing to put side by side")
    batches = sorted(set().union(*(set(s.batch_tokens) for _, s, _ in loaded)))
    per_target: dict[str, Any] = {}
    for t in shared:
        entries = []
        for m in methods:
            for b in batches:
                cells = []
                for k, (_, study, rows) in enumerate(loaded):
                    sel = selected_cell(study, rows, m, b) if b in study.batch_tokens and m in names[k] else None
                    reported = sel["reported"] if sel else []
                    cells.append({
                        "seeds": len(reported),
                        "steps": [steps_to(r, t) for r in reported],
                        "flops": _median([_crossing_value(r, t, "flops_interp") or math.inf for r in reported]),
                        "time_s": _median([_crossing_value(r, t, "wall_time_interp") or math.inf for r in reported]),
                    })
                if sum(c["seeds"] > 0 for c in cells) < 2:
                    continue
                base = cells[0]["steps"]
                entry = {"method": m, "batch_tokens": b, "studies": []}
                for k, c in enumerate(cells):
                    lo, hi = ratio_interval(base, c["steps"], n=bootstrap, seed=k) if k else (None, None)
                    med, med0 = _median(c["steps"]), _median(base)
                    entry["studies"].append({"steps": med, "seeds": c["seeds"], "flops": c["flops"],
                                             "time_s": c["time_s"],
                                             "ratio": med / med0 if k and med and med0 else None,
                                             "ratio_lo": lo, "ratio_hi": hi})
                entries.append(entry)
        per_target[f"{t:g}"] = entries
    return {"studies": [{"dir": d, "name": s.name} for d, s, _ in loaded], "shared_targets": shared,
            "methods": methods, "batch_tokens": batches, "per_target": per_target}


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(result: dict[str, Any]) -> str:
    studies = result["studies"]
    labels = [f"{s['name']} ({k})" if [x["name"] for x in studies].count(s["name"]) > 1 else s["name"]
              for k, s in enumerate(studies)]
    md = ["# gnlm compare", "", "Studies: " + "; ".join(f"`{lab}` ({s['dir']})" for lab, s in zip(labels, studies)),
          "", f"Shared targets: {', '.join(f'{t:g}' for t in result['shared_targets'])}. Steps: median interpolated "
          f"steps to the target over each study's reported seeds at its selected point (outer steps for GN); ratio: "
          f"a study's median steps / `{labels[0]}`'s, with a 90% bootstrap interval over seeds (below 1: fewer "
          f"steps); FLOPs and time: medians over the seeds that reached the target.", ""]
    for t, entries in result["per_target"].items():
        md += [f"## target {t}", "",
               "| method | batch | " + " | ".join(f"{lab} steps" for lab in labels) + " | "
               + " | ".join(f"{lab} / {labels[0]}" for lab in labels[1:]) + " | "
               + " | ".join(f"{lab} FLOPs | {lab} time (s)" for lab in labels) + " |",
               "|---|---|" + "---|" * (len(labels) * 3 + len(labels) - 1)]
        for e in entries:
            st = e["studies"]
            steps = [("not run" if not s["seeds"] else _fmt(s["steps"], ".1f") if s["steps"] is not None
                      else "not reached") for s in st]
            ratios = [(f"{s['ratio']:.2f}×" if s["ratio"] is not None else "—")
                      + (f" [{s['ratio_lo']:.2f}, {s['ratio_hi']:.2f}]" if s["ratio_lo"] is not None else "")
                      for s in st[1:]]
            cost = [f"{_fmt(s['flops'], '.3g')} | {_fmt(s['time_s'], '.1f')}" for s in st]
            md.append(f"| {e['method']} | {fmt_batch(e['batch_tokens'])} | " + " | ".join(steps) + " | "
                      + " | ".join(ratios) + " | " + " | ".join(cost) + " |")
        md.append("")
    md += ["![steps against batch, studies overlaid](compare.png)", ""]
    return "\n".join(md)


def _plot(path: Path, result: dict[str, Any]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    target = f"{min(result['shared_targets']):g}"
    ys = []
    for i, m in enumerate(result["methods"]):
        for k, study in enumerate(result["studies"]):
            pts = [(e["batch_tokens"], e["studies"][k]["steps"]) for e in result["per_target"][target]
                   if e["method"] == m and e["studies"][k]["steps"] is not None]
            if pts:
                ys += [s for _, s in pts]
                ax.plot([b for b, _ in pts], [s for _, s in pts], _STYLES[k % len(_STYLES)], marker="o",
                        color=f"C{i % 10}", label=f"{m} — {study['name']}")
    steps_vs_batch_axes(ax, result["batch_tokens"], ys)
    ax.set_ylabel(f"steps to {target} (interpolated; median over seeds)")
    ax.set_title("Studies side by side (line style: study)")
    save_with_legend_below(fig, ax, path)


def run_compare(dirs: list[str | Path], out: str | Path, bootstrap: int = 1000) -> Path:
    """Compare the studies in ``dirs`` and write ``compare.md``, ``compare.json``, ``compare.png`` and ``tables/``
    into ``out``; returns the path of compare.md."""
    result = compare_studies(dirs, bootstrap=bootstrap)
    out = output_dir(out)
    text = markdown(result)
    atomic_write_bytes(out / "compare.json", (dumps_json(result, indent=2) + "\n").encode())
    atomic_write_bytes(out / "compare.md", (text + "\n").encode())
    write_tables(text, out / "tables")
    _plot(out / "compare.png", result)
    return out / "compare.md"
