"""Data parallelism: a 2-process gloo torchrun run equals a 1-process run on the same global batch.

The 2-process runs are real ``torchrun`` subprocesses (``python -m torch.distributed.run -m gnlm train``); the
1-process reference runs in this process. float64 keeps Muon's bfloat16 Newton-Schulz from amplifying the
rounding differences of a different reduction order, so the tolerance (1e-5 relative) is about the algorithm.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gnlm import distributed as dist
from gnlm.config import ConfigError
from gnlm.resources import check_parallel
from gnlm.runconfig import load_run_config
from gnlm.train import run_training

COMMON = ["model=nano", "train.progress=false", "train.threads=1", "train.dtype=float64", "data.seq_len=64"]
BASELINE = ["train.steps=20", "train.batch_size=8", "train.eval_every=10", "data.eval_sequences=8"]
GN = ["method=gn", "train.steps=3", "train.eval_every=3", "data.eval_sequences=6", "gn.inner_steps=3",
      "gn.inner_batch_size=4", "gn.line_search_batches=1", "gn.line_search_range=3"]

CASES = {
    "adamw_micro": [*BASELINE, "optim.name=adamw", "optim.lr=3e-3", "train.micro_batch_size=2"],
    "muon_ema": [*BASELINE, "optim.name=muon", "optim.lr=2e-2", "train.ema_decay=0.9", "data.eval_sequences=7"],
    "gn_full": GN,
    "gn_layerwise": [*GN, "gn.layerwise=true"],
    "gn_cg": [*GN, "gn.solver=cg", "gn.cg_iters=4"],
    # bring your own model: a Hugging Face Llama under DDP, trained by GN (generic torch.func linearisation)
    "hf_llama_gn": [*GN, "model.source=hf", "model.hf_config={model_type: llama, hidden_size: 32, intermediate_size: 64, "
                    "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 4096, "
                    "max_position_embeddings: 128}"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "gnlm", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# DDP with EMA and full GN run in the default test run; the other cases (micro-batches, layerwise, CG) are slow.
FAST_CASES = ("muon_ema", "gn_full")


@pytest.mark.parametrize("case", [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_two_process_run_equals_one_process_run(tmp_path, case):
    args = [*COMMON, *CASES[case]]
    one = run_training(load_run_config(None, [f"out_dir={tmp_path / 'one'}", *args]))
    proc = torchrun(2, [f"out_dir={tmp_path / 'two'}", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1])  # only rank 0 prints the summary
    assert two["world_size"] == 2 and two["step"] == one["step"] and two["tokens"] == one["tokens"]
    assert rel(two["final_eval_loss"], one["final_eval_loss"]) < 1e-5, (two["final_eval_loss"], one["final_eval_loss"])
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # rank 0 alone wrote the metrics, once per step
    for ra, rb in zip(a, b):
        for key in ("eval_loss", "loss", "surrogate_loss"):
            if key in ra:
                assert rel(rb[key], ra[key]) < 1e-5, (key, ra["step"], ra[key], rb[key])
        if "eta" in ra:
            assert rb["eta"] == ra["eta"]
    assert not list((tmp_path / "two").glob(".*tmp*"))


def test_a_global_batch_that_does_not_split_over_the_processes_is_rejected():
    cfg = load_run_config(None, ["model=nano", "train.batch_size=6", "train.micro_batch_size=2"])
    check_parallel(cfg, 1)
    with pytest.raises(ConfigError, match=r"must divide the per-process batch \(6 / 2 processes = 3\)"):
        check_parallel(cfg, 2)
    check_parallel(cfg, 3)  # 2 per process, one micro-batch
    with pytest.raises(ConfigError, match=r"train.batch_size \(6\) is not divisible by the number of processes \(4\)"):
        check_parallel(cfg, 4)
    gn = load_run_config(None, ["method=gn", "model=nano", "gn.inner_batch_size=6"])
    with pytest.raises(ConfigError, match=r"gn.inner_batch_size \(6\) is not divisible"):
        check_parallel(gn, 4)
    soap = load_run_config(None, ["model=nano", "optim.name=soap", "train.parallel=fsdp"])
    with pytest.raises(ConfigError, match="soap does not run on FSDP"):
        check_parallel(soap, 2)
    check_parallel(soap, 1)  # one process: nothing is sharded


def test_single_process_helpers_are_the_identity():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    t = torch.arange(3.0)
    assert dist.all_reduce_mean(t) is t and torch.equal(t, torch.arange(3.0))
    assert dist.mean_of_floats([1.5, 2.0]) == [1.5, 2.0]
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.barrier()


def test_torchrun_reports_a_bad_split_on_one_line(tmp_path):
    proc = torchrun(2, [f"out_dir={tmp_path / 'r'}", *COMMON, "train.batch_size=3"])
    assert proc.returncode != 0
    assert proc.stderr.count("gnlm: error: train.batch_size (3) is not divisible by the number of processes (2)") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_fsdp_two_process_run_equals_one_process_run_and_resumes(tmp_path, optim):
    args = [*COMMON, *BASELINE, f"optim.name={optim}", "optim.lr=3e-3", "train.steps=6", "train.eval_every=3",
            "train.ema_decay=0.9"]
    one = run_training(load_run_config(None, [f"out_dir={tmp_path / 'one'}", *args]))
    half = torchrun(2, [f"out_dir={tmp_path / 'two'}", *args, "train.parallel=fsdp", "train.steps=3"])
    assert half.returncode == 0, half.stderr[-3000:]
    proc = torchrun(2, [f"out_dir={tmp_path / 'two'}", *args, "train.parallel=fsdp", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rel(two["final_eval_loss"], one["final_eval_loss"]) < 1e-5, (two["final_eval_loss"], one["final_eval_loss"])


@pytest.mark.slow
def test_bench_under_torchrun_records_the_same_study(tmp_path):
    """`gnlm bench` runs unchanged under torchrun: rank 0 writes the results, every rank trains each run."""
    study = {
        "name": "ddp", "base": {"model": {"preset": "nano", "vocab_size": 512, "max_seq_len": 64},
                                "data": {"vocab_size": 512, "seq_len": 64, "eval_sequences": 4},
                                "train": {"eval_every": 1, "threads": 1, "dtype": "float64"},
                                "gn": {"inner_batch_size": 4, "line_search_batches": 1, "line_search_range": 3}},
        "warm_start": {"tokens": 2048, "batch_tokens": 512, "lr": 0.01},
        "target_loss": 5.6, "max_steps": 3, "batch_tokens": [512], "progress": False,
        # lrs selected on seed 0: its runs ask the lr search whether to stop after every evaluation (rank 0
        # decides for all ranks)
        "selection_seed": 0, "seeds": [1],
        "methods": [{"name": "adamw", "lrs": [0.01]}, {"name": "gn", "lrs": [0.01]}],
    }
    path = tmp_path / "study.yaml"
    import yaml

    path.write_text(yaml.safe_dump(study))
    from gnlm.bench import run_study
    from gnlm.study import load_study

    one = run_study(load_study(path), tmp_path / "one", report=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "gnlm", "bench", str(path), "--results", str(tmp_path / "two"), "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "runs.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in two] == [r.run_id for r in one]  # each run recorded once, by rank 0
    for a, b in zip(one, two):
        assert rel(b["final_eval_loss"], a.final_eval_loss) < 1e-5 and a.steps == b["steps"]


@pytest.mark.slow
def test_two_process_probe_equals_one_process_probe(tmp_path):
    """gnlm probe under torchrun: every rank holds θ₀ and a shard of every batch, gradients, GGN products and losses
    are averaged, so the scores, the calibrated λ* and the real-loss curves equal a 1-process probe's (to 1e-5: the
    reduction order's float64 rounding, amplified by CG at small λ; a missing or doubled reduction is off by O(1))."""
    from gnlm.cli import main

    run = tmp_path / "run"
    run_training(load_run_config(None, [f"out_dir={run}", *COMMON, *BASELINE[:1], "train.steps=3", "train.batch_size=4",
                                        "train.eval_every=3", "data.eval_sequences=4", "optim.lr=3e-3"]))
    probe = ["--optimizers", "adamw,muon", "--lrs", "3e-3,2e-2", "--damping-grid", "1e-3,1e-1,10", "--probe-batches",
             "2", "--warmup-steps", "1", "--batch-tokens", "512", "--cg-iters", "20", "--no-progress"]
    assert main(["probe", str(run), *probe, "--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
           "gnlm", "probe", str(run), *probe, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "probe.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["damping"] == one["damping"] and len(two["by_damping"]) == len(one["by_damping"])
    for a, b in zip(one["by_damping"], two["by_damping"]):
        for name in a["rho"]:
            assert rel(b["rho"][name], a["rho"][name]) < 1e-5, (a["damping"], name, a["rho"][name], b["rho"][name])
        for x, y in zip(a["oracle_real_loss_change"], b["oracle_real_loss_change"]):
            assert abs(x - y) < 1e-9 + 1e-5 * abs(x)
    for name in ("adamw", "muon"):
        assert rel(two["optimizers"][name]["rho"], one["optimizers"][name]["rho"]) < 1e-5
        assert rel(two["optimizers"][name]["real_loss_fraction"], one["optimizers"][name]["real_loss_fraction"]) < 1e-5
