"""``gnlm`` command line: train, bench, report, data prepare, info."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from gnlm import bench
from gnlm import distributed as dist
from gnlm.checkpoint import CheckpointError
from gnlm.config import ConfigError
from gnlm.data import describe as describe_data
from gnlm.data import prepare_data
from gnlm.model import GPT, get_preset
from gnlm.model import describe as describe_model
from gnlm.probe import add_probe_arguments, cmd_probe
from gnlm.report import write_report
from gnlm.runconfig import load_run_config
from gnlm.train import run_training


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args) -> int:
    """One run; under ``torchrun --nproc_per_node=N -m gnlm train ...`` every process runs this, data parallel."""
    path, overrides = _split_config_and_overrides(args.items)
    cfg = load_run_config(path, overrides)
    try:
        summary = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
        if dist.is_main():
            print(json.dumps(summary))
        dist.barrier()  # no rank tears the process group down while another still uses it
    finally:
        dist.destroy()
    return 1 if summary.get("diverged") else 0


def cmd_data_prepare(args) -> int:
    path, overrides = _split_config_and_overrides(args.items)
    cfg = load_run_config(path, overrides)
    prepared = prepare_data(cfg.data, progress=True)
    print(describe_data(prepared))
    return 0


def cmd_info(args) -> int:
    with torch.device("meta"):  # shapes and counts only: no memory, no init compute
        model = GPT(get_preset(args.model))
    print(describe_model(model))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    path, overrides = _split_config_and_overrides(args.items)
    study = bench.load_study(path, overrides)
    results = Path(args.results) if args.results else Path("results") / study.name

    def overwrite() -> None:
        if args.overwrite and results.exists():
            if not (results / "study.yaml").exists() and any(results.iterdir()):
                raise ConfigError(f"--overwrite: {results} is not a gnlm results directory (no study.yaml); "
                                  f"refusing to delete it")
            shutil.rmtree(results)

    t0 = time.perf_counter()
    try:
        dist.init(str(study.base.get("train", {}).get("device", "auto")))
        main = dist.is_main()
        dist.main_first(overwrite)
        rows = bench.run_study(study, results, max_runs=args.max_runs, report=not args.no_report)
        dist.barrier()  # no rank tears the process group down while another still uses it
    finally:
        dist.destroy()
    if main:
        print(f"gnlm bench: {len(rows)} runs recorded in {results} ({time.perf_counter() - t0:.0f} s this "
              f"session)", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(write_report(args.results_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gnlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run (baseline optimizer or Gauss-Newton) from a YAML config")
    p.add_argument("items", nargs="*", metavar="CONFIG [key.sub=value ...]",
                   help="a YAML config file, then dotted overrides such as optim.lr=3e-3")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing out_dir and start afresh")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="data utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    pp = dsub.add_parser("prepare", help="tokenize a corpus into token shards and a fixed evaluation set")
    pp.add_argument("items", nargs="*", metavar="CONFIG [key.sub=value ...]")
    pp.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("info", help="print a model preset's exact parameter count and parameter shapes")
    p.add_argument("--model", default="micro", help="preset name: nano, micro, 45m, 150m")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("probe", help="score AdamW/Muon/SOAP steps against the exact GN and layerwise-GN steps")
    add_probe_arguments(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("bench", help="run a benchmark study: steps to a target loss across batch sizes")
    p.add_argument("items", nargs="*", metavar="STUDY [key.sub=value ...]",
                   help=f"a study YAML file or a packaged preset ({', '.join(bench.preset_names())}; default quick), "
                        f"then dotted overrides such as max_steps=50 or base.train.threads=2")
    p.add_argument("--results", metavar="DIR", help="results directory (default results/<study name>)")
    p.add_argument("--overwrite", action="store_true", help="delete the results directory first and start afresh")
    p.add_argument("--max-runs", type=int, default=None, metavar="N",
                   help="stop after N new runs (start the same command again to continue)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="write report.md and figures from a results directory (never trains)")
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after --flags
    unknown = [e for e in extra if e.startswith("-") or not hasattr(args, "items")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.items = [*args.items, *extra]
    # Under torchrun every rank meets the same error; rank 0 reports it.
    report = os.environ.get("RANK", "0") == "0"
    try:
        return args.func(args)
    except ConfigError as e:
        if report:
            print(f"gnlm: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        if report:
            print(f"gnlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gnlm: interrupted; the last checkpoint and the metrics written so far are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
