"""Slurm (``gnlm bench --launcher slurm``): one submitit job per run.

The warm start is one job, then every run is one job (submitted together as a job array) with the ``--slurm.*``
resources (:class:`SlurmOptions`); job ids are recorded in ``slurm/jobs.jsonl``, so a restarted ``gnlm bench``
re-attaches to jobs still pending or running and submits only runs that have neither a row nor a live job (a run
re-submitted while an old job of it still runs waits for that job's claim, then takes its row; ``tasks.py``).
A job with several tasks (``--slurm.gpus_per_job=K`` starts K tasks, one per GPU) is one data-parallel run:
submitit's ``TorchDistributedEnvironment`` sets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and gnlm's torchrun path (``distributed.py``) does the rest. ``--slurm.cluster=local`` runs the same
submitit code path as local processes through submitit's LocalExecutor (the tests use it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock

from gnlm import distributed as dist
from gnlm.config import ConfigError
from gnlm.tasks import Outcome, Task, run_task

SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


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


SLURM_HELP = {
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


class JobFailed(RuntimeError):
    """A Slurm job ended without a result."""


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
