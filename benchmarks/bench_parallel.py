"""``gnlm bench --jobs 1`` against ``--jobs 2`` on the same study, side by side in one run: the wall time of the
whole command (warm start included), their ratio, and how busy the machine was with other work meanwhile.

    python benchmarks/bench_parallel.py                          # the quick preset, as packaged (48 runs)
    python benchmarks/bench_parallel.py --order 1 2 2 1          # ABBA: cancels a drift in machine load
    python benchmarks/bench_parallel.py max_steps=8              # a shrunk quick study (any study override)

Each command is a fresh results directory (``--overwrite``, ``--no-report``); the data is prepared once before
the first. ``--jobs 2`` gives each worker ``cores // 2`` threads, ``--jobs 1`` runs with the preset's
``train.threads`` (2 in quick). Other load is measured from ``/proc/stat``: all busy CPU time on the machine
minus the CPU time of the benchmarked command and its processes, per second of wall time (in cores). The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat; 0 where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def prepare(study: str, overrides: list[str]) -> None:
    from gnlm.data import prepare_data
    from gnlm.plan import plan_runs
    from gnlm.study import load_study

    spec = plan_runs(load_study(study, overrides), tempfile.mkdtemp(), [])[0][0]
    prepare_data(spec.run_config().data, progress=True)


def timed_bench(study: str, overrides: list[str], jobs: int, results: Path) -> dict:
    cmd = [sys.executable, "-m", "gnlm", "bench", study, *overrides, "progress=false", "--results", str(results),
           "--overwrite", "--no-report", "--jobs", str(jobs)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    load0, busy0, ours0, t0 = loadavg(), busy_seconds(), children_cpu(), time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    busy, ours = busy_seconds() - busy0, children_cpu() - ours0
    if out.returncode != 0:
        sys.exit(f"bench_parallel: {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (results / "runs.jsonl").read_text().splitlines()]
    warm = results / "warm_start" / "summary.json"
    return {"jobs": jobs, "wall_s": round(wall, 2), "cpu_s": round(ours, 1),
            "other_load_cores": round(max(0.0, busy - ours) / wall, 2), "loadavg_before": load0,
            "warm_start_s": round(json.loads(warm.read_text())["wall_time"], 2) if warm.exists() else 0.0,
            "runs": len(rows), "failed": sum(r["status"] == "error" for r in rows),
            "reached": sum(bool(r["reached"]) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="study overrides, e.g. max_steps=8")
    parser.add_argument("--study", default="quick", help="a study preset or YAML file (default quick)")
    parser.add_argument("--order", type=int, nargs="+", default=[1, 2], help="--jobs values in the order run")
    parser.add_argument("--results", default=None, help="where the results directories go (default: a temp dir)")
    args = parser.parse_args()
    root = Path(args.results or tempfile.mkdtemp(prefix="bench_parallel-"))
    print(f"cores: {len(os.sched_getaffinity(0))}; study {args.study} {' '.join(args.overrides)}; "
          f"results under {root}", flush=True)
    prepare(args.study, args.overrides)
    measured = []
    for i, jobs in enumerate(args.order):
        m = timed_bench(args.study, args.overrides, jobs, root / f"{i}-jobs{jobs}")
        measured.append(m)
        print(f"--jobs {jobs}: {m['wall_s']:.1f} s wall ({m['runs']} runs, {m['failed']} failed, "
              f"{m['reached']} reached the target; warm start {m['warm_start_s']:.1f} s), "
              f"other work on the machine {m['other_load_cores']:.2f} cores, load average before "
              f"{m['loadavg_before']:.2f}", flush=True)

    def mean_wall(jobs: int) -> float:
        walls = [m["wall_s"] for m in measured if m["jobs"] == jobs]
        return sum(walls) / len(walls) if walls else float("nan")

    ratio = mean_wall(2) / mean_wall(1)
    print(f"--jobs 2 / --jobs 1 wall time: {ratio:.3f} (goal <= 0.75)")
    print(json.dumps({"study": args.study, "overrides": args.overrides, "cores": len(os.sched_getaffinity(0)),
                      "jobs1_s": round(mean_wall(1), 2), "jobs2_s": round(mean_wall(2), 2),
                      "ratio_jobs2_over_jobs1": round(ratio, 3),
                      "mean_other_load_cores": round(sum(m["other_load_cores"] for m in measured) / len(measured), 2),
                      "measurements": measured}))


if __name__ == "__main__":
    main()
