"""Where the runs of a study run: one after another in this process (the default), up to N at once in worker
processes on this machine (``gnlm bench --jobs N``), or as Slurm jobs through submitit (``--launcher slurm``,
``slurm.py``).

Every launcher is an executor that takes a :class:`~gnlm.tasks.Task` (one run: a module-level function and its
arguments) and hands back its result (the run's row): ``concurrent.futures.ProcessPoolExecutor`` with the spawn
start method on this machine, a submitit executor on Slurm. There is no scheduler of our own: the pool or Slurm
decides what runs when. Wherever a task lands, ``tasks.run_task`` claims it, so a killed launcher loses nothing
that finished, a restarted one continues where it stopped, and two ``gnlm bench`` processes on one results
directory never run one run twice.

Local pool (``--jobs N``): worker i takes ``cores // N`` CPU threads (``train.threads``) and, on a GPU machine,
``cuda:(i mod #GPUs)`` (``train.device``, when the run's device is ``auto`` or ``cuda``). A worker that dies
(out-of-memory kill, segfault) breaks a ``ProcessPoolExecutor``: the pool stops the other workers, which mark
their runs "stopped" from a SIGTERM handler; the run whose worker died without that mark is recorded as failed,
the others go to a new pool and resume from their checkpoints.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from gnlm import distributed as dist
from gnlm.config import ConfigError
from gnlm.slurm import SLURM_HELP, SlurmLauncher, SlurmOptions
from gnlm.tasks import Outcome, Task, init_worker, read_state, run_task, worker_ready

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
HEARTBEAT_S = 5.0  # the local pool refreshes the progress bar this often while no run finishes
MAX_POOL_RETRIES = 3  # a run pending in a pool that broke this often without its own worker dying is failed
_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"  # a -W option (see LocalPool._pool)


# ---------------------------------------------------------------------------------------------------- options


@dataclass
class LaunchConfig:
    """How ``gnlm bench`` runs a study's runs: ``launcher`` local (``jobs`` at once) or slurm (``slurm``)."""

    launcher: Literal["local", "slurm"] = "local"
    jobs: int = 1
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    def validate(self) -> None:
        if self.launcher not in ("local", "slurm"):
            raise ConfigError(f"--launcher must be local or slurm, got {self.launcher!r}")
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1 (runs at once), got {self.jobs}; --jobs 1 runs one run at a time")
        if self.launcher == "slurm" and self.jobs != 1:
            raise ConfigError("--jobs is for --launcher local; on Slurm every run is its own job (cap how many run "
                              "at once with --slurm.array_parallelism=N)")
        self.slurm.validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--jobs``, ``--launcher`` and one ``--slurm.KEY`` per :class:`SlurmOptions` field."""
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run up to N runs at once in worker processes on this machine (cores // N threads "
                             "each; one GPU each, round-robin, on a GPU machine)")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="local (default): this machine; slurm: one Slurm job per run through submitit "
                             "(pip install 'gnlm[slurm]')")
    for f in fields(SlurmOptions):
        kind = {"int | None": int, "int": int, "float | None": float, "float": float}.get(str(f.type), str)
        kwargs: dict[str, Any] = {"action": "append"} if f.name == "setup" else {"type": kind}
        if f.name == "cluster":
            kwargs["choices"] = ["slurm", "local"]
        parser.add_argument(f"--slurm.{f.name}", dest=f"slurm.{f.name}", default=None, metavar="VALUE",
                            help=SLURM_HELP[f.name], **kwargs)


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    """The checked :class:`LaunchConfig` of parsed ``gnlm bench`` arguments (one-line ConfigError when wrong)."""
    given = {f.name: getattr(args, f"slurm.{f.name}", None) for f in fields(SlurmOptions)}
    given = {k: v for k, v in given.items() if v is not None}
    launcher = getattr(args, "launcher", "local") or "local"
    if given and launcher != "slurm":
        raise ConfigError(f"--slurm.{next(iter(given))} needs --launcher slurm")
    cfg = LaunchConfig(launcher=launcher, jobs=getattr(args, "jobs", 1), slurm=SlurmOptions(**given))
    cfg.validate()
    return cfg


# -------------------------------------------------------------------------------------------------- launchers


class WorkerDied(RuntimeError):
    """The process running a task died (killed by a signal, e.g. the out-of-memory killer, or crashed)."""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class InProcess:
    """``--jobs 1`` (the default): one run after another in this process (under torchrun, on every rank)."""

    slots = 1
    running = 0

    def describe(self) -> str:
        return "one run at a time in this process"

    def call(self, task: Task) -> Any:
        return run_task(task)[0]

    def run(self, tasks: list[Task]) -> Iterator[Outcome]:
        for task in tasks:
            result, seconds = run_task(task)
            yield Outcome(task, result, seconds=seconds)

    def close(self) -> None:
        """Nothing to stop."""


def _outcomes(finished: list[tuple[Any, Task]], broken: list[Task]) -> Iterator[Outcome]:
    """The outcome of each finished future; tasks whose pool broke under them are added to ``broken`` instead."""
    for f, task in finished:
        if isinstance(f.exception(), BrokenProcessPool):
            broken.append(task)
        elif f.exception() is not None:
            yield Outcome(task, error=f.exception())
        else:
            result, seconds = f.result()
            yield Outcome(task, result, seconds=seconds)


class LocalPool:
    """``--jobs N``: N spawned worker processes on this machine (``ProcessPoolExecutor``)."""

    def __init__(self, jobs: int):
        import torch

        self.slots = jobs
        self.threads = max(1, cpu_count() // jobs)
        self.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.running = 0
        self._started: ProcessPoolExecutor | None = None

    def describe(self) -> str:
        gpus = f", round-robin over {self.gpus} GPUs" if self.gpus else ""
        return f"{self.slots} worker processes with {self.threads} CPU thread{'s' * (self.threads > 1)} each{gpus}"

    def call(self, task: Task) -> Any:
        """The warm start: in this process, on every core, before any run starts. The workers start meanwhile, so
        that their imports (torch: seconds each) overlap it."""
        if self._started is None:
            self._started = self._pool()
            for _ in range(self.slots):
                self._started.submit(worker_ready)  # a submit to a pool without an idle worker spawns one
        return run_task(task)[0]

    def close(self) -> None:
        """Stop the workers started for the warm start when no run used them (every run already finished): a
        process that exits with a pool still starting prints one traceback per worker."""
        if self._started is not None:
            self._started.shutdown(wait=True, cancel_futures=True)
            self._started = None

    def _pool(self) -> ProcessPoolExecutor:
        # A worker killed by a signal leaves the pool's semaphores to multiprocessing's resource tracker, which
        # cleans them up when the study ends and warns about them in two lines after its summary; the run is already
        # reported as failed, so the tracker (started with these interpreter flags) is told to clean up quietly.
        if _QUIET_TRACKER not in sys.warnoptions:
            sys.warnoptions.append(_QUIET_TRACKER)
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch threads or CUDA state
        return ProcessPoolExecutor(self.slots, mp_context=ctx, initializer=init_worker,
                                   initargs=(ctx.Value("i", 0), self.threads, self.gpus))

    def run(self, tasks: list[Task]) -> Iterator[Outcome]:
        session, generation, retries = uuid.uuid4().hex, 0, dict.fromkeys((t.key for t in tasks), 0)
        token = f"{session}:{generation}"
        pool, self._started = self._started or self._pool(), None
        futures = {pool.submit(run_task, t, token): t for t in sorted(tasks, key=lambda t: -t.cost)}
        try:
            while futures:
                done, _ = wait(futures, timeout=HEARTBEAT_S, return_when=FIRST_COMPLETED)
                broken = []
                yield from _outcomes([(f, futures.pop(f)) for f in done], broken)
                self.running = min(self.slots, sum(f.running() for f in futures))
                if not done:
                    yield Outcome(None)
                if not broken:
                    continue
                # A worker died. The pool fails every future left and stops its other workers (SIGTERM: they mark
                # their runs "stopped"); once it is down, the run still marked "running" is the dead worker's.
                pool.shutdown(wait=True)
                yield from _outcomes(list(futures.items()), broken)
                again = []
                for task in broken:
                    state = read_state(task.lock)
                    if state.get("token") == token and state.get("state") == "running":
                        yield Outcome(task, error=WorkerDied("its worker process died (killed by a signal, e.g. "
                                                             "the out-of-memory killer, or crashed)"))
                    elif retries[task.key] >= MAX_POOL_RETRIES:
                        yield Outcome(task, error=WorkerDied(f"the worker pool broke {MAX_POOL_RETRIES} times while "
                                                             f"this run was in it"))
                    else:
                        retries[task.key] += 1
                        again.append(task)
                generation += 1
                token = f"{session}:{generation}"
                pool = self._pool()
                futures = {pool.submit(run_task, t, token): t for t in again}
        finally:
            self.running = 0
            pool.shutdown(wait=True, cancel_futures=True)


def make_launcher(cfg: LaunchConfig | None, results_dir: str | Path,
                  name: str) -> InProcess | LocalPool | SlurmLauncher:
    """The launcher of ``cfg`` (default: in this process); ConfigError for options that cannot work here."""
    cfg = cfg or LaunchConfig()
    cfg.validate()
    if cfg.launcher == "slurm":
        return SlurmLauncher(cfg.slurm, results_dir, f"gnlm-{name}")
    if cfg.jobs > 1:
        if dist.world_size() > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--jobs N starts its own processes; under torchrun use --jobs 1 (every rank trains "
                              "each run)")
        return LocalPool(cfg.jobs)
    return InProcess()


# --------------------------------------------------------------------------------------------------- progress


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """The progress bar's text: runs in flight, and the time left from the mean time of a run so far and how many
    run at once (the first runs of a parallel study finish together; a rate of runs per second would be N× off).
    ``wave``: more runs will be planned once these finish (a search still waits for their rows), so the time left
    is the wave's, and says so."""

    def __init__(self, slots: int, wave: bool = False):
        self.slots = max(1, slots)
        self.wave = wave
        self.times: list[float] = []

    def add(self, seconds: float | None) -> None:
        if seconds is not None:
            self.times.append(seconds)

    def text(self, left: int, running: int) -> str:
        running = min(running, left)
        parts = [f"{running} in flight"] if self.slots > 1 and left else []
        if self.times and left:
            mean = sum(self.times) / len(self.times)
            queued = max(0, left - running)
            where = " in this wave" if self.wave else ""
            parts.append(f"~{_duration(mean * (queued / self.slots + (0.5 if running else 0.0)))} left{where}")
        return ", ".join(parts)
