"""Where the runs of a study run: one after another in this process (the default), up to N at once in worker
processes on this machine (``gnlm bench --jobs N``), or as Slurm jobs through submitit (``--launcher slurm``).

Every launcher is an executor that takes a :class:`Task` (one run: a module-level function and its arguments) and
hands back its result (the run's row): ``concurrent.futures.ProcessPoolExecutor`` with the spawn start method on
this machine, a submitit executor on Slurm (``--slurm.cluster=local`` runs the same submitit code path as local
processes through submitit's LocalExecutor; the tests use it). There is no scheduler of our own: the pool or Slurm
decides what runs when.

The results directory stays the single source of truth. Wherever a task lands, :func:`run_task` claims it with an
exclusive lock file (``locks/<run id>.lock``, released by the OS when the process dies, kill -9 included), and the
task's function (``bench.record_run``) trains the run, resuming its checkpoint, and appends its row to
``runs.jsonl`` under that file's lock unless a row is there already. So a killed launcher loses nothing that
finished, a restarted one continues where it stopped, and two ``gnlm bench`` processes on one results directory
never run one run twice (a run claimed elsewhere is skipped; a Slurm job waits for the claim instead, see below).

Local pool (``--jobs N``): worker i takes ``cores // N`` CPU threads (``train.threads``) and, on a GPU machine,
``cuda:(i mod #GPUs)`` (``train.device``, when the run's device is ``auto`` or ``cuda``). A worker that dies
(out-of-memory kill, segfault) breaks a ``ProcessPoolExecutor``: the pool stops the other workers, which mark
their runs "stopped" from a SIGTERM handler; the run whose worker died without that mark is recorded as failed,
the others go to a new pool and resume from their checkpoints.

Slurm (``--launcher slurm``): the warm start is one job, then every run is one job (submitted together as a job
array) with the ``--slurm.*`` resources; job ids are recorded in ``slurm/jobs.jsonl``, so a restarted
``gnlm bench`` re-attaches to jobs still pending or running and submits only runs that have neither a row nor a
live job (a run re-submitted while an old job of it still runs waits for that job's claim, then takes its row).
A job with several tasks (``--slurm.gpus_per_job=K`` starts K tasks, one per GPU) is one data-parallel run:
submitit's ``TorchDistributedEnvironment`` sets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and gnlm's torchrun path (``distributed.py``) does the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

from gnlm import distributed as dist
from gnlm.config import ConfigError

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
HEARTBEAT_S = 5.0  # the local pool refreshes the progress bar this often while no run finishes
SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}
MAX_POOL_RETRIES = 3  # a run pending in a pool that broke this often without its own worker dying is failed
_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"  # a -W option (see LocalPool._pool)


# ---------------------------------------------------------------------------------------------------- options


def slurm_minutes(value: str | int) -> int:
    """A Slurm ``--time`` (minutes, MM:SS, H:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, rounded up."""
    text = str(value).strip()
    try:
        days, rest = text.split("-", 1) if "-" in text else ("0", text)
        parts = [int(p) for p in rest.split(":")]
        if any(p < 0 for p in parts) or not 1 <= len(parts) <= 3:
            raise ValueError
        if "-" in text:  # D-HH, D-HH:MM, D-HH:MM:SS
            h, m, s = (parts + [0, 0])[:3]
        elif len(parts) == 3:  # HH:MM:SS
            h, m, s = parts
        else:  # MM, MM:SS
            h, m, s = 0, parts[0], parts[1] if len(parts) == 2 else 0
        seconds = ((int(days) * 24 + h) * 60 + m) * 60 + s
    except ValueError:
        raise ConfigError(f"--slurm.time={value!r} is not a Slurm time limit; write minutes (90), H:MM:SS (4:00:00) "
                          f"or D-HH:MM:SS (1-00:00:00)") from None
    if seconds < 60:
        raise ConfigError(f"--slurm.time={value!r} is under a minute; give each job at least 1 minute")
    return -(-seconds // 60)


@dataclass
class SlurmOptions:
    """``--slurm.KEY=VALUE``: what each run's Slurm job asks for."""

    partition: str | None = None
    time: str = "60"
    gpus_per_job: int = 0
    tasks_per_job: int | None = None
    nodes: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 256
    setup: list[str] = field(default_factory=list)
    cluster: Literal["slurm", "local"] = "slurm"
    poll_s: float = 15.0

    @property
    def tasks(self) -> int:
        """Processes per job: one per GPU unless given (more than one: one data-parallel run)."""
        return self.tasks_per_job or max(1, self.gpus_per_job)

    def validate(self) -> None:
        slurm_minutes(self.time)
        for name in ("gpus_per_job", "nodes", "array_parallelism", "cpus_per_task", "tasks_per_job"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "gpus_per_job" else 1):
                raise ConfigError(f"--slurm.{name} must be >= {0 if name == 'gpus_per_job' else 1}, got {value}")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ConfigError(f"--slurm.mem_gb must be > 0, got {self.mem_gb}")
        if not self.poll_s > 0:
            raise ConfigError(f"--slurm.poll_s must be > 0 seconds, got {self.poll_s}")
        if self.tasks % self.nodes or self.gpus_per_job % self.nodes:
            raise ConfigError(f"--slurm.nodes={self.nodes} must divide the tasks ({self.tasks}) and GPUs "
                              f"({self.gpus_per_job}) of a job; every node runs the same number of each")
        if self.gpus_per_job and self.tasks not in (1, self.gpus_per_job):
            raise ConfigError(f"--slurm.tasks_per_job={self.tasks} with --slurm.gpus_per_job={self.gpus_per_job}: "
                              f"gnlm runs one process per GPU; leave tasks_per_job unset")
        if self.cluster == "local" and self.nodes != 1:
            raise ConfigError("--slurm.cluster=local runs jobs on this machine only; use --slurm.nodes=1")

    def parameters(self, name: str) -> dict[str, Any]:
        """submitit ``update_parameters`` keywords (``slurm_*`` ones are ignored by the local cluster)."""
        params: dict[str, Any] = {
            "name": name, "timeout_min": slurm_minutes(self.time), "nodes": self.nodes,
            "tasks_per_node": self.tasks // self.nodes, "gpus_per_node": self.gpus_per_job // self.nodes,
            "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb, "slurm_partition": self.partition,
            "slurm_account": self.account, "slurm_qos": self.qos, "slurm_constraint": self.constraint,
            "slurm_array_parallelism": self.array_parallelism, "slurm_setup": list(self.setup) or None,
        }
        return {k: v for k, v in params.items() if v is not None}


_SLURM_HELP = {
    "partition": "Slurm partition of every job",
    "time": "time limit per job: minutes (90), H:MM:SS or D-HH:MM:SS (default 60)",
    "gpus_per_job": "GPUs per job (default 0); K > 1 starts K tasks, one data-parallel run (torchrun-style)",
    "tasks_per_job": "processes per job (default: one per GPU, else 1); > 1 is one data-parallel run",
    "nodes": "nodes per job (default 1)",
    "cpus_per_task": "CPU cores per task",
    "mem_gb": "memory per node in GB",
    "account": "Slurm account",
    "qos": "Slurm quality of service",
    "constraint": "Slurm node constraint",
    "array_parallelism": "at most this many of the study's jobs run at once (default 256)",
    "setup": "shell line run before each job, e.g. 'source .venv/bin/activate' (repeatable)",
    "cluster": "slurm (default) or local: submitit's LocalExecutor runs the jobs here (testing, no Slurm)",
    "poll_s": "seconds between checks of the jobs' states (default 15)",
}


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
                            help=_SLURM_HELP[f.name], **kwargs)


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


# ------------------------------------------------------------------------------------------------------ tasks


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


class WorkerDied(RuntimeError):
    """The process running a task died (killed by a signal, e.g. the out-of-memory killer, or crashed)."""


class JobFailed(RuntimeError):
    """A Slurm job ended without a result."""


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


def _read_state(lock: str | Path) -> dict[str, Any]:
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


def _ready() -> None:
    """Nothing: submitted to start a pool's workers ahead of their first run."""


def _init_worker(counter: Any, threads: int, gpus: int) -> None:
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


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -------------------------------------------------------------------------------------------------- launchers


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
                self._started.submit(_ready)  # a submit to a pool without an idle worker spawns one
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
        return ProcessPoolExecutor(self.slots, mp_context=ctx, initializer=_init_worker,
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
                    state = _read_state(task.lock)
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


def import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher slurm needs submitit: pip install 'gnlm[slurm]'") from None
    return submitit


class SlurmLauncher:
    """``--launcher slurm``: one submitit job per task, job ids recorded in ``<results>/slurm/jobs.jsonl``."""

    def __init__(self, opts: SlurmOptions, results_dir: str | Path, name: str):
        submitit = import_submitit()
        if opts.cluster == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError("--launcher slurm: sbatch is not on PATH (no Slurm here); start gnlm bench where Slurm "
                              "jobs are submitted, or use --jobs N to run on this machine")
        self.opts = opts
        self.folder = Path(results_dir) / "slurm"
        self.records = self.folder / "jobs.jsonl"
        self.slots = opts.array_parallelism
        self.running = 0
        self.executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=opts.cluster)
        self.executor.update_parameters(**opts.parameters(name))

    def describe(self) -> str:
        where = "Slurm" if self.opts.cluster == "slurm" else "submitit's local executor"
        return f"one job per run on {where} ({self.opts.tasks} task(s) each), logs in {self.folder}"

    def call(self, task: Task) -> Any:
        """The warm start: one job, waited for."""
        for out in self.run([task]):
            if out.task is None:
                continue
            if out.error is not None:
                raise ConfigError(f"the {task.key} job failed: {out.error}")
            return out.result

    def close(self) -> None:
        """Nothing to stop: submitted jobs run on (a restarted study re-attaches to them). submitit leaves an empty
        folder named after its job-id template (``slurm/%j``) behind: it goes."""
        with contextlib.suppress(OSError):
            (self.folder / "%j").rmdir()

    def _recorded(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.records.exists():
            for line in self.records.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    out[rec["key"]] = str(rec["job_id"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line
        return out

    def _record(self, pairs: list[tuple[str, str]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.records) + ".lock"), open(self.records, "a") as f:
            f.write("".join(json.dumps({"key": k, "job_id": j, "time": time.time()}) + "\n" for k, j in pairs))
            f.flush()
            os.fsync(f.fileno())

    def run(self, tasks: list[Task]) -> Iterator[Outcome]:
        submitit = import_submitit()
        job_class = submitit.SlurmJob if self.opts.cluster == "slurm" else submitit.LocalJob
        ntasks = self.opts.tasks
        # A run re-submitted while an old job of it still runs (one a restart could not re-attach to) waits for
        # that job's claim, then finds its row.
        tasks = [replace(t, wait=True) for t in tasks]
        recorded = self._recorded()
        jobs: dict[str, Any] = {}
        for t in tasks:
            if t.key in recorded:
                job = job_class(folder=self.folder / "%j", job_id=recorded[t.key], tasks=tuple(range(ntasks)))
                if job.state in SLURM_ALIVE:
                    jobs[t.key] = job
        new = [t for t in tasks if t.key not in jobs]
        if new:
            try:
                with self.executor.batch():
                    submitted = [self.executor.submit(run_task, t, None, ntasks > 1) for t in new]
            except Exception as e:  # noqa: BLE001 - sbatch refused: unknown partition or account, too long a time
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
                raise ConfigError(f"submitting the jobs failed ({lines[-1]}); check the --slurm.* options") from None
            self._record([(t.key, str(j.job_id)) for t, j in zip(new, submitted)])
            jobs.update({t.key: j for t, j in zip(new, submitted)})
        if dist.is_main() and len(tasks) > 1:
            print(f"gnlm bench: {len(new)} jobs submitted, re-attached to {len(tasks) - len(new)} still queued or "
                  f"running; logs in {self.folder}", file=sys.stderr)
        task_of = {id(j): t for t, j in zip(tasks, (jobs[t.key] for t in tasks))}
        self.running = min(self.slots, len(jobs))
        left = len(jobs)
        for job in submitit.helpers.as_completed(list(jobs.values()), poll_frequency=self.opts.poll_s):
            left -= 1
            self.running = min(self.slots, left)
            task = task_of[id(job)]
            try:
                result, seconds = job.results()[0]
            except Exception as e:  # noqa: BLE001 - the job died (time limit, node failure, out of memory)
                yield Outcome(task, error=JobFailed(_job_error(job, e)))
                continue
            yield Outcome(task, result, seconds=seconds)


def _job_error(job: Any, err: BaseException) -> str:
    """One line: the job, its state and the last error line of its trace, and where its log is."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    named = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception", "Interrupt"))]
    what = (named or lines or [type(err).__name__])[-1]
    try:
        state = job.state
    except Exception:  # noqa: BLE001 - the scheduler may not answer
        state = "UNKNOWN"
    return f"job {job.job_id} ended {state}: {what} (log: {job.paths.stderr})"


def make_launcher(cfg: LaunchConfig | None, results_dir: str | Path, name: str) -> InProcess | LocalPool | SlurmLauncher:
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
    run at once (the first runs of a parallel study finish together; a rate of runs per second would be N× off)."""

    def __init__(self, slots: int):
        self.slots = max(1, slots)
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
            parts.append(f"~{_duration(mean * (queued / self.slots + (0.5 if running else 0.0)))} left")
        return ", ".join(parts)
