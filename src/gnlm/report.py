"""``gnlm report RESULTS_DIR``: a Markdown report and PNG figures from a study's results files (never trains).
Every table of the report is also written as a CSV file in ``tables/`` (``tables.py``).

Reads ``study.yaml``, ``runs.jsonl`` and the warm start's ``summary.json``; writes ``report.md``, ``summary.json``
(every number of the report, machine-readable: ``analysis.summarize_study``) and the figures beside them
(``figures.py``):

* ``curves_largest_batch.png``: validation loss vs step at the largest batch, selected lr per method,
* ``steps_vs_batch_fit.png``: interpolated steps to the primary target with the fitted S(B) = S_min(1 + B_crit/B)
  and each method's CBS (Zhang et al.) on it as a hollow diamond (hollow triangles at a method's step budget mark
  "not reached"),
* ``ratio_vs_target.png``: best baseline / full GN steps against target depth, one line per batch size,
* ``final_loss_vs_batch.png`` (budget studies): final validation loss vs batch size.
"""

from __future__ import annotations

import json
import math
import statistics
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

from gnlm.analysis import EARLY_STEPS, best_baseline, summarize_study
from gnlm.checkpoint import atomic_write_bytes
from gnlm.config import ConfigError, dumps_json
from gnlm.figures import fmt_batch, plot_curves, plot_final_loss, plot_fit, plot_ratio_vs_target
from gnlm.results import Row, read_jsonl, read_rows, target_key
from gnlm.study import StudyConfig, upgrade_saved_study
from gnlm.tables import write_tables

BASELINE_FAMILY = "baseline"
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


def _time_range(span: list[float] | None) -> str:
    """The seeds' range of a time, after its median (nothing for one seed or an older summary)."""
    return f" [{_fmt_time(span[0])}, {_fmt_time(span[1])}]" if span and span[0] != span[1] else ""


def _fmt_steps(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.1f}"


def load_results(results_dir: str | Path) -> tuple[StudyConfig, list[Row]]:
    """The study and its rows; one-line ConfigErrors for a directory that is not a readable results directory.
    Lines of runs.jsonl that are not complete rows are named on stderr and left out."""
    results_dir = Path(results_dir)
    if not results_dir.exists():
        raise ConfigError(f"results directory {results_dir} does not exist; give the directory that gnlm bench wrote")
    if not results_dir.is_dir():
        raise ConfigError(f"{results_dir} is a file, not a results directory; give the directory that gnlm bench wrote")
    study_path = results_dir / "study.yaml"
    if not study_path.is_file():
        raise ConfigError(f"{results_dir} is not a gnlm results directory (no study.yaml); give the directory that "
                          f"gnlm bench wrote")
    try:
        raw = yaml.safe_load(study_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        raise ConfigError(f"{study_path} is not valid YAML; restore it (gnlm bench writes it) or run gnlm bench "
                          f"STUDY --results {results_dir} again") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{study_path} does not hold a study (a YAML mapping); restore the file gnlm bench wrote")
    try:
        study = upgrade_saved_study(raw)
    except ConfigError as e:
        raise ConfigError(f"{study_path}: {e}") from None
    return study, read_rows(results_dir, warn=True)


def _row_curve(results_dir: Path, row: Row) -> list[tuple[int, float]]:
    """A run's finite (step, eval loss) points: from its row (studies keep the curve) or its metrics file."""
    if row.curve:
        steps, losses = row.curve["step"], row.curve["eval_loss"]
    else:
        evals = [r for r in read_jsonl(results_dir / row.run_dir / "metrics.jsonl") if r.get("eval_loss") is not None]
        steps, losses = [r["step"] for r in evals], [r["eval_loss"] for r in evals]
    return [(s, v) for s, v in zip(steps, losses) if isinstance(v, (int, float)) and math.isfinite(v)]


def _curve_entry(results_dir: Path, i: int, method: str, lr: float, run: Row) -> tuple | None:
    pts = _row_curve(results_dir, run)
    if not pts:
        return None
    note = " — diverged" if run.diverged else " — every step skipped" if run.all_steps_skipped else ""
    return f"{method} (lr {lr:.3g}){note}", f"C{i % 10}", pts, run.diverged


def _selected_lr_curves(results_dir: Path, study: StudyConfig, rows: list[Row], cells: dict[str, Any],
                        batch: int) -> list[tuple]:
    """Per method (controls aside), the lowest reported seed at its selected lr at ``batch``."""
    curves = []
    for i, m in enumerate(m.name for m in study.methods if m.control_of is None):
        cell = cells.get(f"{m}/{batch}")
        runs = [r for r in rows if cell and r.method == m and r.batch_tokens == batch
                and float(r.lr) == cell["best_lr"] and r.seed in study.seeds]
        if runs:
            curves.append(_curve_entry(results_dir, i, m, cell["best_lr"], min(runs, key=lambda r: r.seed)))
    return [c for c in curves if c is not None]


def _budget_sections(results_dir: Path, study: StudyConfig, summary: dict[str, Any]) -> list[str]:
    """A budget study: final and best validation loss per method and batch at the selected lr."""
    plot_final_loss(results_dir / "final_loss_vs_batch.png", study, summary)
    batches = study.batch_tokens
    md = ["## Final validation loss vs batch size", "", "![final loss vs batch](final_loss_vs_batch.png)", "",
          f"Every run trains on the same {study.token_budget:,} tokens (GN line-search tokens "
          f"{'count' if study.count_line_search_tokens else 'do not count'}); learning rates selected on seed "
          f"{study.selection_seed} (the lowest final eval loss); medians over the reported seeds {list(study.seeds)}: "
          f"final eval loss, the seeds' range [min, max] and, in parentheses, the best eval loss on the way "
          f"(⚠ = selected lr on an edge of what was tried).",
          "", "| method | " + " | ".join(fmt_batch(b) for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for m in [m.name for m in study.methods]:
        cells = []
        for b in batches:
            c = summary["cells"].get(f"{m}/{b}")
            if c is None:
                cells.append("—")
            elif not c["seeds"]:
                cells.append("seeds not run yet")
            else:
                span = c.get("final_eval_loss_range")
                span = f" [{_fmt_loss(span[0])}, {_fmt_loss(span[1])}]" if span else ""
                cells.append(f"{_fmt_loss(c['final_eval_loss'])}{span} ({_fmt_loss(c['best_eval_loss'])}; lr "
                             f"{c['best_lr']:.3g}){' ⚠' if c['lr_on_edge'] else ''}")
        md.append(f"| {m} | " + " | ".join(cells) + " |")
    return md + _selected_settings(study, summary) + [""]


def _selected_settings(study: StudyConfig, summary: dict[str, Any]) -> list[str]:
    """Per searched method and batch: the trials it used and its selected value of every searched setting, ⚠ with
    the edge where that value still sits on an edge of what was tried (nothing for a study without a search)."""
    searched = [m for m in study.methods if m.search]
    if not searched:
        return []
    keys = list(dict.fromkeys(k for m in searched for k in m.search))
    md = ["", "### Selected settings", "",
          f"The point selected on seed {study.selection_seed} for each searched method: {study.trials} quasi-random "
          f"(scrambled Sobol) trials per method and batch, then points beyond an edge and {study.refine} refined "
          f"lr(s) (×/÷ √2, ...), at most {study.runs_per_search} runs per method and batch (trials used: the runs it "
          f"took; ⚠ low/high: the value still sits on that edge of what was tried; —: not searched by that method).",
          "", "| method | batch | trials used | " + " | ".join(f"`{k}`" for k in keys) + " |",
          "|---|---|---|" + "---|" * len(keys)]

    def shown(cell: dict[str, Any], key: str) -> str:
        value = cell["best_point"][key]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text + (f" ⚠ {cell['edges'][key]}" if key in cell["edges"] else "")

    for m in searched:
        for b in study.batch_tokens:
            c = summary["cells"].get(f"{m.name}/{b}")
            if c is not None:
                values = [shown(c, k) if k in m.search else "—" for k in keys]
                md.append(f"| {m.name} | {fmt_batch(b)} | {c['trials']} | " + " | ".join(values) + " |")
    return md


def _eval_set(study: StudyConfig, ws: dict[str, Any] | None, rows: list[Row]) -> dict[str, Any]:
    """The eval set's size and the measured standard error of its mean loss over sequences (``loss_se``): from the
    warm start's summary.json, else the rows (the median over runs), else not recorded (None); where neither
    records the size, the study's declared data.eval_sequences × data.seq_len."""
    runs = [vars(r) for r in rows if getattr(r, "final_eval_loss_se", None) is not None]
    if ws and ws.get("final_eval_loss_se") is not None:
        recorded, se, se_from = ws, ws["final_eval_loss_se"], "warm start"
    elif runs:
        recorded, se, se_from = runs[0], statistics.median(r["final_eval_loss_se"] for r in runs), "runs (median)"
    else:
        recorded, se, se_from = ws or {}, None, None
    data = study.method_run_config(study.methods[0].name).data
    sequences = recorded.get("eval_sequences") or data.eval_sequences
    return {"sequences": sequences, "tokens": recorded.get("eval_tokens") or sequences * data.seq_len,
            "size_from": "recorded" if recorded.get("eval_sequences") else "declared", "loss_se": se,
            "loss_se_from": se_from}


def _eval_set_line(eval_set: dict[str, Any], study: StudyConfig, ws: dict[str, Any] | None) -> str:
    """The eval set's size and noise next to the spacing of the declared targets."""
    line = (f"- eval set: {eval_set['sequences']:,} sequences, {eval_set['tokens']:,} tokens "
            f"({'recorded' if eval_set['size_from'] == 'recorded' else 'as declared in the study'}); standard error "
            f"of its mean loss over sequences: ")
    se = eval_set["loss_se"]
    line += "not recorded" if se is None else f"{se:.4f} ({eval_set['loss_se_from']})"
    if len(study.targets) > 1:
        gaps = [a - b for a, b in pairwise(study.targets)]
        start = ws.get("final_eval_loss") if ws else None
        line += (f"; the targets are {', '.join(f'{g:.3f}' for g in gaps)} apart"
                 + (f" ({start - study.targets[0]:.3f} from the warm start to the first)" if start is not None else "")
                 + (f", the closest {min(gaps) / se:.1f} standard errors" if se else ""))
    return line


def write_report(results_dir: str | Path, bootstrap: int = 1000) -> Path:
    """Write ``report.md``, ``summary.json`` and the figures into ``results_dir``; returns the report's path.
    ``bootstrap``: resamples of each bootstrap interval (fewer: faster and coarser)."""
    results_dir = Path(results_dir)
    study, rows = load_results(results_dir)
    summary = summarize_study(study, rows, bootstrap=bootstrap)
    families = {m.name: m.family for m in study.methods}
    batches, target = study.batch_tokens, study.primary_target
    md = [f"# gnlm study `{study.name}`", ""]
    ws_summary = results_dir / "warm_start" / "summary.json"
    facts = [f"- kind: {study.kind}; batch sizes (tokens): {', '.join(f'{b:,}' for b in batches)}; "
             f"seeds: {list(study.seeds)} (learning rates selected on seed {study.selection_seed})",
             f"- runs recorded: {len({r.run_id for r in rows})} (the learning-rate search plans its runs as results "
             f"come in)"]
    if study.kind == "budget":
        facts.append(f"- token budget per run: {study.token_budget:,} tokens (GN line-search tokens "
                     f"{'count' if study.count_line_search_tokens else 'do not count'})")
    else:
        budgets = sorted({(m.max_steps or study.max_steps, m.max_tokens or study.max_tokens, m.family == "gn")
                          for m in study.methods}, key=lambda x: (x[0], x[1] or 0, x[2]))
        facts.append(f"- declared targets: {', '.join(f'{t:g}' for t in study.targets)} (primary {target:g}); "
                     f"step budget: " + ", ".join(f"{n} {'outer steps (GN)' if g else 'steps'}"
                                                  + (f" or {t:,} tokens" if t else "") for n, t, g in budgets))
    ws = None
    if ws_summary.exists():
        try:
            ws = json.loads(ws_summary.read_text())
        except (OSError, ValueError):
            ws = None
        if not isinstance(ws, dict):
            raise ConfigError(f"{ws_summary} is not a run summary (a JSON object); restore it, or delete it to "
                              f"report without the warm start")
        facts.append(f"- shared AdamW warm start: {ws.get('tokens', 0):,} tokens, {ws.get('step')} steps, "
                     f"validation loss {_fmt_loss(ws.get('final_eval_loss'))}")
    summary["eval_set"] = _eval_set(study, ws, rows)
    facts.append(_eval_set_line(summary["eval_set"], study, ws))
    md += facts + [""]
    if not rows:
        md += ["No finished runs yet."]
        out = results_dir / "report.md"
        atomic_write_bytes(out, ("\n".join(md) + "\n").encode())
        return out

    if study.kind == "budget":
        atomic_write_bytes(results_dir / "summary.json", (dumps_json(summary, indent=2) + "\n").encode())
        md += _budget_sections(results_dir, study, summary)
    else:
        largest = batches[-1]
        plot_curves(results_dir / "curves_largest_batch.png",
                     _selected_lr_curves(results_dir, study, rows, summary["cells"], largest), largest, target,
                     "selected lr per method, lowest reported seed")
        md += [f"## Loss curves at the largest batch ({largest:,} tokens)", "",
               "![loss curves at the largest batch](curves_largest_batch.png)", ""]
        md += _declared_target_sections(results_dir, study, summary, families)

    errors = [r for r in rows if r.failed]
    if errors:
        md += ["## Failed runs", ""] + [f"- {r.run_id}: {r.error}" for r in errors] + [""]
    diverged = [r for r in rows if r.diverged]
    stuck = [r for r in rows if not r.diverged and r.all_steps_skipped]
    if diverged or stuck:
        md += ["## Diverged runs and runs that never moved", "", f"Divergence rule: {DIVERGENCE_RULE}. A diverged "
               f"run counts as not reached and is never a best learning rate unless every learning rate diverged. "
               f"A run whose every step was skipped (GN: no line-search step size lowered the loss) never moved from "
               f"its start; it is never the best learning rate over one that reached a lower loss.", ""]
        md += [f"- {r.run_id}: diverged ({r.diverged_reason or 'reason not recorded'}): {r.error}" for r in diverged]
        md += [f"- {r.run_id}: every one of its {r.steps_run} steps was skipped; final eval loss "
               f"{_fmt_loss(r.final_eval_loss)}" for r in stuck]
        md.append("")

    budget = study.kind == "budget"   # a budget run trains to its end: what it ran, not when it reached a target
    md += ["## All runs", "", "<details><summary>every run</summary>", "",
           "| run | steps | tokens | time (s) | final eval loss | best eval loss | skipped steps | diverged |"
           if budget else "| run | reached | steps | tokens | time (s) | final eval loss | skipped steps | diverged |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.method, r.batch_tokens, r.lr, r.seed)):
        skipped = f"{r.skipped_steps}/{r.steps_run}" if r.skipped_steps else ""
        diverged = (r.diverged_reason or "yes") if r.diverged else ""
        if budget:
            md.append(f"| {r.run_id} | {_fmt_int(r.steps_run)} | {_fmt_int(r.tokens_run)} | "
                      f"{_fmt_time(r.total_wall_time)} | {_fmt_loss(r.final_eval_loss)} | "
                      f"{_fmt_loss(r.best_eval_loss)} | {skipped} | {diverged} |")
            continue
        reached = "yes" if r.reached else "no" + (" (lr search: stopped early)" if r.stopped_early else "")
        md.append(f"| {r.run_id} | {reached} | {_fmt_int(r.steps)} | {_fmt_int(r.tokens)} | "
                  f"{_fmt_time(r.wall_time)} | {_fmt_loss(r.final_eval_loss)} | {skipped} | {diverged} |")
    md += ["", "</details>", ""]
    out = results_dir / "report.md"
    atomic_write_bytes(out, "\n".join(md).encode())
    write_tables("\n".join(md), results_dir / "tables")
    return out


def _best_baseline(summary: dict[str, Any], families: dict[str, str], batch: int, target: float) -> tuple[str, float]:
    """The baseline with the fewest interpolated steps to ``target`` at ``batch`` (inf when none reached it or while
    a baseline's seeds are still to come there)."""
    baselines = [m for m, fam in families.items() if fam == BASELINE_FAMILY]
    name, steps = best_baseline(summary["cells"], baselines, batch, target,
                                pending=summary.get("pending_baselines", {}))
    return name or "—", steps


def _no_best_baseline(summary: dict[str, Any], batch: int) -> str:
    """Why no best baseline is named at ``batch``: seeds still to come, or no baseline reached the target."""
    pending = summary.get("pending_baselines", {}).get(str(batch))
    return f"pending (seeds of {', '.join(pending)} to come)" if pending else "none reached"


def _headline_lines(summary: dict[str, Any], families: dict[str, str], gn: str) -> list[str]:
    """Per batch size, at the primary target: GN against the baseline with the fewest steps, in steps, FLOPs and
    measured time side by side (a step saving that costs more compute or time shows as a ratio below 1), the steps
    ratio counted from the study's restart level when it declares one, and every other GN variant's steps against
    GN's."""
    primary = summary["primary_target"]
    key = target_key(primary)
    others = [m for m, f in families.items() if f == "gn" and m != gn]
    restart = summary.get("restart_level")

    def point(m: str, b: int) -> dict[str, Any]:
        return summary["cells"].get(f"{m}/{b}", {}).get("per_target", {}).get(key) or {}

    def times(num: float | None, den: float | None) -> str:
        return f"{num / den:.2f}×" if num and den else "—"

    md = ["", f"### {gn} vs the best baseline at the primary target ({primary:g})", "",
          "Best baseline = the baseline with the fewest interpolated steps at that batch size. Ratios are baseline / "
          f"{gn} (above 1: {gn} needs less); medians over the reported seeds. "
          + (f"From {restart:g}: the steps ratio counted from where each run first got back below the restart level "
             f"{restart:g} (median over seeds of steps to the target minus steps to {restart:g}), leaving out what "
             f"the restart spike cost. " if restart is not None else "")
          + (f"Last columns: steps of {', '.join(others)} / {gn} (above 1: slower than {gn})." if others else ""), "",
          f"| batch | {gn} steps | best baseline | its steps | steps ratio | "
          + (f"steps ratio from {restart:g} | " if restart is not None else "") + "FLOPs ratio | time ratio | "
          + "".join(f"{m} / {gn} | " for m in others),
          "|---|---|---|---|---|---|---|" + "---|" * (len(others) + (restart is not None))]
    for b in summary["batch_tokens"]:
        g = point(gn, b)
        name, base_steps = _best_baseline(summary, families, b, primary)
        base = point(name, b) if math.isfinite(base_steps) else {}
        gs = g.get("steps_interp")
        ran = summary["cells"].get(f"{gn}/{b}", {}).get("seeds")
        cells = [f"{gs:.1f}" if gs else "not reached" if ran else "—", name if base else _no_best_baseline(summary, b),
                 f"{base_steps:.1f}" if base else "—", times(base.get("steps_interp"), gs)]
        if restart is not None:
            cells.append(times(base.get("steps_from_restart"), g.get("steps_from_restart")))
        cells += [times(base.get("flops_to_target"), g.get("flops_to_target")),
                  times(base.get("time_to_target_s"), g.get("time_to_target_s"))]
        cells += [times(point(m, b).get("steps_interp"), gs) for m in others]
        md.append(f"| {fmt_batch(b)} | " + " | ".join(cells) + " |")
    return md


def _interval(lo: float | None, hi: float | None, unbounded: bool) -> str:
    """An interval of a critical batch: None as the upper end is unbounded (∞)."""
    if lo is None:
        return "unbounded" if unbounded else "—"
    return f"[{lo:,.0f}, {'∞)' if hi is None else f'{hi:,.0f}]'}"


def _fit_lines(summary: dict[str, Any], methods: list[str]) -> list[str]:
    """The fitted S(B) per method with both critical batches (McCandlish's B_crit, Zhang et al.'s CBS), each with
    its intervals over seeds, over batch sizes and with one batch size left out (:func:`stats.bootstrap_fit`),
    and the saving per doubling."""
    batches = summary["batch_tokens"]
    md = ["", "### Fitted critical batch", "",
          "S(B) = S_min·(1 + B_crit/B), i.e. a + b/B with a = S_min and b/a = B_crit, fitted by least squares on log S "
          "to the interpolated steps to the primary target (median over seeds). Two definitions of the critical batch "
          "come from the same fit; they differ several-fold, so every number below says which one it is:", "",
          "- **B_crit = b/a** (McCandlish et al. 2018): at B_crit a run takes twice the minimal steps S_min.",
          "- **CBS = 0.2·b/a + 1.2·B_ref** (Zhang et al. 2024): the batch at which the steps exceed perfect (linear) "
          "scaling from the reference batch B_ref by 20% (S(B) = 1.2·S(B_ref)·B_ref/B); B_ref is the smallest batch "
          "of the method's fit.", "",
          "90% intervals three ways, all on the same B_ref: over seeds (a bootstrap of the seeds at every batch size, "
          "refitted), over batch sizes (a bootstrap of the fit's log residuals across batch sizes, scaled by "
          "√(k/(k − 2)) for k batch sizes, refitted), and the range of the k refits that leave one batch size out. "
          "Second view: the fraction of steps each doubling of the batch saves on the same medians "
          "(1 − S(2B)/S(B)).", "",
          "![steps vs batch with fits](steps_vs_batch_fit.png)", "",
          "| method | S_min | B_crit (tokens) | over seeds | over batch sizes | one batch size left out | note | "
          + (f"saving per doubling from {', '.join(fmt_batch(b) for b in batches[:-1])}" if len(batches) > 1
             else "saving per doubling (one batch size: none)") + " |", "|---|---|---|---|---|---|---|---|"]
    cbs = ["", "| method | B_ref (tokens) | CBS (tokens) | over seeds | over batch sizes | one batch size left out | "
           "note |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        f = summary["fit"].get(m, {})
        doubling = ", ".join("—" if (v := f.get("per_doubling", {}).get(str(b))) is None else f"{v:.0%}"
                             for b in batches[:-1]) or "—"
        if "s_min" not in f:
            md.append(f"| {m} | — | — | — | — | — | {f.get('reason', '')} | {doubling} |")
            cbs.append(f"| {m} | — | — | — | — | — | {f.get('reason', '')} |")
            continue
        unbounded = bool(f.get("b_crit_unbounded"))
        b_crit, c = ([_interval(f.get(f"{k}_{lo}"), f.get(f"{k}_{hi}"), unbounded)
                      for lo, hi in (("lo", "hi"), ("residual_lo", "residual_hi"), ("jackknife_min", "jackknife_max"))]
                     for k in ("b_crit", "cbs"))
        b_ref = _fmt_int(f.get("cbs_reference_batch"))
        if unbounded:
            md.append(f"| {m} | → 0 | > {batches[-1]:,} (unbounded) | {' | '.join(b_crit)} | steps fall like 1/B over "
                      f"the whole measured range: no plateau, only a lower bound on B_crit | {doubling} |")
            cbs.append(f"| {m} | {b_ref} | unbounded | {' | '.join(c)} | steps fall like 1/B: only a lower bound |")
            continue
        note = "" if f["in_range"] else "B_crit outside the measured batch sizes"
        md.append(f"| {m} | {f['s_min']:.2f} | {f['b_crit']:,.0f} | {' | '.join(b_crit)} | {note} | {doubling} |")
        note = "" if f.get("cbs_in_range") else "CBS outside the measured batch sizes"
        cbs.append(f"| {m} | {b_ref} | {_fmt_int(f.get('cbs'))} | {' | '.join(c)} | {note} |")
    return md + cbs


def _fmt_crossover(batch: float | None, bound: str | None) -> str:
    """A crossover batch with its bound (stats.crossover_batch): 27,000, ≤ 4,096, > 32,768."""
    prefix = {"exact": "", "at_or_below": "≤ ", "above": "> "}.get(bound or "none")
    return "—" if prefix is None else prefix + _fmt_int(batch)


def _crossover_lines(summary: dict[str, Any]) -> list[str]:
    """Per GN method, where its FLOPs and its measured time to the primary target fall below the best baseline's
    (``summary["crossover"]``, :func:`stats.compute_crossover`)."""
    crossover, batches = summary.get("crossover") or {}, summary["batch_tokens"]
    pending = summary.get("pending_baselines", {})
    if not crossover:
        return []
    md = ["", "### Where GN becomes cheaper than the best baseline", "",
          "Per GN method, the smallest batch at which its FLOPs (and, separately, its measured time) to the primary "
          "target fall below those of the best baseline for that measure (the baseline with the fewest FLOPs, or the "
          "least time, at that batch): interpolated geometrically between measured batches where log(baseline / GN) "
          "crosses 0, from medians over the reported seeds (not reached counts as never); 90% interval by bootstrap "
          "over seeds. ≤ B: already cheaper at the smallest batch compared; > B: dearer at every batch measured, so "
          "the crossover, if any, lies above B. Last columns: baseline / GN at each batch (above 1: GN cheaper), with "
          "the best baseline; pending: a baseline's seeds are still to come there, so that batch is not compared "
          "yet.", "",
          "| method | measure | crossover (tokens) | 90% interval | " + " | ".join(fmt_batch(b) for b in batches) + " |",
          "|---|---|---|---|" + "---|" * len(batches)]
    for gn, measures in crossover.items():
        for name, label in (("flops", "FLOPs"), ("time", "time")):
            x = measures[name]
            ends = [_fmt_crossover(x["lo"], x["lo_bound"]), _fmt_crossover(x["hi"], x["hi_bound"])]
            interval = "—" if not x["resamples"] else ends[0] if ends[0] == ends[1] else f"[{ends[0]}, {ends[1]}]"
            ratios = [f"{p['baseline_over_gn']:.2f}× ({p['baseline']})" if (p := x["per_batch"].get(str(b)))
                      else "pending" if str(b) in pending else "—" for b in batches]
            point = (_fmt_crossover(x["batch"], x["bound"]) if x["bound"] != "none"
                     else "not compared (no batch where both reached the target"
                     + (" yet)" if pending else ")"))
            md.append(f"| {gn} | {label} | {point} | {interval} | " + " | ".join(ratios) + " |")
    return md


def _reference_lines(study: StudyConfig, summary: dict[str, Any]) -> list[str]:
    """The ablation table: every method against the study's ``reference`` (``summary["against_reference"]``)."""
    ref, per_method, targets = study.reference, summary.get("against_reference") or {}, summary["targets"]
    if ref is None:
        return []
    md = ["", f"### Against the reference `{ref}`", "",
          f"Each method's steps to each target over `{ref}`'s at the same batch: median interpolated steps over the "
          f"reported seeds, method / {ref} = ratio (above 1: the method needs more steps), with a 90% bootstrap "
          f"interval over seeds. Every method's learning rate (point) was selected on its own, with the same budget.",
          ""]
    methods = {m.name: m for m in study.methods}
    claims = any(methods[m].claim for m in per_method if m in methods)
    if claims:
        md += [f"The published finding was declared with each method before the runs (`claim`, `expect`); the "
               f"verdict reads the ratio's interval at the primary target {study.primary_target:g}: agrees or "
               f"disagrees when the whole interval does (`same`: within ×/÷ {1 + study.same_within:g}), else not "
               f"resolved.", ""]
    md += ["| method | changes | batch | " + " | ".join(f"{t:g}" for t in targets)
           + (" | published finding | verdict |" if claims else " |"),
           "|---|---|---|" + "---|" * len(targets) + ("---|---|" if claims else "")]
    for m, per_batch in per_method.items():
        spec = methods.get(m)
        changes = ", ".join(f"{k}={v}" for k, v in (spec.overrides if spec else {}).items()) or "—"
        for b, per_target in per_batch.items():
            cells = []
            for t in targets:
                e = per_target[target_key(t)]
                if e["steps"] is None:
                    cells.append(f"not reached ({e['reached']}/{e['seeds']})")
                elif e["reference_steps"] is None:
                    cells.append(f"{e['steps']:.1f} / not reached")
                else:
                    lo, hi = e["interval"]
                    interval = f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
                    cells.append(f"{e['steps']:.1f} / {e['reference_steps']:.1f} = {e['ratio']:.2f}×{interval}")
            if claims:
                primary = per_target[target_key(study.primary_target)]
                cells += [f"{spec.claim} (expects {spec.expect.replace('_', ' ')})", primary["verdict"]]\
                    if spec and spec.claim else ["—", "—"]
            md.append(f"| {m} | {changes} | {fmt_batch(int(b))} | " + " | ".join(cells) + " |")
    return md


def _segment_lines(summary: dict[str, Any], gn: str) -> list[str]:
    """Per batch, the best baseline's and ``gn``'s steps between consecutive targets and their ratio
    (``summary["segments"]``)."""
    per_batch, targets = (summary.get("segments") or {}).get(gn) or {}, summary["targets"]
    if not per_batch or len(targets) < 2:
        return []
    ends = ["warm start", *(f"{t:g}" for t in targets)]
    md = ["", f"### Steps per segment between targets: {gn} vs the best baseline", "",
          f"Steps from the warm start to the first target and between consecutive targets, as differences of the "
          f"median steps over seeds (they add up to the steps tables); best baseline = the one with the fewest steps "
          f"to the primary target at that batch. Each cell: baseline steps / {gn} steps = ratio; a ratio that falls "
          f"with depth means {gn}'s advantage is front-loaded.", "",
          "| batch | best baseline | " + " | ".join(f"{a} → {b}" for a, b in pairwise(ends)) + " |",
          "|---|---|" + "---|" * len(targets)]
    for b, row in per_batch.items():
        cells = [f"{_fmt_steps(s['baseline_steps'])} / {_fmt_steps(s['steps'])}"
                 + (f" = {s['ratio']:.2f}×" if s["ratio"] else "") for s in row["segments"]]
        base = row["baseline"] or _no_best_baseline(summary, int(b))
        md.append(f"| {fmt_batch(int(b))} | {base} | " + " | ".join(cells) + " |")
    return md


def _declared_target_sections(results_dir: Path, study: StudyConfig, summary: dict[str, Any],
                              families: dict[str, str]) -> list[str]:
    """Steps to every declared target (interpolated), the selected lrs with their trials, the fitted critical
    batch, FLOPs and time to the primary target, the GN/baseline ratio by target depth (``summary``:
    :func:`analysis.summarize_study`); writes summary.json."""
    atomic_write_bytes(results_dir / "summary.json", (dumps_json(summary, indent=2) + "\n").encode())
    families = {m: f for m, f in families.items() if m not in study.controls}
    primary, batches, targets = summary["primary_target"], summary["batch_tokens"], summary["targets"]
    methods = [m.name for m in study.methods if m.control_of is None]
    controls = [m for m in study.methods if m.control_of is not None]
    sel = study.selection_seed
    md = ["## Declared targets", "",
          f"Targets {', '.join(f'{t:g}' for t in targets)} (primary {primary:g}), declared in the study before any "
          f"run. Steps are interpolated crossings (linear in loss between the last evaluation above the target and "
          f"the first at or below it), median over the reported seeds; the integer step of the first evaluation at "
          f"or below the target is in parentheses. "
          + f"Learning rates are selected on seed {sel} (fewest steps to the primary target, ties to the lower final "
          f"loss"
          + (f"; lr search: up to {study.lr_budget} lrs per method and batch, extended beyond an edge"
             if study.lr_budget else "")
          + f"); the reported seeds {summary['seeds']} then run at the selected lr only.", ""]
    for t in targets:
        md += [f"### target {t:g}" + (" (primary)" if t == primary else ""), "",
               "| method | " + " | ".join(fmt_batch(b) for b in batches) + " |", "|---|" + "---|" * len(batches)]
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
                    budget = study.step_budget(study.method(m), b)
                    cells.append(f"not reached in {budget} ({pt['reached']}/{c['seeds']})")
                else:
                    cells.append(f"{pt['steps_interp']:.1f} ({_fmt_int(pt['steps'])})")
            md.append(f"| {m} | " + " | ".join(cells) + " |")
        md.append("")
    md += ["### Selected learning rates", "", "lr (trials used; ⚠ = still on an edge of what was tried; N = GN inner "
           "steps per outer step; skipped = median skipped outer steps; η floor = share of outer steps whose line "
           "search chose its smallest step size)", "",
           "| method | " + " | ".join(fmt_batch(b) for b in batches) + " |", "|---|" + "---|" * len(batches)]
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
               f"`gn.line_search_range` extends it downwards."]
    md += _selected_settings(study, summary)
    if len(batches) > 1:
        md += _fit_lines(summary, methods)
        plot_fit(results_dir / "steps_vs_batch_fit.png", study, summary)
    else:
        md += ["", f"One batch size ({fmt_batch(batches[0])}): no fit of steps against batch size."]
    md += ["", f"### Compute and time to the primary target ({primary:g})", "",
           "FLOPs counted with torch's FlopCounterMode on each run's first step (matrix products: forward, backward, "
           "jvp, optimizer); time is the measured training wall time (evaluation excluded); tokens include GN's "
           "line-search tokens; GN inner steps are its outer steps times N, the inner steps per outer step. Medians "
           "over the seeds that reached the target; in brackets the seeds' range of time (a wide one means the "
           "machine was shared while a seed ran: `benchmarks/time_to_target.py` times every cell side by side).", "",
           "| method | batch | steps | GN inner steps | tokens | FLOPs | time (s) |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        for b in batches:
            c = summary["cells"].get(f"{m}/{b}")
            pt = c["per_target"][target_key(primary)] if c else None
            if pt is None or pt["steps_interp"] is None:
                continue
            md.append(f"| {m} | {fmt_batch(b)} | {pt['steps_interp']:.1f} | "
                      f"{_fmt_int(pt.get('inner_steps_to_target'))} | {_fmt_int(pt['tokens_to_target'])} | "
                      f"{_fmt_sci(pt['flops_to_target'])} | {_fmt_time(pt['time_to_target_s'])}"
                      f"{_time_range(pt.get('time_to_target_range'))} |")
    md += _crossover_lines(summary)
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
                cell, ref = summary["cells"].get(f"{c.name}/{b}"), summary["cells"].get(f"{c.control_of}/{b}")
                if cell is None or ref is None:
                    continue
                own = [cell["per_target"][target_key(t)]["steps_interp"] for t in targets]
                base = [ref["per_target"][target_key(t)]["steps_interp"] for t in targets]
                changes = ", ".join(f"{k}={v}" for k, v in c.overrides.items())
                steps = ["—" if v is None else f"{v:.1f}" for v in own + base]
                rises = ["—" if x.get("early_rise") is None else f"{x['early_rise']:+.3f}" for x in (cell, ref)]
                md.append(f"| {c.name} | {c.control_of} | {changes} | {fmt_batch(b)} | "
                          + " | ".join(steps[:len(targets)] + rises[:1] + steps[len(targets):] + rises[1:]) + " |")
    md += _reference_lines(study, summary)
    gn = "gn" if "gn" in families else next((m for m, f in families.items() if f == "gn"), None)
    if not any(f != "gn" for f in families.values()):
        gn = None  # no baseline to set GN against (an ablation study): the reference table above says it all
    if gn is not None:
        md += _headline_lines(summary, families, gn)
    if gn is not None and len(targets) > 1:
        plot_ratio_vs_target(results_dir / "ratio_vs_target.png", summary,
                             [m for m, f in families.items() if f == BASELINE_FAMILY], gn)
        md += ["", "### GN vs the best baseline by target depth", "", "![ratio vs target](ratio_vs_target.png)", "",
               "| batch | " + " | ".join(f"{t:g}" for t in targets) + " |", "|---|" + "---|" * len(targets)]
        for b in batches:
            cells = []
            for t in targets:
                g = summary["cells"].get(f"{gn}/{b}", {}).get("per_target", {}).get(target_key(t), {}).get(
                    "steps_interp")
                name, base = _best_baseline(summary, families, b, t)
                cells.append(f"{base / g:.2f}× ({name})" if g and math.isfinite(base) else "—")
            md.append(f"| {fmt_batch(b)} | " + " | ".join(cells) + " |")
    if gn is not None:
        md += _segment_lines(summary, gn)
    return md + [""]
