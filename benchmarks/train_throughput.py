"""Tokens/s of one training step (forward, backward, clip, optimizer step) of each baseline optimizer.

The optimizers are timed interleaved (round-robin over rounds) on the same batch and the median is reported, so
machine noise hits all of them alike. Last line: one JSON object.

    python benchmarks/train_throughput.py                       # micro preset, CPU
    python benchmarks/train_throughput.py --preset 45m --device cuda --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gnlm.model import GPT, get_preset, loss_fn
from gnlm.optim import OptimConfig, build_optimizer, clip_grad_norm

OPTIMIZERS = {"adamw": 3e-3, "muon": 2e-2, "soap": 3e-3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    setups = {}
    for name, lr in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        ocfg = OptimConfig(name=name, lr=lr)
        setups[name] = (model, build_optimizer(dict(model.named_parameters()), ocfg))

    def step(model, opt):
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        clip_grad_norm(opt, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in setups}
    for name, (model, opt) in setups.items():  # warm-up (SOAP's first step initialises its preconditioner)
        for _ in range(2):
            step(model, opt)
    for _ in range(args.rounds):
        for name, (model, opt) in setups.items():
            sync()
            t0 = time.perf_counter()
            step(model, opt)
            sync()
            times[name].append(time.perf_counter() - t0)

    tokens = args.batch * args.seq
    result = {"preset": args.preset, "device": str(device), "batch": args.batch, "seq": args.seq,
              "threads": args.threads}
    print(f"{'optimizer':<10}{'ms/step':>10}{'tokens/s':>12}")
    for name, ts in times.items():
        med = statistics.median(ts)
        result[f"{name}_tokens_per_s"] = round(tokens / med, 1)
        print(f"{name:<10}{med * 1e3:>10.1f}{tokens / med:>12,.0f}")
    for name in ("muon", "soap"):
        result[f"{name}_vs_adamw_time"] = round(result["adamw_tokens_per_s"] / result[f"{name}_tokens_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
