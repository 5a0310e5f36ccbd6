"""Share of a run's wall time spent evaluating: the nano model of the published study (512-token BPE, seq 64) at a
small batch, with a 64K-token eval set spread over the whole held-out split, evaluated every step and every
``--eval-every-tokens`` training tokens. Last line: one JSON object.

    python benchmarks/eval_cost.py                               # 2,048-token batches, 40 steps, 1 thread
    python benchmarks/eval_cost.py --batch-tokens 32768 --steps 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from gnlm import run as run_module
from gnlm.runconfig import load_run_config
from gnlm.train import run_training


def measure(out_dir: Path, args: argparse.Namespace, eval_every_tokens: int | None) -> dict[str, float]:
    """One AdamW run; the seconds spent in evaluation (timed around ``Run.evaluate``) and in the whole run."""
    seq = 64
    cfg = load_run_config(None, [
        f"out_dir={out_dir}", "model=nano", "model.vocab_size=512", "model.max_seq_len=64", "data.vocab_size=512",
        f"data.seq_len={seq}", f"data.eval_sequences={args.eval_tokens // seq}", "data.eval_sampling=spread",
        f"train.batch_size={args.batch_tokens // seq}", f"train.steps={args.steps}", "train.eval_every=1",
        f"train.eval_every_tokens={'null' if eval_every_tokens is None else eval_every_tokens}",
        "train.eval_batch_size=64", f"train.threads={args.threads}", "train.progress=false", "optim.lr=0.01"])
    spent = {"eval": 0.0, "evaluations": 0}
    evaluate = run_module.Run.evaluate

    def timed(self):
        t0 = time.perf_counter()
        out = evaluate(self)
        spent["eval"] += time.perf_counter() - t0
        spent["evaluations"] += 1
        return out

    run_module.Run.evaluate = timed
    try:
        t0 = time.perf_counter()
        run_training(cfg, overwrite=True)
        total = time.perf_counter() - t0
    finally:
        run_module.Run.evaluate = evaluate
    return {"eval_s": spent["eval"], "total_s": total, "evaluations": spent["evaluations"],
            "eval_share": spent["eval"] / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--eval-every-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measure(Path(tmp) / "warm-up", args, None)  # data prepared, caches warm
        every_step = measure(Path(tmp) / "every-step", args, None)
        by_tokens = measure(Path(tmp) / "by-tokens", args, args.eval_every_tokens)
    for name, m in (("every step", every_step), (f"every {args.eval_every_tokens:,} tokens", by_tokens)):
        print(f"{name}: {m['evaluations']} evaluations, {m['eval_s']:.2f} s of {m['total_s']:.2f} s "
              f"({100 * m['eval_share']:.0f}%)")
    print(json.dumps({"batch_tokens": args.batch_tokens, "steps": args.steps, "eval_tokens": args.eval_tokens,
                      "eval_every_tokens": args.eval_every_tokens, "every_step": every_step,
                      "by_tokens": by_tokens}))


if __name__ == "__main__":
    main()
