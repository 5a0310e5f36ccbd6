"""What fair tuning changed (issue 21, item 7): two steps-to-target studies of the same model side by side, each at
its OWN primary target (the studies may share no target: another eval set, deeper targets), per batch size: the best
baseline's steps, full GN's steps and their ratio in each study.

``gnlm compare`` puts studies side by side at the targets they share and refuses when there are none; this table
compares what does carry across studies whose targets differ, the GN / best-baseline ratio, and prints the steps
beside it with each study's target named. Reads each results directory's ``study.yaml`` and ``summary.json``
(``gnlm report`` writes it; run it first on a study that is still running).

    python benchmarks/fair_tuning.py studies/shakespeare-nano studies/shakespeare-nano-v2
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import yaml

from gnlm.analysis import best_baseline
from gnlm.results import target_key
from gnlm.study import upgrade_saved_study

GN = "gn"


def headline(study_dir: Path) -> dict[str, Any]:
    """Per batch of one study at its primary target: the best baseline (name, steps), GN's steps and the ratio
    best baseline / GN (None where either did not reach the target or did not run)."""
    study = upgrade_saved_study(yaml.safe_load((study_dir / "study.yaml").read_text()))
    if study.kind != "steps_to_target":
        raise SystemExit(f"{study_dir} is a {study.kind} study; give steps-to-target studies (they have a primary "
                         "target)")
    summary = json.loads((study_dir / "summary.json").read_text())
    baselines = [m.name for m in study.methods if m.family != "gn" and m.control_of is None]
    primary, cells = summary["primary_target"], summary["cells"]
    pending = summary.get("pending_baselines", {})  # a study still running: seeds to come
    rows = {}
    for b in summary["batch_tokens"]:
        name, base = best_baseline(cells, baselines, b, primary, pending=pending)
        gn = ((cells.get(f"{GN}/{b}") or {}).get("per_target", {}).get(target_key(primary)) or {}).get("steps_interp")
        rows[b] = {"baseline": name, "baseline_steps": base if math.isfinite(base) else None, "gn_steps": gn,
                   "ratio": base / gn if gn and math.isfinite(base) else None,
                   # not reached is not the same as seeds still to come
                   "baselines_pending": bool(set(pending.get(str(b), ())) & set(baselines)
                                             or not any((cells.get(f"{m}/{b}") or {}).get("seeds", 0)
                                                        for m in baselines)),
                   "gn_ran": bool((cells.get(f"{GN}/{b}") or {}).get("seeds", 0))}
    return {"study": summary.get("name", study_dir.name), "primary_target": primary, "batches": rows}


def markdown(heads: list[dict[str, Any]]) -> str:
    def steps(v: float | None) -> str:
        return "—" if v is None else f"{v:.1f}"

    batches = sorted({b for h in heads for b in h["batches"]})
    cols = [f"`{h['study']}` (target {h['primary_target']:g})" for h in heads]
    lines = ["| batch | " + " | ".join(f"best baseline, {c}" for c in cols) + " | "
             + " | ".join(f"GN, {c}" for c in cols) + " | " + " | ".join(f"ratio, {c}" for c in cols) + " |",
             "|---|" + "---|" * (3 * len(heads))]
    for b in batches:
        cells = [h["batches"].get(b) or {} for h in heads]
        base = [f"{c['baseline']} {steps(c['baseline_steps'])}" if c.get("baseline") else
                "not run" if not c else "seeds not run yet" if c["baselines_pending"] else "none reached"
                for c in cells]
        gn = ["not run" if not c else steps(c["gn_steps"]) if c["gn_ran"] else "seeds not run yet" for c in cells]
        ratio = ["—" if c.get("ratio") is None else f"{c['ratio']:.2f}×" for c in cells]
        lines.append(f"| {b:,} | " + " | ".join(base + gn + ratio) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("studies", type=Path, nargs="+", help="results directories of steps-to-target studies")
    args = ap.parse_args()
    for d in args.studies:
        for f in ("study.yaml", "summary.json"):
            if not (d / f).exists():
                raise SystemExit(f"{d / f} is missing; give a study's results directory (run gnlm report {d} first)")
    print(markdown([headline(d) for d in args.studies]), end="")


if __name__ == "__main__":
    main()
