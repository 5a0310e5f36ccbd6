"""``gnlm`` command line: train, bench, report, data prepare, info."""

from __future__ import annotations

import argparse
import json
import os
import sys

from gnlm.config import ConfigError


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args) -> int:
    """One run; under ``torchrun --nproc_per_node=N -m gnlm train ...`` every process runs this, data parallel."""
    from gnlm import distributed as dist
    from gnlm.runconfig import load_run_config
    from gnlm.train import run_training

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
    from gnlm.data import describe, prepare_data
    from gnlm.runconfig import load_run_config

    path, overrides = _split_config_and_overrides(args.items)
    cfg = load_run_config(path, overrides)
    prepared = prepare_data(cfg.data, progress=True)
    print(describe(prepared))
    return 0


def cmd_info(args) -> int:
    import torch

    from gnlm.model import GPT, describe, get_preset

    with torch.device("meta"):  # shapes and counts only: no memory, no init compute
        model = GPT(get_preset(args.model))
    print(describe(model))
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

    from gnlm.bench import add_bench_parsers

    add_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after --flags
    unknown = [e for e in extra if e.startswith("-") or not hasattr(args, "items")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.items = [*args.items, *extra]
    from gnlm.checkpoint import CheckpointError

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
