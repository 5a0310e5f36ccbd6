"""Time to a study's primary target from step times measured side by side: a check of the report's measured times.

A study's report gives each run's measured training wall time, and its time crossover compares those. On a shared
machine they carry whatever else ran at the time (another study, tests, a paused process) and runs of one study lie
hours apart. This script measures the step of every (method, batch) cell of a study at its selected point, all in
one process, interleaved over rounds so that machine noise hits every cell alike: the real trainer step
(``train.BaselineTrainer`` / ``train.GNTrainer``: a baseline step with its EMA, or a GN outer step with its N inner
steps and line search), from the study's warm start, at the run's batch and settings. The CPU time of the process
(one thread by default, so other processes do not count) and the wall time of each step are recorded; the median
over rounds, times the steps to the primary target (median over the reported seeds, ``summary.json``), is the time
to target. Then, per GN method and batch, the best baseline's time over GN's and the crossover
(``stats.crossover_batch``: where that ratio first exceeds 1), beside the same ratio from the report's measured
times. Reads ``study.yaml``, ``summary.json`` (``gnlm report`` writes it) and the warm start; trains nothing that
it keeps (the steps run in a temporary directory). Last line: one JSON object.

    python benchmarks/time_to_target.py studies/shakespeare-nano                 # every cell, 3 rounds
    python benchmarks/time_to_target.py studies/shakespeare-nano-v2 --rounds 5 --batches 4096,131072
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gnlm.stats import crossover_batch
from gnlm.report import load_results
from gnlm.results import target_key
from gnlm.run import setup_run
from gnlm.train import BaselineTrainer, GNTrainer


def selected_cells(study: Any, summary: dict[str, Any], methods: list[str] | None,
                   batches: list[int] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The cells to time: a selected point and steps to the primary target (median over the reported seeds). Controls
    are left out (they have no cell of their own in the comparison). Returns (cells, what was left out and why)."""
    primary = summary["primary_target"]
    family = {m.name: m.family for m in study.methods if m.control_of is None}
    cells, left = [], []
    for cell in summary["cells"].values():
        m, b = cell["method"], cell["batch_tokens"]
        if m not in family or (methods and m not in methods) or (batches and b not in batches):
            continue
        point = (cell.get("per_target") or {}).get(target_key(primary)) or {}
        if not cell.get("best_point") or point.get("steps_interp") is None:
            left.append(f"{m} at {b}: {'no selected point' if not cell.get('best_point') else 'target not reached'}")
            continue
        cells.append({"method": m, "family": family[m], "batch_tokens": b, "point": cell["best_point"],
                      "steps": point["steps_interp"], "measured_time_s": point.get("time_to_target_s")})
    return cells, left


def build_trainer(study: Any, results_dir: Path, cell: dict[str, Any], scratch: Path, threads: int):
    """The trainer of one cell's run (first reported seed) at its selected point, in a scratch run directory."""
    m = study.method(cell["method"])
    cfg = study.run_config(m, cell["batch_tokens"], cell["point"], study.seeds[0], results_dir)
    out_dir = scratch / cell["method"] / f"b{cell['batch_tokens']}"
    cfg = dataclasses.replace(cfg, out_dir=str(out_dir),
                              train=dataclasses.replace(cfg.train, threads=threads, progress=False))
    run = setup_run(cfg)
    return run, (GNTrainer(run) if cfg.method == "gn" else BaselineTrainer(run))


def time_cells(study: Any, results_dir: Path, cells: list[dict[str, Any]], rounds: int, warmup: int,
               threads: int) -> None:
    """Adds ``cpu_s`` and ``wall_s`` (median seconds per step over ``rounds``) to every cell, in place."""
    with tempfile.TemporaryDirectory(prefix="gnlm-time-") as tmp:
        trainers = [build_trainer(study, results_dir, cell, Path(tmp), threads) for cell in cells]
        cpu_s: list[list[float]] = [[] for _ in cells]
        wall_s: list[list[float]] = [[] for _ in cells]
        for r in range(warmup + rounds):
            for i, (cell, (run, trainer)) in enumerate(zip(cells, trainers)):
                c0, w0 = time.process_time(), time.perf_counter()
                out = trainer.step()
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                if out.diverged is not None:
                    raise SystemExit(f"{cell['method']} at {cell['batch_tokens']}: the step diverged ({out.diverged})")
                run.state["step"] += 1  # as run_loop does: schedules see the next step
                if r >= warmup:
                    cpu_s[i].append(cpu)
                    wall_s[i].append(wall)
            print(f"round {r + 1 - warmup if r >= warmup else 'warm-up'} done", file=sys.stderr, flush=True)
        for run, _ in trainers:
            if run.logger is not None:
                run.logger.close()
            if run.lock is not None:
                run.lock.release()
    for cell, cpu, wall in zip(cells, cpu_s, wall_s):
        cell["cpu_s"], cell["wall_s"] = statistics.median(cpu), statistics.median(wall)
        cell["time_s"] = cell["steps"] * cell["cpu_s"]


def compare(cells: list[dict[str, Any]], batches: list[int]) -> dict[str, Any]:
    """Per GN method: at each batch the best baseline by time (step CPU time × steps) and by the report's measured
    time, each over GN's, and the crossover of each."""
    by = {(c["method"], c["batch_tokens"]): c for c in cells}
    baselines = sorted({c["method"] for c in cells if c["family"] != "gn"})
    out: dict[str, Any] = {}
    for gn in sorted({c["method"] for c in cells if c["family"] == "gn"}):
        per_batch, ratios, measured = {}, [], []
        for b in batches:
            own = by.get((gn, b))
            base = [by[m, b] for m in baselines if (m, b) in by]
            if own is None or not base:
                ratios.append(None)
                measured.append(None)
                continue
            best = min(base, key=lambda c: c["time_s"])
            timed = [c for c in base if c["measured_time_s"] is not None]
            best_measured = min(timed, key=lambda c: c["measured_time_s"]) if timed else None
            ratio = best["time_s"] / own["time_s"]
            m_ratio = (best_measured["measured_time_s"] / own["measured_time_s"]
                       if best_measured is not None and own["measured_time_s"] else None)
            ratios.append(ratio)
            measured.append(m_ratio)
            per_batch[str(b)] = {"baseline": best["method"], "baseline_over_gn": ratio,
                                 "measured_baseline": best_measured["method"] if best_measured else None,
                                 "measured_baseline_over_gn": m_ratio}
        batch, bound = crossover_batch(batches, ratios)
        m_batch, m_bound = crossover_batch(batches, measured)
        out[gn] = {"per_batch": per_batch, "crossover": {"batch": batch, "bound": bound},
                   "measured_crossover": {"batch": m_batch, "bound": m_bound}}
    return out


def _crossover_text(x: dict[str, Any]) -> str:
    b, bound = x["batch"], x["bound"]
    if bound == "none":
        return "not compared"
    return {"at_or_below": f"≤ {b:,.0f}", "above": f"> {b:,.0f}", "exact": f"{b:,.0f}"}[bound]


def markdown(cells: list[dict[str, Any]], result: dict[str, Any], batches: list[int], target: float) -> str:
    lines = [(f"Per step (median over rounds) and to the primary target {target:g} (× median steps over the reported "
              "seeds); measured: the report's median training wall time of the reported seeds."), "",
             "| method | batch | step CPU (s) | step wall (s) | steps | time to target (s) | measured (s) |",
             "|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["method"], c["batch_tokens"])):
        measured = "—" if c["measured_time_s"] is None else f"{c['measured_time_s']:.1f}"
        lines.append(f"| {c['method']} | {c['batch_tokens']:,} | {c['cpu_s']:.4f} | {c['wall_s']:.4f} | "
                     f"{c['steps']:.1f} | {c['time_s']:.1f} | {measured} |")
    lines += ["", "Best baseline's time over GN's (above 1: GN faster); crossover: the batch from which GN is faster.",
              "", "| method | " + " | ".join(f"{b:,}" for b in batches) + " | crossover | crossover (measured) |",
              "|---|" + "---|" * (len(batches) + 2)]
    for gn, r in result.items():
        cols = []
        for b in batches:
            p = r["per_batch"].get(str(b))
            if p is None:
                cols.append("—")
                continue
            m = p["measured_baseline_over_gn"]
            cols.append(f"{p['baseline_over_gn']:.2f} ({p['baseline']}); measured "
                        f"{'—' if m is None else f'{m:.2f}'}")
        lines.append(f"| {gn} | " + " | ".join(cols) + f" | {_crossover_text(r['crossover'])} | "
                     f"{_crossover_text(r['measured_crossover'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a steps-to-target study's results directory (with summary.json)")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per cell (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per cell first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as the studies run)")
    parser.add_argument("--methods", default="", help="comma-separated methods (default: all but controls)")
    parser.add_argument("--batches", default="", help="comma-separated batch sizes in tokens (default: all)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        raise SystemExit("--rounds and --threads must be >= 1, --warmup >= 0")
    results_dir = Path(args.results)
    study, _ = load_results(results_dir)
    if study.kind != "steps_to_target":
        raise SystemExit(f"{results_dir} is a {study.kind} study; give a steps-to-target study (it has a primary "
                         "target)")
    summary_path = results_dir / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"{summary_path} does not exist; run `gnlm report {results_dir}` first")
    summary = json.loads(summary_path.read_text())
    methods = [m for m in args.methods.split(",") if m]
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        raise SystemExit(f"--batches: {args.batches!r} is not a comma-separated list of integers") from None
    known = {m.name for m in study.methods}
    if unknown := [m for m in methods if m not in known]:
        raise SystemExit(f"--methods: {', '.join(unknown)} not in the study (it has {', '.join(sorted(known))})")
    cells, left = selected_cells(study, summary, methods, batches)
    for why in left:
        print(f"left out: {why}", file=sys.stderr)
    if not cells:
        raise SystemExit("no cell has a selected point that reached the primary target; nothing to time")
    time_cells(study, results_dir, cells, args.rounds, args.warmup, args.threads)
    all_batches = sorted({c["batch_tokens"] for c in cells})
    result = compare(cells, all_batches)
    print(markdown(cells, result, all_batches, summary["primary_target"]))
    print(json.dumps({"study": summary.get("name"), "primary_target": summary["primary_target"],
                      "rounds": args.rounds, "threads": args.threads, "cells": cells, "gn": result}))


if __name__ == "__main__":
    main()
