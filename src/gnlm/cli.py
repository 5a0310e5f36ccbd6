"""``gnlm`` command line: train, bench, report, data prepare, info."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from gnlm import __version__, bench, launch, study
from gnlm import distributed as dist
from gnlm.checkpoint import CheckpointError
from gnlm.config import ConfigError, dumps_json
from gnlm.data import describe as describe_data
from gnlm.data import prepare_data
from gnlm.model import GPT, get_preset
from gnlm.model import describe as describe_model
from gnlm.probe import add_probe_arguments, cmd_probe
from gnlm.report import write_report
from gnlm.runconfig import load_run_config
from gnlm.rundir import has_checkpoint
from gnlm.train import run_training


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args) -> int:
    """One run; under ``torchrun --nproc_per_node=N -m gnlm train ...`` every process runs this, data parallel."""
    path, overrides = _split_config_and_overrides(args.items)
    report = os.environ.get("RANK", "0") == "0"
    if path is None and not overrides:
        raise ConfigError("gnlm train needs a config: gnlm train CONFIG [key.sub=value ...] (e.g. configs/train.yaml "
                          "of the repository), or key.sub=value overrides of the built-in defaults")
    cfg = load_run_config(path, overrides)
    # printed once the run is set up: a refused run says only why
    notice = (f"gnlm: no config file given: the built-in defaults (runconfig.RunConfig) with {len(overrides)} "
              f"override(s), out_dir {cfg.out_dir}") if path is None else None
    home = Path(path).parent if path is not None and Path(path).name == "config.yaml" else None
    if (args.resume and home is not None and not any(o.startswith("out_dir=") for o in overrides)
            and (has_checkpoint(home) or (home / "metrics.jsonl").exists())
            and home.resolve() != Path(cfg.out_dir).resolve()):
        # The run's own config.yaml, in a run directory that was moved: the run lives where its config is now.
        notice = f"gnlm: resuming {home}, the run directory that holds this config (its out_dir was {cfg.out_dir})"
        cfg.out_dir = str(home)
    args.run_dir = Path(cfg.out_dir)  # for the message of a Ctrl-C
    try:
        summary = run_training(cfg, resume=args.resume, overwrite=args.overwrite, notice=notice if report else None)
        if dist.is_main():
            print(dumps_json(summary))
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
    spec = study.load_study(path, overrides)
    launch_cfg = launch.config_from_args(args)  # bad --jobs/--launcher/--slurm.* input fails here
    if args.max_runs is not None and args.max_runs < 0:
        raise ConfigError(f"--max-runs must be >= 0 (0 trains nothing), got {args.max_runs}")
    results = Path(args.results) if args.results else Path("results") / spec.name
    args.study_results = results  # for the message of a Ctrl-C

    if results.exists() and not results.is_dir():
        raise ConfigError(f"--results {results} is a file, not a directory; choose another results directory "
                          f"(gnlm never deletes it, even with --overwrite)")
    if args.warm_start_only:
        return _bench_warm_start_only(spec, results, args, launch_cfg)

    t0 = time.perf_counter()
    try:
        dist.init(str(spec.base.get("train", {}).get("device", "auto")))
        main = dist.is_main()
        rows = bench.run_study(spec, results, max_runs=args.max_runs, report=not args.no_report,
                               launch_cfg=launch_cfg, retry_failed=args.retry_failed, overwrite=args.overwrite)
        dist.barrier()  # no rank tears the process group down while another still uses it
    finally:
        dist.destroy()
    failed = [r for r in rows if r.failed]
    if main:
        print(f"gnlm bench: {len(rows)} runs recorded in {results} ({time.perf_counter() - t0:.0f} s this "
              f"session)", file=sys.stderr)
        if failed:
            print(f"gnlm bench: {len(failed)} of {len(rows)} runs failed (first: {failed[0].run_id}: "
                  f"{failed[0].error}); fix the cause and run the same command with --retry-failed",
                  file=sys.stderr)
    return 1 if failed else 0


def _bench_warm_start_only(spec: study.StudyConfig, results: Path, args: argparse.Namespace,
                           launch_cfg: launch.LaunchConfig) -> int:
    """``gnlm bench STUDY --warm-start-only``: the study's warm start, trained here, and its eval loss."""
    runs_flags = [flag for flag, given in (("--max-runs", args.max_runs is not None),
                                           ("--retry-failed", args.retry_failed),
                                           ("--launcher slurm", launch_cfg.launcher == "slurm")) if given]
    if runs_flags:
        raise ConfigError(f"--warm-start-only trains the warm start in this process and no run; drop "
                          f"{runs_flags[0]}")
    try:
        summary = bench.warm_start_only(spec, results, overwrite=args.overwrite)
        main = dist.is_main()
        dist.barrier()  # no rank tears the process group down while another still uses it
    finally:
        dist.destroy()
    if main:
        loss, se = summary["final_eval_loss"], summary.get("final_eval_loss_se")
        noise = (f" ± {se:.4f} (standard error over {summary['eval_sequences']:,} sequences, "
                 f"{summary['eval_tokens']:,} tokens)" if se is not None else " (no standard error recorded)")
        print(f"warm start {results / 'warm_start'}: eval loss {loss:.4f}{noise}")
        if spec.kind == "steps_to_target" and loss <= max(spec.targets):
            print(f"gnlm bench: note: target {max(spec.targets)} is already met by the warm start; gnlm bench will "
                  f"refuse this study until its targets lie below {loss:.4f}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gnlm.compare import run_compare

    print(run_compare(args.results_dirs, args.out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    try:
        print(write_report(args.results_dir))
    except OSError as e:  # the inputs are checked where they are read: this is an output in the way
        raise ConfigError(f"cannot write the report in {args.results_dir}: {e.filename2 or e.filename} "
                          f"({e.strerror}); move it away or make the directory writable") from None
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, like every other bad input (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"gnlm: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gnlm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gnlm {__version__}")
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
                   help=f"a study YAML file or a packaged preset ({', '.join(study.preset_names())}; default quick), "
                        f"then dotted overrides such as max_steps=50 or base.train.threads=2")
    p.add_argument("--results", metavar="DIR", help="results directory (default results/<study name>)")
    p.add_argument("--overwrite", action="store_true", help="delete the results directory first and start afresh")
    p.add_argument("--max-runs", type=int, default=None, metavar="N",
                   help="stop after N new runs (start the same command again to continue)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--retry-failed", action="store_true",
                   help="run again the runs that failed (status error); their old rows move to runs.failed.jsonl")
    p.add_argument("--warm-start-only", action="store_true",
                   help="train (or resume, or find done) the study's shared warm start, print its eval loss and "
                        "stop: no run is planned or trained")
    launch.add_arguments(p)  # --jobs N, --launcher local|slurm, --slurm.KEY=VALUE
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="write report.md and figures from a results directory (never trains)")
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="put two or more studies side by side: steps, FLOPs and time to shared targets")
    p.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR")
    p.add_argument("--out", default="compare", help="output directory (default ./compare)")
    p.set_defaults(func=cmd_compare)
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
        if report:
            print(_interrupted(args), file=sys.stderr)
        return 130


def _interrupted(args: argparse.Namespace) -> str:
    """The Ctrl-C message: what there is to continue from. It names a checkpoint only when one exists."""
    run_dir = getattr(args, "run_dir", None)
    if run_dir is not None:
        ckpt = next((p for p in (run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt") if p.is_file()), None)
        if ckpt is not None:
            return (f"gnlm: interrupted; continue from the last checkpoint ({ckpt}) with the same command and "
                    f"--resume; the metrics written so far are kept")
        return (f"gnlm: interrupted before the run's first checkpoint: there is nothing to resume in {run_dir}; "
                f"start it again (--overwrite replaces what it wrote; train.checkpoint_every_seconds sets how "
                f"often a run checkpoints)")
    results = getattr(args, "study_results", None)
    if results is not None:
        return (f"gnlm: interrupted; finished runs are recorded in {results / 'runs.jsonl'}; the same command "
                f"continues the study (unfinished runs resume from their checkpoints)")
    return "gnlm: interrupted"


if __name__ == "__main__":
    sys.exit(main())
