"""Exact checkpoint/resume and faults: kill -9 at a random moment (baseline and GN, also inside an outer step),
corrupt and truncated checkpoints through `gnlm train --resume`, failed writes, full disks, non-finite GN steps."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gnlm.checkpoint as ckpt_mod
import gnlm.gauss_newton as gn_mod
from gnlm.checkpoint import CheckpointError, read_checkpoint
from gnlm.cli import main
from gnlm.config import ConfigError
from gnlm.runconfig import load_run_config
from gnlm.train import run_training

COMMON = ["model=nano", "train.progress=false", "train.threads=1", "data.seq_len=64", "data.eval_sequences=4"]
BASELINE = [*COMMON, "optim.name=muon", "optim.lr=2e-2", "train.batch_size=4", "train.eval_every=5",
            "train.ema_decay=0.9", "train.checkpoint_every=1"]
GN = [*COMMON, "method=gn", "train.eval_every=1", "gn.inner_steps=6", "gn.inner_batch_size=4", "gn.line_search_batches=1",
      "gn.line_search_range=3", "gn.checkpoint_every_inner=1", "train.ema_decay=0.5"]
VOLATILE = ("tokens_per_s", "wall_time")


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cfg_of(run_dir: Path, args: list[str]):
    return load_run_config(None, [f"out_dir={run_dir}", *args])


def assert_clean(run_dir: Path, step: int) -> None:
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]
    assert read_checkpoint(run_dir / "checkpoint.pt")["state"]["step"] == step


def checkpoint_stamp(run_dir: Path) -> tuple[int, int] | None:
    """Identifies the current checkpoint.pt: every write renames a new file into place (new inode and mtime)."""
    try:
        st = (run_dir / "checkpoint.pt").stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def kill_at_random_checkpoint(run_dir: Path, args: list[str], seed: int, total: int) -> None:
    """Start `gnlm train` in a subprocess and SIGKILL it right after its k-th checkpoint write, k random in
    [1, total − 2], plus a random delay of up to 20 ms (so the kill also lands mid-step or mid-write). The run
    must still be alive when the signal is sent: a kill that lands after the end would test nothing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rng = random.Random(seed)
    k = rng.randint(1, total - 2)
    proc = subprocess.Popen([sys.executable, "-m", "gnlm", "train", f"out_dir={run_dir}", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, seen, last = time.monotonic() + 300, 0, None
        while seen < k:
            assert proc.poll() is None, f"the run ended before checkpoint {k}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            stamp = checkpoint_stamp(run_dir)
            if stamp != last:
                seen, last = seen + 1, stamp
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.02))
        assert proc.poll() is None, "the run finished before the kill; give it more steps"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.mark.parametrize("kind,args,steps,checkpoints", [
    ("baseline", BASELINE, 40, 40),
    ("gn", GN, 4, 4 * 5 + 1),  # 5 inside each outer step (checkpoint_every_inner=1, 6 inner steps) + the final
], ids=["baseline", "gn"])
def test_kill_minus_9_then_resume_gives_the_uninterrupted_metrics(tmp_path, kind, args, steps, checkpoints):
    seed = int(os.environ.get("GNLM_KILL_SEED", random.randrange(10**6)))
    print(f"kill seed {seed}")
    args = [*args, f"train.steps={steps}"]
    full = run_training(cfg_of(tmp_path / "full", args))
    killed = tmp_path / "killed"
    kill_at_random_checkpoint(killed, args, seed, checkpoints)
    ckpt = read_checkpoint(killed / "checkpoint.pt")
    print(f"{kind}: killed at outer step {ckpt['state']['step']}, inner {ckpt.get('inner_position')}")
    assert main(["train", f"out_dir={killed}", *args, "--resume"]) == 0
    assert rows(killed) == rows(tmp_path / "full")
    assert json.loads((killed / "summary.json").read_text())["final_eval_loss"] == full["final_eval_loss"]
    assert_clean(killed, steps)


class Killed(BaseException):
    """Stands in for a kill right after a checkpoint was written."""


def test_gn_resume_from_the_middle_of_the_inner_loop_is_bit_identical(tmp_path, monkeypatch):
    args = [*GN, "train.steps=3", "gn.checkpoint_every_inner=2", "gn.inner_optim.name=adamw"]
    run_training(cfg_of(tmp_path / "full", args))
    real_save, saved = ckpt_mod.save_checkpoint, []

    def save_then_die(path, state):
        real_save(path, state)
        saved.append(state.get("inner_position"))
        if len(saved) == 3:  # inside outer step 2, after its inner step 2 (saves: (1, k=2), (1, k=4), (2, k=2))
            raise Killed

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", save_then_die)
    monkeypatch.setattr("gnlm.run.save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_training(cfg_of(tmp_path / "cut", args))
    monkeypatch.undo()
    assert saved[-1]["k"] == 2
    state = read_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert state["state"]["step"] == 1 and state["inner_position"]["k"] == 2
    run_training(cfg_of(tmp_path / "cut", args), resume=True)
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    a = read_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    b = read_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["inner"]["phi"][k], b["inner"]["phi"][k]) for k in a["inner"]["phi"])


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,message", [("truncated", "is truncated"), ("flipped", "is corrupt (checksum mismatch)")])
def test_resume_falls_back_to_the_previous_checkpoint_through_the_cli(tmp_path, capsys, how, message):
    args = [*BASELINE, "train.steps=5"]
    run_training(cfg_of(tmp_path / "full", args))
    run_dir = tmp_path / "cut"
    run_training(cfg_of(run_dir, [*BASELINE, "train.steps=3"]))  # checkpoints: step 2 (.prev) and step 3
    _damage(run_dir / "checkpoint.pt", how)
    capsys.readouterr()
    assert main(["train", f"out_dir={run_dir}", *args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert message in err and "falling back to the previous checkpoint" in err and "checkpoint.prev.pt" in err
    assert rows(run_dir) == rows(tmp_path / "full")  # resumed from step 2, metrics of steps 3.. recomputed
    assert_clean(run_dir, 5)


def test_resume_with_every_checkpoint_damaged_fails_with_one_clear_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_training(cfg_of(run_dir, [*BASELINE, "train.steps=3"]))
    _damage(run_dir / "checkpoint.pt", "truncated")
    _damage(run_dir / "checkpoint.prev.pt", "flipped")
    capsys.readouterr()
    assert main(["train", f"out_dir={run_dir}", *BASELINE, "train.steps=5", "--resume"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gnlm: error")]
    assert len(err) == 1 and "truncated" in err[0] and "previous one is unusable too" in err[0], err


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if "checkpoint.pt.tmp" in name:
            calls.append(name)
            if len(calls) >= 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .* \(No space left on device\); "
                                              r"the last good checkpoint .*checkpoint.pt is intact"):
        run_training(cfg_of(run_dir, [*BASELINE, "train.steps=5"]))
    monkeypatch.undo()
    assert_clean(run_dir, 2)  # steps 1 and 2 were written, step 3 failed
    assert read_checkpoint(run_dir / "checkpoint.prev.pt")["state"]["step"] == 1


def test_too_little_disk_space_is_reported_before_training(tmp_path, monkeypatch):
    import shutil as _shutil

    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr("gnlm.rundir.shutil.disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(ConfigError, match=r"not enough free disk space in .*: checkpoints need about .* MiB"):
        run_training(cfg_of(tmp_path / "run", [*BASELINE, "train.steps=2"]))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unwritable_out_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a-file"  # a path below a regular file cannot be created, even by root
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write to out_dir .*a-file/run"):
        run_training(cfg_of(blocker / "run", [*BASELINE, "train.steps=1"]))


def nan_surrogate_grads(monkeypatch):
    real = gn_mod.surrogate_grad

    def nan_grads(*a, **kw):
        loss, grads = real(*a, **kw)
        return loss, {k: torch.full_like(v, float("nan")) for k, v in grads.items()}

    monkeypatch.setattr(gn_mod, "surrogate_grad", nan_grads)


def test_gn_outer_step_with_only_non_finite_candidates_is_skipped_and_logged(tmp_path, monkeypatch, capsys):
    nan_surrogate_grads(monkeypatch)
    summary = run_training(cfg_of(tmp_path / "run", [*GN, "train.steps=2", "gn.checkpoint_every_inner=0",
                                                     "gn.inner_optim.name=adamw", "gn.line_search_skip=true"]))
    metrics = rows(tmp_path / "run")
    assert [r.get("skipped") for r in metrics[1:]] == [True, True]
    assert all(r["eta"] == 0.0 for r in metrics[1:])
    assert all(r["inner_reset"] for r in metrics[1:])  # φ is restarted from θ, not left at nan
    assert metrics[-1]["eval_loss"] == metrics[0]["eval_loss"]  # θ never moved
    assert not summary["diverged"]
    assert "the step was skipped" in capsys.readouterr().err


def test_gn_direction_non_finite_at_every_step_size_ends_the_run_as_diverged(tmp_path, monkeypatch, capsys):
    nan_surrogate_grads(monkeypatch)
    run_dir = tmp_path / "run"
    summary = run_training(cfg_of(run_dir, [*GN, "train.steps=3", "gn.checkpoint_every_inner=0",
                                            "gn.inner_optim.name=adamw"]))
    assert summary["diverged"] and "every line-search step size gives a non-finite loss" in summary["message"]
    assert summary["step"] == 0 and [r["step"] for r in rows(run_dir)] == [0]
    assert "gnlm: run diverged" in capsys.readouterr().err


def test_stale_temp_files_of_a_killed_writer_are_removed_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_training(cfg_of(run_dir, [*BASELINE, "train.steps=2"]))
    (run_dir / ".checkpoint.pt.tmp-99999").write_bytes(b"half a checkpoint")
    (run_dir / "metrics.jsonl").open("a").write('{"step": 3, "tok')  # a row cut short by the kill
    run_training(cfg_of(run_dir, [*BASELINE, "train.steps=3"]), resume=True)
    assert_clean(run_dir, 3)
    assert [r["step"] for r in rows(run_dir)] == [0, 1, 2, 3]


def test_time_based_checkpoints_inside_gn_outer_steps(tmp_path, monkeypatch):
    real_save, saved = ckpt_mod.save_checkpoint, []

    def counting_save(path, state):
        saved.append((state["state"]["step"], (state.get("inner_position") or {}).get("k")))
        real_save(path, state)

    monkeypatch.setattr("gnlm.run.save_checkpoint", counting_save)
    args = [*GN, "train.steps=2", "gn.checkpoint_every_inner=0", "gn.inner_steps=3",
            "train.checkpoint_every_seconds=1e-9"]
    run_training(cfg_of(tmp_path / "run", args))
    # every inner step but the last of an outer step, every outer step but the last, and the final checkpoint
    assert saved == [(0, 1), (0, 2), (1, None), (1, 1), (1, 2), (2, None)]
