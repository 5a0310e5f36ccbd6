"""One task of a launcher (one run, or the warm start) and how it runs wherever it lands: in this process, in a
worker of the local pool (``launch.py``) or in a Slurm job (``slurm.py``).

A :class:`Task` is a module-level function and its arguments (it pickles by reference). :func:`run_task` claims it
with an exclusive lock file (``locks/<run id>.lock``, released by the OS when the process dies, kill -9 included),
calls it and releases the claim; a task claimed elsewhere is skipped (``wait``: waited for). The results directory
stays the single source of truth: the task's function (``bench.record_run``) trains the run, resuming its
checkpoint, and appends its row to ``runs.jsonl`` unless a row is there already, so two ``gnlm bench`` processes on
one results directory never run one run twice.

A worker of the local pool knows its :class:`Placement` (CPU threads, GPU) and marks the task it runs in a state
file next to the claim ("running", or "stopped" from its SIGTERM handler), so that a pool broken by one dead worker
can tell which run died and which ones only stopped.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from gnlm import distributed as dist


@dataclass(frozen=True)
class Placement:
    """Where a run runs in a worker of the local pool: its CPU threads and, on a GPU machine, its GPU."""

    threads: int
    gpu: int | None = None

    def train_overrides(self, train: dict[str, Any]) -> dict[str, Any]:
        """``train.threads`` (never more than the run asks for) and ``train.device`` (when auto or cuda)."""
        out: dict[str, Any] = {"threads": min(train.get("threads") or self.threads, self.threads)}
        if self.gpu is not None and str(train.get("device", "auto")) in ("auto", "cuda"):
            out["device"] = f"cuda:{self.gpu}"
        return out


@dataclass
class Task:
    """One job: ``fn(*args)`` holding the claim ``lock`` (``fn`` at module level: it pickles by reference, to a
    pool worker or a Slurm job). In a worker of the local pool ``fn`` also gets ``placement=``. ``wait``: wait for
    a claim held elsewhere instead of skipping the task. ``cost``: a guess of its compute; the local pool submits
    the costliest first, so that a study does not end on one long run alone."""

    key: str
    fn: Callable[..., Any]
    args: tuple
    lock: str
    wait: bool = False
    cost: float = 0.0


@dataclass
class Outcome:
    """A finished task: its ``result`` (None when another process held its claim) or its ``error`` (its process
    died, or its Slurm job failed), and how long it took. ``task`` None: nothing finished (refresh the display)."""

    task: Task | None
    result: Any = None
    error: BaseException | None = None
    seconds: float | None = None


def lock_path(results_dir: str | Path, key: str) -> Path:
    """The claim file of a task (outside the run directory, which a restarted run may delete)."""
    return Path(results_dir) / "locks" / f"{key}.lock"


@contextmanager
def claim(path: str | Path, wait: bool = False) -> Iterator[bool]:
    """Hold the exclusive lock ``path`` for the block; yields whether we got it (``wait``: block until we do).
    The OS drops it when the process dies. Under torchrun rank 0 takes it and every rank gets the answer."""
    lock, got = None, True
    if dist.is_main():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=-1 if wait else 0)
        except Timeout:
            lock, got = None, False
    got = dist.broadcast_object(got)
    try:
        yield got
    finally:
        if lock is not None:
            lock.release()


# What a worker of the local pool knows about itself: its placement, and the task it runs (its state file and the
# pool's token), for the SIGTERM handler.
_PLACEMENT: Placement | None = None
_RUNNING: tuple[Path, str] | None = None


def _state_path(lock: str | Path) -> Path:
    return Path(lock).with_suffix(".state")


def _write_state(path: Path, token: str, state: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"token": token, "state": state, "pid": os.getpid()}))
    os.replace(tmp, path)


def read_state(lock: str | Path) -> dict[str, Any]:
    """What the worker that ran the task of claim ``lock`` last wrote about it (token, state, pid); {} if nothing."""
    try:
        return json.loads(_state_path(lock).read_text())
    except (OSError, ValueError):
        return {}


def run_task(task: Task, token: str | None = None, distributed: bool = False) -> tuple[Any, float]:
    """Run one task where it landed (this process, a pool worker, a Slurm job): claim it, call it, release it.
    Returns (result, seconds); the result is None when another process holds the claim. ``token`` (local pool):
    marks the task running in its state file, so that a broken pool can tell which worker died.
    ``distributed`` (a Slurm job with several tasks): set torchrun's environment and start the process group."""
    global _RUNNING
    t0 = time.perf_counter()
    if distributed:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # gnlm pins cuda:LOCAL_RANK itself
        dist.init("auto")
    kwargs = {"placement": _PLACEMENT} if _PLACEMENT is not None else {}
    try:
        with claim(task.lock, task.wait) as got:
            if not got:
                return None, time.perf_counter() - t0
            if token is not None:
                _RUNNING = (_state_path(task.lock), token)
                _write_state(*_RUNNING, "running")
            try:
                result = task.fn(*task.args, **kwargs)
            finally:
                _RUNNING = None
    except KeyboardInterrupt:
        if _PLACEMENT is not None:
            os._exit(130)  # a pool worker stops here instead of taking the next run
        raise
    finally:
        if distributed:
            dist.barrier()
            dist.destroy()
    return result, time.perf_counter() - t0


def _stop_worker(signum: int, frame: Any) -> None:
    """SIGTERM in a pool worker (the pool stops its workers when one of them died): mark the run "stopped"."""
    if _RUNNING is not None:
        _write_state(*_RUNNING, "stopped")
    os._exit(128 + signum)


def worker_ready() -> None:
    """Nothing: submitted to start a pool's workers ahead of their first run."""


def init_worker(counter: Any, threads: int, gpus: int) -> None:
    """A new worker of the local pool: its slot from the shared ``counter`` gives its placement (``threads`` CPU
    threads; GPU slot mod ``gpus`` on a GPU machine); SIGTERM marks its run stopped; it exits with its parent."""
    global _PLACEMENT
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    _PLACEMENT = Placement(threads=threads, gpu=slot % gpus if gpus else None)
    import torch

    torch.set_num_threads(threads)
    if _PLACEMENT.gpu is not None:
        torch.cuda.set_device(_PLACEMENT.gpu)
    signal.signal(signal.SIGTERM, _stop_worker)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose ``gnlm bench`` died (kill, kill -9) stops too, instead of running on and appending rows to
    a results directory that its study no longer owns; its run resumes from its checkpoint when the study does."""
    while os.getppid() == parent:
        time.sleep(1.0)
    _stop_worker(signal.SIGTERM, None)
