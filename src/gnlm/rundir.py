"""A run directory: the one writer's lock, creating or checking it before a run starts (resume, overwrite, free
space), and reading back the config a run saved there. Nothing here trains; ``run.py`` opens the run in it.

Layout (written by ``run.py``)::

    config.yaml       the resolved config of the run
    metrics.jsonl     one JSON row per logged step (and one per evaluation)
    checkpoint.pt     the latest checkpoint (checkpoint.prev.pt: the one before)
    summary.json      written when the run ends
    .gnlm.lock        held while a process writes the directory
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from gnlm.checkpoint import remove_stale_temp_files
from gnlm.config import ConfigError
from gnlm.model import count_parameters, model_shapes
from gnlm.runconfig import RunConfig, run_config_to_dict, run_differences

LOCK_NAME = ".gnlm.lock"

# Optimizer-state copies of the parameters, for the free-disk-space estimate (SOAP's preconditioners: ~2 more).
_STATE_COPIES = {"adamw": 2, "muon": 2, "soap": 4}


def read_saved_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The config a run saved in its directory (config.yaml), or None when there is none; a file that is not a
    YAML mapping is a one-line ConfigError."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not valid YAML; restore the run's config.yaml or start a new out_dir") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} does not hold a run config (a YAML mapping); restore it or start a new out_dir")
    return saved


def checkpoint_bytes_estimate(cfg: RunConfig) -> int:
    """About how many bytes one checkpoint takes: parameters + optimizer state (+ φ and EMA)."""
    n = count_parameters(model_shapes(cfg.model))
    itemsize = torch.empty(0, dtype=getattr(torch, cfg.train.dtype)).element_size()
    if cfg.method == "gn":
        copies = 2 + _STATE_COPIES.get(cfg.gn.inner_optim.name, 2)  # θ, φ, inner optimizer
    else:
        copies = 1 + _STATE_COPIES.get(cfg.optim.name, 2)
    copies += 1 if cfg.train.ema_decay else 0
    return n * itemsize * copies


def check_free_space(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to start when the disk cannot hold two checkpoints (the new one is written before the old goes)."""
    need = 2 * checkpoint_bytes_estimate(cfg)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(f"not enough free disk space in {run_dir}: checkpoints need about {need / 2**20:,.1f} MiB, "
                          f"{free / 2**20:,.1f} MiB are free; free some space or choose another out_dir")


def has_checkpoint(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / "checkpoint.pt").is_file() or (run_dir / "checkpoint.prev.pt").is_file()


class RunDirLock:
    """One writer per run directory: an exclusive ``flock`` on ``<run dir>/.gnlm.lock``, which holds the owner's
    pid. The kernel drops the lock when its process ends, however it ends (kill -9 included), so a lock can never
    be left stale; the file is deleted on release. Under torchrun only rank 0 takes it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                pid = holder[0] if holder else "unknown"
                where = f" on {holder[1]}" if len(holder) > 1 else ""
                raise ConfigError(f"run directory {self.path.parent} is in use by another gnlm process (pid {pid}"
                                  f"{where}); wait for it to end or stop it, then start again") from None
            except OSError as e:  # a filesystem without locks: go on unlocked, but say so
                os.close(fd)
                print(f"gnlm: warning: cannot lock {self.path} ({e.strerror}); make sure no other process writes "
                      f"this run directory", file=sys.stderr)
                return
            try:  # the previous holder may have deleted the file between our open and lock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        import socket

        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting opener retries on a fresh file
        finally:
            os.close(self.fd)
            self.fd = None


def _contents(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name != LOCK_NAME]


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool,
                    lock: RunDirLock | None = None) -> tuple[Path, bool]:
    """Create (or check) the run directory, taking ``lock`` on it first; returns (path, resuming). Never deletes
    anything unless asked (--overwrite), and a refused start leaves everything as it was.

    ``--resume`` continues from the checkpoint; on a directory with files but no checkpoint it is an error (nothing
    to resume: --overwrite starts afresh); on a directory that does not exist (or is empty) it starts a new run
    there, with a note."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    run_dir = Path(cfg.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"out_dir {run_dir} is a file, not a directory; choose another out_dir "
                          f"(gnlm never deletes it, even with --overwrite)")
    existed = run_dir.is_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir {run_dir} ({e.strerror}); choose a writable directory") from None
    try:
        if lock is not None:
            lock.acquire()  # before anything in the directory is read, trimmed or deleted
        resuming = _check_run_dir(cfg, run_dir, resume, overwrite)
    except BaseException:
        if lock is not None:
            lock.release()
        if not existed:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if still empty: a refused new run leaves no directory behind
        raise
    return run_dir, resuming


def _check_run_dir(cfg: RunConfig, run_dir: Path, resume: bool, overwrite: bool) -> bool:
    contents = _contents(run_dir)
    if contents and not (resume or overwrite):
        raise ConfigError(
            f"run directory {run_dir} already exists; pass --resume to continue it or --overwrite to replace it, "
            f"or set out_dir=...")
    resuming = False
    if resume and not contents:
        print(f"gnlm: --resume: {run_dir} holds no run yet; starting a new run there", file=sys.stderr)
    elif resume:
        saved_path = run_dir / "config.yaml"
        if saved_path.exists():
            changed = run_differences(read_saved_config(run_dir), run_config_to_dict(cfg), may_continue=True)
            if changed:
                raise ConfigError(
                    f"cannot resume {run_dir}: the config differs in {', '.join(changed[:5])}; "
                    f"use the run's own config ({saved_path}) or start a new out_dir")
        if not has_checkpoint(run_dir):
            held = ", ".join(sorted(p.name for p in contents)[:4])
            raise ConfigError(
                f"cannot resume {run_dir}: it holds {held} but no checkpoint (the run stopped before its first one); "
                f"pass --overwrite instead of --resume to delete it and start afresh")
        resuming = True
    if contents and overwrite:
        for p in contents:  # the lock file stays: it is held
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    elif contents:
        remove_stale_temp_files(run_dir)  # a killed writer's leftovers; never read, but confusing
    try:
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir {run_dir} ({e.strerror}); choose a writable directory") from None
    check_free_space(run_dir, cfg)
    return resuming


