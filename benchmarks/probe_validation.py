"""Does `gnlm probe` predict what a study measured? (issue 17, item 4)

At every batch size of a finished steps-to-target study, probe the study's warm start with each baseline at the
learning rate the study selected there, next to the layerwise GN reference; then rank-correlate each probe measure
with the steps the study measured to its primary target (median over the reported seeds): the baselines'
own steps, and the ``gn_layerwise`` method's steps for the layerwise reference. A useful measure correlates
negatively (a higher score, fewer steps). Spearman with a 90% bootstrap interval over the points
(:func:`gnlm.stats.rank_correlation`), per batch (few points: read the interval) and pooled over batches.
Writes ``validation.json`` and ``validation.md`` into ``--out`` (each batch's probe output in ``--out/b<batch>/``)
and prints the table; publish it whatever it says.

    python benchmarks/probe_validation.py studies/shakespeare-nano --out results/probe-validation
    python benchmarks/probe_validation.py studies/shakespeare-nano --damping-grid 1e-2,1e-1,1 --probe-batches 2
    # two processes, then the table from both
    python benchmarks/probe_validation.py studies/shakespeare-nano --batches 2048,32768 --out results/pv &
    python benchmarks/probe_validation.py studies/shakespeare-nano --batches 4096,8192,16384 --out results/pv
    python benchmarks/probe_validation.py studies/shakespeare-nano --reuse --out results/pv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from gnlm.stats import rank_correlation
from gnlm.config import dumps_json
from gnlm.probe import run_probe
from gnlm.results import target_key
from gnlm.study import upgrade_saved_study

# the probe's scores of a direction (probe.json): higher should mean closer to the oracle, so fewer steps; the first
# three at λ* (or --damping), rho_fixed at --fixed-damping (where the sweep solved it)
MEASURES = ("rho", "step_efficiency", "real_loss_fraction", "rho_fixed")
LAYERWISE_METHOD = "gn_layerwise"  # the study method whose measured steps stand beside the layerwise reference


def measured_steps(summary: dict[str, Any], method: str, batch: int, target: float) -> float | None:
    """Median steps to ``target`` over the reported seeds (None: not reached or not run)."""
    cell = summary["cells"].get(f"{method}/{batch}") or {}
    entry = (cell.get("per_target") or {}).get(target_key(target)) or {}
    return entry.get("steps_interp") if entry.get("reached") else None


def points_of(probe: dict[str, Any], summary: dict[str, Any], batch: int, target: float,
              fixed_damping: float | None = None) -> list[dict[str, Any]]:
    """One point per scored direction with measured steps: the baselines, and the layerwise reference; ρ at
    ``fixed_damping`` too where the probe solved that λ."""
    fixed = next((d["rho"] for d in probe["by_damping"] if d["damping"] == fixed_damping), None)
    out = []
    scored = [(name, name, entry) for name, entry in probe["optimizers"].items()]
    scored.append((LAYERWISE_METHOD, "layerwise", probe["references"]["layerwise"]))
    for method, key, entry in scored:
        steps = measured_steps(summary, method, batch, target)
        if steps is None:
            continue
        point = {"batch": batch, "method": method, "steps": steps, "damping": probe["damping"],
                 **{m: entry[m] for m in MEASURES if entry.get(m) is not None}}
        if fixed is not None:
            point["rho_fixed"] = fixed[key]
        out.append(point)
    return out


def correlations(points: list[dict[str, Any]], batches: list[int], bootstrap: int) -> dict[str, Any]:
    """Per measure: per batch and pooled Spearman (measure vs steps) with its interval."""
    out: dict[str, Any] = {}
    for m in MEASURES:
        have = [p for p in points if m in p]
        per = {str(b): rank_correlation([p[m] for p in have if p["batch"] == b],
                                        [p["steps"] for p in have if p["batch"] == b], n=bootstrap)
               for b in batches}
        out[m] = {"per_batch": per, "pooled": rank_correlation([p[m] for p in have], [p["steps"] for p in have],
                                                               n=bootstrap)}
    return out


def markdown(result: dict[str, Any]) -> str:
    def fmt(c: dict[str, Any]) -> str:
        if c["spearman"] is None:
            return f"— (n = {c['n']})"
        lo, hi = c["interval"]
        return f"{c['spearman']:+.2f} [{lo:+.2f}, {hi:+.2f}] (n = {c['n']})"

    batches = result["batches"]
    md = [f"# Probe vs measured steps: `{result['study']}`", "",
          f"Spearman rank correlation between each probe measure at the warm start and the steps to the primary "
          f"target {result['primary_target']:g} (median over seeds {result['seeds']}), 90% bootstrap interval over "
          f"points; negative = a higher score goes with fewer steps. {result['probe_batches']} probe batches per "
          f"batch size; damping {result['damping']}; rho_fixed = ρ at λ = {result['fixed_damping']:g}; "
          f"{result['wall_time']:.0f} s of probing in all.", "",
          "| measure | " + " | ".join(f"{b:,}" for b in batches) + " | pooled |", "|---|" + "---|" * (len(batches) + 1)]
    for m, c in result["correlations"].items():
        md.append(f"| {m} | " + " | ".join(fmt(c["per_batch"][str(b)]) for b in batches) + f" | {fmt(c['pooled'])} |")
    md += ["", "| batch | λ* | method | steps | " + " | ".join(MEASURES) + " |",
           "|---|---|---|---|" + "---|" * len(MEASURES)]
    for p in result["points"]:
        md.append(f"| {p['batch']:,} | {p['damping']:g} | {p['method']} | {p['steps']:.1f} | "
                  + " | ".join(f"{p[m]:.3f}" if m in p else "—" for m in MEASURES) + " |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", type=Path, help="a finished steps-to-target study's results directory")
    ap.add_argument("--out", type=Path, default=Path("results/probe-validation"))
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: every batch of the study)")
    ap.add_argument("--probe-batches", type=int, default=4)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--damping-grid", default=None, help="gnlm probe's λ grid (default: its own), e.g. 1e-2,1e-1,1")
    ap.add_argument("--damping", type=float, default=None, help="a fixed λ instead of the calibrated one")
    ap.add_argument("--full-sweep", action="store_true", help="gnlm probe --full-sweep: solve every λ of the grid")
    ap.add_argument("--fixed-damping", type=float, default=1e-3,
                    help="also correlate ρ at this λ (rho_fixed; default 1e-3, the probe's former fixed default), "
                         "where the sweep solved it")
    ap.add_argument("--reuse", action="store_true",
                    help="read a batch's probe from --out/b<batch>/probe.json when it is there (a resumed or "
                         "split validation: run batches in parallel with --batches, then once with --reuse)")
    args = ap.parse_args()
    study = upgrade_saved_study(yaml.safe_load((args.study / "study.yaml").read_text()))  # any gnlm version's
    summary = json.loads((args.study / "summary.json").read_text())
    batches = [int(b) for b in args.batches.split(",")] if args.batches else list(study.batch_tokens)
    baselines = [m.name for m in study.methods if m.family != "gn" and m.control_of is None]
    points, wall = [], 0.0
    for b in batches:
        saved = args.out / f"b{b}" / "probe.json"
        if args.reuse and saved.exists():
            probe = json.loads(saved.read_text())
            asked = {"probe_batches": args.probe_batches, "full_sweep": args.full_sweep,
                     "damping_fixed": args.damping is not None}
            differs = {k: probe.get(k) for k, v in asked.items() if probe.get(k) != v}
            if differs:
                raise SystemExit(f"{saved} was probed with {differs}, not {asked}; drop --reuse or the file")
        else:
            probe = run_probe(args.study, optimizers=baselines, batch_tokens=b, probe_batches=args.probe_batches,
                              out=args.out / f"b{b}", threads=args.threads, progress=False, damping=args.damping,
                              damping_grid=args.damping_grid, full_sweep=args.full_sweep)
        wall += probe["wall_time"]
        points += points_of(probe, summary, b, study.primary_target, args.fixed_damping)
    result = {"study": str(args.study), "primary_target": study.primary_target, "seeds": list(study.seeds),
              "batches": batches, "probe_batches": args.probe_batches, "full_sweep": args.full_sweep,
              "damping": "fixed" if args.damping is not None else "calibrated", "fixed_damping": args.fixed_damping,
              "points": points, "correlations": correlations(points, batches, args.bootstrap), "wall_time": wall}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation.json").write_text(dumps_json(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "validation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
