"""Data-parallel scaling: tokens/s of a baseline step (DDP) and of a GN inner step (bare module + all-reduce)
for 1, 2, ... processes at the same global batch.

    python benchmarks/ddp_scaling.py                       # CPU, gloo, 1 and 2 processes, micro preset
    python benchmarks/ddp_scaling.py --nprocs 1 2 4 --model 45m --batch 32 --device cuda

Each configuration runs under ``torch.distributed.run`` (this file re-launches itself as the worker). A process
uses ``--threads`` CPU threads (default 1), so on a machine with fewer cores than processes the numbers measure
contention, not scaling. The last line printed is one JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def worker(args) -> None:
    import torch

    from gnlm import distributed as dist
    from gnlm.curvature import surrogate_grad
    from gnlm.model import GPT, get_preset, loss_fn
    from gnlm.optim import OptimConfig, build_optimizer, clip_grad_norm

    torch.set_num_threads(args.threads)
    dist.init(args.device)
    rank, world = dist.rank(), dist.world_size()
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{dist.local_rank()}")
    torch.manual_seed(0)
    cfg = get_preset(args.model)
    model = GPT(cfg).to(device)
    local = args.batch // world
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randint(0, cfg.vocab_size, (local, args.seq), generator=gen).to(device)
    y = torch.randint(0, cfg.vocab_size, (local, args.seq), generator=gen).to(device)
    tokens = args.batch * args.seq

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    def timed(step, n: int) -> float:
        for _ in range(args.warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return (time.perf_counter() - t0) / n

    # baseline: DDP forward/backward (gradients averaged by DDP) + AdamW step
    params = dict(model.named_parameters())
    opt = build_optimizer(params, OptimConfig(name="adamw", lr=1e-4))
    fwd = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def baseline_step() -> None:
        loss_fn(fwd(x), y).backward()
        clip_grad_norm(opt, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_base = timed(baseline_step, args.steps)

    # GN inner step: surrogate gradient on the shard, all-reduce, inner AdamW step on φ
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    phi = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    inner = build_optimizer(phi, OptimConfig(name="adamw", lr=1e-4))

    def gn_inner_step() -> None:
        loss, grads = surrogate_grad(model, theta0, {n: p.detach() for n, p in phi.items()}, x, y, kind="gn")
        if world > 1:
            dist.all_reduce_mean([*grads.values(), loss.clone()])
        for n, p in phi.items():
            p.grad = grads[n]
        clip_grad_norm(inner, 1.0)
        inner.step()
        inner.zero_grad(set_to_none=True)

    t_gn = timed(gn_inner_step, args.steps)
    if rank == 0:
        print(json.dumps({"nproc": world, "baseline_step_s": t_base, "baseline_tokens_per_s": tokens / t_base,
                          "gn_inner_step_s": t_gn, "gn_inner_tokens_per_s": tokens / t_gn}), flush=True)
    dist.destroy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="micro", help="preset: nano, micro, 45m, 150m")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    results = []
    for n in args.nprocs:
        if args.batch % n:
            sys.exit(f"--batch {args.batch} is not divisible by {n} processes")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}",
               os.path.abspath(__file__), "--worker", "--model", args.model, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--device", args.device]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{n} processes failed:\n{proc.stderr[-3000:]}")
        row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        results.append(row)
        print(f"{n} proc: baseline {row['baseline_tokens_per_s']:,.0f} tok/s ({row['baseline_step_s'] * 1e3:.1f} ms), "
              f"GN inner {row['gn_inner_tokens_per_s']:,.0f} tok/s ({row['gn_inner_step_s'] * 1e3:.1f} ms)", flush=True)
    base = results[0]
    out = {"model": args.model, "global_batch": args.batch, "seq_len": args.seq, "device": args.device,
           "threads_per_process": args.threads, "cpu_count": os.cpu_count(), "results": results,
           "speedup": {str(r["nproc"]): {"baseline": r["baseline_tokens_per_s"] / base["baseline_tokens_per_s"],
                                         "gn_inner": r["gn_inner_tokens_per_s"] / base["gn_inner_tokens_per_s"]}
                       for r in results}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
