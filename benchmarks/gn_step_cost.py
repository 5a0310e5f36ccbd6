"""Cost of one GN inner step against one AdamW step (time and peak memory). Not a test.

Steps on the same model, batch and attention backend ("math" for all, since GN needs it):
  adamw      forward + backward + AdamW step on θ
  gn         surrogate_grad (full GN: a primal, a tangent and a transposed-tangent pass) + AdamW step on φ
  layerwise  surrogate_grad with default_blocks (n_layers + 2 blocks) + AdamW step on φ

Three cases, measured side by side in one run: the main one (``--preset``, default micro, batch 8×128), the CPU
study's GN inner step (``--nano``: the nano preset at the inner batch of the shakespeare-nano study, 8 sequences of
64 tokens, vocab 512), where fixed per-step costs weigh most, and a model gnlm did not write (``--hf``: a tiny
Hugging Face Llama of the micro preset's sizes, d 128, 4 layers, 4 heads, gated MLP 512, vocab 4096, batch 8×128,
eager attention), which GN linearises with the generic ``torch.func`` path (issue 18). ``--nano none`` and
``--hf none`` skip those cases.

Time: all steps of both cases are interleaved, ``--rounds`` times after 2 warm-up rounds; the median is reported.
On CPU with one thread the clock is the thread's CPU time (``time.thread_time``), so that other processes on a
shared machine do not count; otherwise wall time with a device synchronisation.
Peak memory: each step kind runs in a fresh subprocess that builds the batch, notes its memory, then builds the
model, the optimizer and the GN state (θ₀, φ) and runs 2 steps. Reported: peak minus the noted baseline, i.e.
parameters + optimizer/solver state + the step's transient peak. On CUDA this is ``torch.cuda.max_memory_allocated``;
on CPU it is the peak resident set size (VmHWM, reset through ``/proc/self/clear_refs`` after the baseline) with
glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors go back to the OS and the
RSS tracks live tensors.

Goals (issue 12): GN ≤ 1.75× AdamW on the main case, ≤ 3× on the nano case, layerwise ≤ blocks/3 × full GN;
(issue 18) GN ≤ 2.5× AdamW on the HF Llama.
``--fused`` gives every step a fused AdamW (the inner-optimizer lever); ``--compile`` compiles the GN steps'
``surrogate_grad`` with ``torch.compile`` (its first calls, in the warm-up, compile).

The LAST line printed is one JSON object (gn_vs_adamw_time, layerwise_vs_gn_time, blocks, nano, goals, ...).

    python benchmarks/gn_step_cost.py                       # micro + nano on CPU, 1 thread
    python benchmarks/gn_step_cost.py --device cuda --preset 45m --batch 8 --seq 1024 --nano none
    python benchmarks/gn_step_cost.py --layers 8                 # a deeper micro
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
from types import SimpleNamespace

import torch

GOAL_GN, GOAL_NANO_GN, GOAL_LAYERWISE_PER_BLOCK, GOAL_HF_GN = 1.75, 3.0, 1 / 3, 2.5
HF_LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 4096, "max_position_embeddings": 128}


def cases(args) -> list[SimpleNamespace]:
    """The main case and, unless ``--nano none``, the nano case (name, preset, batch, seq, vocab, layers, kinds)."""
    out = [SimpleNamespace(name="main", preset=args.preset, batch=args.batch, seq=args.seq, vocab=0,
                           layers=args.layers, kinds=["adamw", "gn", "layerwise"])]
    if args.nano != "none":
        batch, seq = (int(v) for v in args.nano.split("x"))
        out.append(SimpleNamespace(name="nano", preset="nano", batch=batch, seq=seq, vocab=args.nano_vocab, layers=0,
                                   kinds=["adamw", "gn", "layerwise"]))
    if args.hf != "none":
        batch, seq = (int(v) for v in args.hf_batch.split("x"))
        out.append(SimpleNamespace(name="hf_llama", preset="hf-llama", batch=batch, seq=seq, vocab=0, layers=0,
                                   kinds=["adamw", "gn", "layerwise"]))
    return out


def make_model(args, case):
    from gnlm.model import GPT, get_preset

    torch.manual_seed(0)
    if case.preset == "hf-llama":
        from gnlm.hf import build_hf_model

        model = build_hf_model(HF_LLAMA).to(args.device)
        gen = torch.Generator().manual_seed(1)
        V = HF_LLAMA["vocab_size"]
        x = torch.randint(0, V, (case.batch, case.seq), generator=gen).to(args.device)
        y = torch.randint(0, V, (case.batch, case.seq), generator=gen).to(args.device)
        return model, x, y
    over = {"max_seq_len": max(case.seq, get_preset(case.preset).max_seq_len)}
    if case.layers:
        over["n_layers"] = case.layers
    if case.vocab:
        over["vocab_size"] = case.vocab
    model = GPT(get_preset(case.preset, **over)).to(args.device)
    model.attention = "math"
    gen = torch.Generator().manual_seed(1)
    V = model.cfg.vocab_size
    x = torch.randint(0, V, (case.batch, case.seq), generator=gen).to(args.device)
    y = torch.randint(0, V, (case.batch, case.seq), generator=gen).to(args.device)
    return model, x, y


def build(args, case, kind: str):
    from gnlm.curvature import layerwise_blocks, surrogate_grad
    from gnlm.model import loss_fn

    model, x, y = make_model(args, case)
    adamw = {"lr": 1e-4, **({"fused": True} if args.fused else {})}
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), **adamw)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        return step, None
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.requires_grad_(False)
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in theta0.items()}
    opt = torch.optim.AdamW(phi.values(), **adamw)
    blocks = layerwise_blocks(model) if kind == "layerwise" else None

    def grad(p0, p):
        return surrogate_grad(model, p0, p, x, y, kind="gn", blocks=blocks)

    grad = torch.compile(grad) if args.compile else grad

    def step():
        _, grads = grad(theta0, {k: p.detach() for k, p in phi.items()})
        for k, p in phi.items():
            p.grad = grads[k]
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, blocks


def clock(args):
    """The thread's CPU time on a one-thread CPU run (immune to other processes), else synchronised wall time."""
    if args.device == "cpu" and args.threads == 1:
        return time.thread_time
    return lambda: (sync(args), time.perf_counter())[1]


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
    case = SimpleNamespace(preset=args.preset, batch=args.batch, seq=args.seq, vocab=args.nano_vocab,
                           layers=args.layers)
    step, _ = build(args, case, args.memory_child)
    for _ in range(2):
        step()
    sync(args)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    print(json.dumps({"peak_bytes": peak - base}))


def measure_memory(args, case, kind: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--device", args.device, "--preset", case.preset, "--batch", str(case.batch),
           "--seq", str(case.seq), "--threads", str(args.threads), "--layers", str(case.layers or 0),
           "--nano-vocab", str(case.vocab or 0), "--memory-child", kind] + (["--fused"] if args.fused else []) \
        + (["--compile"] if args.compile else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"] / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=0, help="override the preset's n_layers (0: keep it)")
    ap.add_argument("--nano", default="8x64", help="BATCHxSEQ of the nano case, or none")
    ap.add_argument("--nano-vocab", type=int, default=512, help="the nano case's vocabulary (shakespeare-nano's)")
    ap.add_argument("--hf", default="llama", help="llama: the tiny Hugging Face Llama case; none: skip it")
    ap.add_argument("--hf-batch", default="8x128", help="BATCHxSEQ of the HF Llama case")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fused", action="store_true", help="fused AdamW in every step")
    ap.add_argument("--compile", action="store_true", help="torch.compile the GN steps' surrogate_grad (the "
                    "warm-up rounds hold the compilation)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    if args.compile:  # each case and step kind compiles its own graphs; the default limit of 8 falls back to eager
        torch._dynamo.config.recompile_limit = 64
    todo = cases(args)

    steps, blocks = {}, {}
    for case in todo:
        for k in case.kinds:
            steps[case.name, k], b = build(args, case, k)
            blocks[case.name] = b or blocks.get(case.name)
    now = clock(args)
    times = {key: [] for key in steps}
    for r in range(args.rounds + 2):
        for key, step in steps.items():
            t = now()
            step()
            if r >= 2:
                times[key].append(now() - t)
    del steps
    med = {key: statistics.median(v) * 1000 for key, v in times.items()}
    mem = {(case.name, k): measure_memory(args, case, k) for case in todo for k in case.kinds}
    print(f"device {args.device}, threads {args.threads}, math attention, {'fused ' if args.fused else ''}AdamW, "
          f"{'compiled ' if args.compile else ''}GN, "
          f"median of {args.rounds} interleaved rounds, "
          f"{'CPU time' if now is time.thread_time else 'wall time'}")
    result: dict = {}
    for case in todo:
        name, nb = case.name, len(blocks[case.name])
        t = {k: med[name, k] for k in case.kinds}
        m = {k: mem[name, k] for k in case.kinds}
        vocab = f", vocab {case.vocab}" if case.vocab else ""
        print(f"\n{case.preset}{vocab}, batch {case.batch}x{case.seq}")
        print(f"{'step':<12}{'time ms':>10}{'x adamw':>9}{'peak MiB':>10}{'x adamw':>9}")
        for k in case.kinds:
            print(f"{k:<12}{t[k]:>10.2f}{t[k] / t['adamw']:>9.2f}{m[k]:>10.1f}{m[k] / m['adamw']:>9.2f}")
        print(f"layerwise / full GN time: {t['layerwise'] / t['gn']:.2f} with {nb} blocks")
        result[name] = {
            "gn_vs_adamw_time": round(t["gn"] / t["adamw"], 3),
            "gn_vs_adamw_memory": round(m["gn"] / m["adamw"], 3),
            "layerwise_vs_gn_time": round(t["layerwise"] / t["gn"], 3),
            "layerwise_vs_adamw_memory": round(m["layerwise"] / m["adamw"], 3),
            "blocks": nb, "preset": case.preset, "batch": case.batch, "seq": case.seq,
            "time_ms": {k: round(v, 2) for k, v in t.items()}, "peak_mib": {k: round(v, 1) for k, v in m.items()},
        }
        if case.vocab:
            result[name]["vocab"] = case.vocab
    main_ = result.pop("main")
    goals = {f"gn <= {GOAL_GN} x adamw": main_["gn_vs_adamw_time"] <= GOAL_GN,
             f"layerwise <= blocks/3 = {main_['blocks'] / 3:.2f} x gn":
                 main_["layerwise_vs_gn_time"] <= main_["blocks"] * GOAL_LAYERWISE_PER_BLOCK}
    if "nano" in result:
        goals[f"nano gn <= {GOAL_NANO_GN} x adamw"] = result["nano"]["gn_vs_adamw_time"] <= GOAL_NANO_GN
    if "hf_llama" in result:
        goals[f"hf llama gn <= {GOAL_HF_GN} x adamw"] = result["hf_llama"]["gn_vs_adamw_time"] <= GOAL_HF_GN
    print("\ngoals: " + ", ".join(f"{k}: {'met' if v else 'not met'}" for k, v in goals.items()))
    print(json.dumps({**main_, **result, "goals": goals, "device": args.device, "threads": args.threads,
                      "fused_adamw": args.fused, "compiled_gn": args.compile,
                      "clock": "cpu" if now is time.thread_time else "wall"}))


if __name__ == "__main__":
    main()
