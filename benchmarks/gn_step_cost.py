"""Cost of one GN inner step against one AdamW step (time and peak memory). Not a test.

Three steps on the same model, batch and attention backend ("math" for all, since GN needs it):
  adamw      forward + backward + AdamW step on θ
  gn         surrogate_grad (full GN: one jvp + one transposed jvp) + AdamW step on φ
  layerwise  surrogate_grad with default_blocks (n_layers + 2 blocks) + AdamW step on φ

Time: the three are interleaved, ``--rounds`` times after 2 warm-up rounds; the median is reported.
Peak memory: each step kind runs in a fresh subprocess that builds the batch, notes its memory, then builds the
model, the optimizer and the GN state (θ₀, φ) and runs 2 steps. Reported: peak minus the noted baseline, i.e.
parameters + optimizer/solver state + the step's transient peak. On CUDA this is ``torch.cuda.max_memory_allocated``;
on CPU it is the peak resident set size (VmHWM, reset through ``/proc/self/clear_refs`` after the baseline) with glibc's mmap threshold fixed at
64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors go back to the OS and the RSS tracks live tensors.

``--measure-fe`` also prints the forward-pass equivalents that ``gnlm.accounting`` uses (BENCHMARKS.md, "Compute accounting").

The LAST line printed is one JSON object (gn_vs_adamw_time, gn_vs_adamw_memory, layerwise_vs_gn_time, blocks, ...).

    python benchmarks/gn_step_cost.py                       # micro preset on CPU, batch 8×128, 1 thread
    python benchmarks/gn_step_cost.py --device cuda --preset 45m --batch 8 --seq 1024
    python benchmarks/gn_step_cost.py --layers 8 --measure-fe    # a deeper micro; per-block costs too
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def build(args, kind: str):
    from gnlm.curvature import default_blocks, surrogate_grad
    from gnlm.model import GPT, get_preset, loss_fn

    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = get_preset(args.preset, max_seq_len=max(args.seq, get_preset(args.preset).max_seq_len),
                     **({"n_layers": args.layers} if args.layers else {}))
    model = GPT(cfg).to(dev)
    model.attention = "math"
    V = cfg.vocab_size
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (args.batch, args.seq), generator=gen).to(dev)
    y = torch.randint(0, V, (args.batch, args.seq), generator=gen).to(dev)
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        return step, None
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.requires_grad_(False)
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in theta0.items()}
    opt = torch.optim.AdamW(phi.values(), lr=1e-4)
    blocks = default_blocks(model) if kind == "layerwise" else None

    def step():
        _, grads = surrogate_grad(model, theta0, {k: p.detach() for k, p in phi.items()}, x, y, kind="gn",
                                  blocks=blocks)
        for k, p in phi.items():
            p.grad = grads[k]
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, blocks


def sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(args) -> None:
    """Run in a subprocess: print the peak bytes of one step kind (see the module docstring)."""
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss()
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
            f.write("5")
    step, _ = build(args, args.memory_child)
    for _ in range(2):
        step()
    sync(args)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    print(json.dumps({"peak_bytes": peak - base}))


def measure_memory(args, kind: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--device", args.device, "--preset", args.preset, "--batch", str(args.batch),
           "--seq", str(args.seq), "--threads", str(args.threads), "--layers", str(args.layers or 0),
           "--memory-child", kind]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"] / 2**20


def measure_fe(args) -> None:
    """Forward-pass equivalents of the building blocks (median times / forward time)."""
    from torch.func import functional_call, jvp

    from gnlm.curvature import default_blocks, ggn_vector_product, math_attention, surrogate_grad
    from gnlm.model import loss_fn

    from gnlm.model import GPT, get_preset

    torch.manual_seed(0)
    cfg = get_preset(args.preset, max_seq_len=max(args.seq, get_preset(args.preset).max_seq_len),
                     **({"n_layers": args.layers} if args.layers else {}))
    model = GPT(cfg).to(args.device)
    model.attention = "math"
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    p0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    d = {k: 1e-3 * torch.randn_like(v) for k, v in p0.items()}
    phi = {k: p0[k] + d[k] for k in p0}
    blocks = default_blocks(model)

    def fwd():
        with torch.no_grad():
            model(x)

    def fwdbwd():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def jv():
        with math_attention(model), torch.no_grad():
            jvp(lambda p: functional_call(model, p, (x,)), (p0,), (d,))

    ops = {"forward": fwd, "forward_backward": fwdbwd, "jvp": jv,
           "gn": lambda: surrogate_grad(model, p0, phi, x, y, kind="gn"),
           "prox_linear": lambda: surrogate_grad(model, p0, phi, x, y, kind="prox_linear"),
           "ggn_vector_product": lambda: ggn_vector_product(model, p0, x, y, d),
           "layerwise_gn": lambda: surrogate_grad(model, p0, phi, x, y, kind="gn", blocks=blocks)}
    times = {k: [] for k in ops}
    for r in range(7):
        for k, fn in ops.items():
            sync(args)
            t = time.perf_counter()
            fn()
            sync(args)
            if r >= 2:
                times[k].append(time.perf_counter() - t)
    f = statistics.median(times["forward"])
    print("forward-pass equivalents (median time / forward time):")
    for k, v in times.items():
        print(f"  {k:<20} {1000 * statistics.median(v):8.1f} ms  {statistics.median(v) / f:5.2f} F")
    print(f"  layerwise_gn per block: {statistics.median(times['layerwise_gn']) / f / len(blocks):5.2f} F "
          f"({len(blocks)} blocks)")
    per_block(model, p0, d, x, y, blocks, f, args)


def per_block(model, p0, d, x, y, blocks, f, args) -> None:
    """Where a layerwise gn step goes: the shared prefix forward, then per block its jvp (from its recorded input),
    logit-space terms and transposed jvp. Uses curvature.py's internals (a benchmark, not an API)."""
    from gnlm.curvature import _Linearization, _LogitBase, math_attention

    times: dict[str, list[float]] = {}

    def tick(k, t0):
        sync(args)
        times.setdefault(k, []).append(time.perf_counter() - t0)

    for r in range(6):
        with math_attention(model), torch.no_grad():
            t0 = time.perf_counter()
            lin = _Linearization(model, p0, x, blocks)
            tick("shared forward prefix", t0)
            base = None
            for i, names in enumerate(blocks):
                t0 = time.perf_counter()
                z0, u, pull = lin.block(names, d)
                tick(f"block {i} jvp", t0)
                t0 = time.perf_counter()
                if base is None:
                    base = _LogitBase(z0, y, "gn")
                    tick("shared logit base", t0)
                t0 = time.perf_counter()
                _, w = base.terms(u)
                tick(f"block {i} logit terms", t0)
                t0 = time.perf_counter()
                pull(w)
                tick(f"block {i} transposed jvp", t0)
                del z0, u, pull, w
    med = {k: statistics.median(v[1:]) / f for k, v in times.items()}
    print("layerwise gn per block (F; jvp / logit terms / transposed jvp / total):")
    for k in ("shared forward prefix", "shared logit base"):
        print(f"  {k:<24} {med[k]:5.2f}")
    for i, names in enumerate(blocks):
        parts = [med[f"block {i} {p}"] for p in ("jvp", "logit terms", "transposed jvp")]
        label = ".".join(names[0].split(".")[:2 if names[0].startswith("blocks.") else 1])
        label += " +ln_f" if "ln_f.weight" in names else ""
        print(f"  block {i} {label:<17} {parts[0]:5.2f} {parts[1]:5.2f} {parts[2]:5.2f} {sum(parts):6.2f}")
    print(f"  sum                      {sum(med.values()):5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--layers", type=int, default=0, help="override the preset's n_layers (0: keep it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure-fe", action="store_true")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    if args.measure_fe:
        measure_fe(args)

    kinds = ["adamw", "gn", "layerwise"]
    steps, blocks = {}, None
    for k in kinds:
        steps[k], b = build(args, k)
        blocks = b or blocks
    times = {k: [] for k in kinds}
    for r in range(args.rounds + 2):
        for k in kinds:
            sync(args)
            t = time.perf_counter()
            steps[k]()
            sync(args)
            if r >= 2:
                times[k].append(time.perf_counter() - t)
    del steps
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    mem = {k: measure_memory(args, k) for k in kinds}
    nb = len(blocks)
    print(f"preset {args.preset}, batch {args.batch}x{args.seq}, device {args.device}, threads {args.threads}, "
          f"math attention, median of {args.rounds} interleaved rounds")
    print(f"{'step':<12}{'time ms':>10}{'x adamw':>9}{'peak MiB':>10}{'x adamw':>9}")
    for k in kinds:
        print(f"{k:<12}{med[k]:>10.1f}{med[k] / med['adamw']:>9.2f}{mem[k]:>10.1f}{mem[k] / mem['adamw']:>9.2f}")
    print(f"layerwise / full GN time: {med['layerwise'] / med['gn']:.2f} with {nb} blocks (target <= {nb / 2:.1f})")
    print(json.dumps({
        "gn_vs_adamw_time": round(med["gn"] / med["adamw"], 3),
        "gn_vs_adamw_memory": round(mem["gn"] / mem["adamw"], 3),
        "layerwise_vs_gn_time": round(med["layerwise"] / med["gn"], 3),
        "layerwise_vs_adamw_memory": round(mem["layerwise"] / mem["adamw"], 3),
        "blocks": nb, "device": args.device, "preset": args.preset, "batch": args.batch, "seq": args.seq,
        "threads": args.threads, "time_ms": {k: round(v, 1) for k, v in med.items()},
        "peak_mib": {k: round(v, 1) for k, v in mem.items()},
    }))


if __name__ == "__main__":
    main()
