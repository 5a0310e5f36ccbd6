"""Parallel studies (launch.py, tasks.py, slurm.py): the local process pool (``gnlm bench --jobs N``) and Slurm
through submitit's local executor (``--launcher slurm --slurm.cluster=local``). A kill -9 of the whole study with
runs in flight, then a restart, must give the rows of an uninterrupted study; a dead worker is a failed run, not a
stopped study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from filelock import FileLock

from gnlm import launch, slurm, tasks
from gnlm.bench import run_study
from gnlm.cli import main
from gnlm.config import ConfigError
from gnlm.results import read_rows
from gnlm.study import study_from_dict

# One thread per run in every launcher (the pool never gives a run more than it asks for), so the numbers of a
# run do not depend on where it ran and rows compare exactly.
STUDY = {
    "name": "par",
    "base": {"model": "nano", "data": {"seq_len": 32, "eval_sequences": 4},
             "train": {"eval_every": 1, "eval_batch_size": 4, "threads": 1, "checkpoint_every": 1},
             "gn": {"inner_batch_size": 2, "line_search_batches": 1, "line_search_range": 2}},
    "warm_start": {"tokens": 256, "batch_tokens": 128, "lr": 1e-2},
    "target_loss": 1.0, "max_steps": 4, "batch_tokens": [128], "progress": False, "seeds": [1],
    "methods": [{"name": "adamw", "lrs": [1e-2, 3e-2]}, {"name": "gn", "lrs": [1e-2, 3e-2]}],
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def untimed(value):
    """``value`` without its timing fields (``wall_time``, ``total_wall_time``, ... at any depth)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if "wall_time" not in k}
    return [untimed(v) for v in value] if isinstance(value, list) else value


def comparable(rows: list) -> list[dict]:
    return sorted((untimed(asdict(r)) for r in rows), key=lambda r: r["run_id"])


@pytest.fixture(scope="module")
def study_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("study") / "par.yaml"
    path.write_text(json.dumps(STUDY))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The uninterrupted study, one run after another in this process."""
    rows = run_study(study_from_dict(STUDY), tmp_path_factory.mktemp("ref") / "res", report=False)
    assert len(rows) == 6 and all(r.status == "finished" for r in rows)  # 4 selection runs, 2 reported
    return comparable(rows)


def in_flight(res: Path) -> list[str]:
    """Runs that have a checkpoint but no row yet: started, not finished."""
    done = {r.run_id for r in read_rows(res)}
    ids = [str(p.parent.relative_to(res / "runs")) for p in (res / "runs").glob("**/checkpoint.pt")]
    return [i for i in ids if i not in done]


def kill_study_with_runs_in_flight(cmd: list[str], res: Path, min_rows: int) -> set[str]:
    """Start ``gnlm bench`` in a process group of its own and SIGKILL the whole group (the study and every process
    it started) once it has ``min_rows`` rows and a run in flight; returns the run ids finished by then."""
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while not (len(read_rows(res)) >= min_rows and in_flight(res)):
            assert proc.poll() is None, f"the study ended before the kill: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no run was ever in flight"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.5)  # the group's last processes are gone (their claim locks with them)
    return {r.run_id for r in read_rows(res)}


def bench_cmd(study_file: Path, res: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "gnlm", "bench", str(study_file), "--results", str(res), "--no-report", *flags]


# ------------------------------------------------------------------------------------------------ local pool


def test_kill_9_of_a_parallel_study_with_runs_in_flight_then_restart_gives_the_same_rows(tmp_path, study_file,
                                                                                          reference):
    res = tmp_path / "res"
    cmd = bench_cmd(study_file, res, "--jobs", "2")
    finished = kill_study_with_runs_in_flight(cmd, res, min_rows=1)
    assert 1 <= len(finished) < 6
    warm = (res / "warm_start" / "summary.json").stat().st_mtime_ns
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{len(finished)} already finished" in out.stderr
    rows = read_rows(res)
    assert len(rows) == 6  # every run once: none lost, none recorded twice
    assert comparable(rows) == reference
    assert (res / "warm_start" / "summary.json").stat().st_mtime_ns == warm  # the warm start was not trained again


def test_a_finished_study_run_again_with_jobs_2_prints_only_its_summary(tmp_path, study_file, reference):
    """Nothing left to run: no worker pool is left starting up when the process ends (it printed one multiprocessing
    traceback per worker), and --max-runs 0 announces no workers."""
    adamw = tmp_path / "adamw.yaml"
    adamw.write_text(json.dumps({**STUDY, "methods": [{"name": "adamw", "lrs": [1e-2]}]}))
    res = tmp_path / "res"
    first = subprocess.run(bench_cmd(adamw, res), env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    for flags in (["--jobs", "2"], ["--jobs", "2", "--max-runs", "0"]):
        out = subprocess.run(bench_cmd(adamw, res, *flags), env=ENV, capture_output=True, text=True, timeout=300)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 0 and all(line.startswith("gnlm bench:") for line in lines), out.stderr[-3000:]
        assert not any("worker processes" in line for line in lines)


@pytest.mark.slow
def test_a_killed_worker_leaves_no_leaked_semaphore_warning(tmp_path):
    """The run of a worker killed by a signal is a failed run, reported once; multiprocessing's resource tracker
    cleans up the pool's semaphores quietly instead of warning about them after the study's summary."""
    study = tmp_path / "long.yaml"
    study.write_text(json.dumps({**STUDY, "warm_start": None, "max_steps": 400,
                                 "methods": [{"name": "adamw", "lrs": [1e-2, 3e-2, 1e-1]}]}))
    env = {k: v for k, v in ENV.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.Popen(bench_cmd(study, tmp_path / "res", "--jobs", "2"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not in_flight(tmp_path / "res"):  # a run has its first checkpoint: its worker is busy
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"], capture_output=True,
                                 text=True).stdout.split()
        os.kill(int(workers[0]), signal.SIGKILL)
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "WorkerDied" in err and "leaked semaphore" not in err, err[-2000:]


def _task(key: str, out_dir: str, die: bool = False, placement: tasks.Placement | None = None):
    """A pool task for the tests below: records that it ran, or kills its own worker process."""
    if die:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1.0)
    with open(Path(out_dir) / "done.txt", "a") as f:
        f.write(key + "\n")
    return key, placement


def test_a_dead_worker_is_a_failed_run_and_the_other_runs_finish_once(tmp_path):
    pool = launch.LocalPool(2)
    todo = [tasks.Task(k, _task, (k, str(tmp_path), k == "b"), str(tmp_path / "locks" / f"{k}.lock"))
            for k in "abcd"]
    outcomes = {o.task.key: o for o in pool.run(todo) if o.task is not None}
    assert isinstance(outcomes["b"].error, launch.WorkerDied)
    for k in "acd":
        key, placement = outcomes[k].result
        assert key == k and outcomes[k].error is None
        assert placement == tasks.Placement(threads=max(1, launch.cpu_count() // 2), gpu=None)
    assert sorted((tmp_path / "done.txt").read_text().split()) == ["a", "c", "d"]  # each finished exactly once


def test_a_run_claimed_by_another_process_is_skipped_then_run_later(tmp_path):
    res = tmp_path / "res"
    study = study_from_dict({**STUDY, "warm_start": None, "methods": [{"name": "adamw", "lrs": [1e-2, 3e-2]}]})
    held = FileLock(str(tasks.lock_path(res, "adamw/b128/lr0.03/s0")))
    tasks.lock_path(res, "x").parent.mkdir(parents=True)
    held.acquire()  # another gnlm bench process is running this run
    try:
        rows = run_study(study, res, report=False)
        assert [r.run_id for r in rows] == ["adamw/b128/lr0.01/s0"]  # the selection waits for the held run
    finally:
        held.release()
    rows = run_study(study, res, report=False)
    assert [r.run_id for r in rows] == ["adamw/b128/lr0.01/s0", "adamw/b128/lr0.03/s0", f"adamw/b128/lr{rows[2].lr:g}/s1"]


def test_progress_text_counts_parallel_runs():
    p = launch.Progress(slots=2)
    assert p.text(left=6, running=2) == "2 in flight"  # no run finished yet: no estimate
    p.add(10.0)
    p.add(30.0)
    # 4 queued runs on 2 slots = 2 waves of 20 s, plus half a run for the 2 in flight
    assert p.text(left=6, running=2) == "2 in flight, ~50s left"
    assert launch.Progress(slots=1).text(left=3, running=0) == ""
    seq = launch.Progress(slots=1)
    seq.add(100.0)
    assert seq.text(left=3, running=0) == "~5m00s left"
    wave = launch.Progress(slots=1, wave=True)  # a search plans more runs after these: the estimate is the wave's
    wave.add(100.0)
    assert wave.text(left=3, running=0) == "~5m00s left in this wave"


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("flags,message", [
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--launcher", "slurm", "--jobs", "2"], "--jobs is for --launcher local"),
    (["--slurm.partition=gpu"], "--slurm.partition needs --launcher slurm"),
    (["--launcher", "slurm", "--slurm.cluster=local", "--slurm.time=soon"], "is not a Slurm time limit"),
    (["--launcher", "slurm", "--slurm.cluster=local", "--slurm.gpus_per_job=4", "--slurm.tasks_per_job=2"],
     "gnlm runs one process per GPU"),
])
def test_bad_launch_options_are_one_line_config_errors(tmp_path, study_file, capsys, flags, message):
    assert main(["bench", str(study_file), "--results", str(tmp_path / "res"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "res").exists()  # nothing trained or written


def test_slurm_launcher_without_submitit_or_without_slurm_says_what_to_do(tmp_path, monkeypatch):
    cfg = launch.LaunchConfig(launcher="slurm")
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="sbatch is not on PATH"):
        launch.make_launcher(cfg, tmp_path, "s")
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(ConfigError, match=r"pip install 'gnlm\[slurm\]'"):
        launch.make_launcher(cfg, tmp_path, "s")


def test_slurm_time_formats():
    assert [slurm.slurm_minutes(t) for t in ("90", "4:00:00", "1-00:00:00", "1-2", "30:30")] == [90, 240, 1440,
                                                                                                   1560, 31]
    with pytest.raises(ConfigError, match="under a minute"):
        slurm.slurm_minutes("0:30")


# --------------------------------------------------------------------------------------- submitit (local executor)


@pytest.mark.slow  # 20-25 s of subprocesses; the local pool's kill-and-restart test stays in the default run
def test_submitit_local_executor_submits_collects_and_resubmits_only_missing_runs_after_a_kill(tmp_path, study_file,
                                                                                              reference):
    pytest.importorskip("submitit")
    adamw = tmp_path / "adamw.yaml"  # the AdamW half of the study: its runs are the same runs (same warm start)
    adamw.write_text(json.dumps({**STUDY, "methods": STUDY["methods"][:1]}))
    expected = [r for r in reference if r["method"] == "adamw"]
    res = tmp_path / "res"
    cmd = bench_cmd(adamw, res, "--launcher", "slurm", "--slurm.cluster=local", "--slurm.poll_s=0.2",
                    "--slurm.time=10")
    finished = kill_study_with_runs_in_flight(cmd, res, min_rows=0)
    records = (res / "slurm" / "jobs.jsonl").read_text().splitlines()
    first_wave = [r["run_id"] for r in expected if r["seed"] == 0]  # the reported seed waits for the selection
    assert sorted(json.loads(r)["key"] for r in records) == sorted(["warm_start", *first_wave])
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = read_rows(res)
    assert len(rows) == 3 and comparable(rows) == expected
    again = [json.loads(r)["key"] for r in (res / "slurm" / "jobs.jsonl").read_text().splitlines()[len(records):]]
    missing = sorted(r["run_id"] for r in expected if r["run_id"] not in finished)
    assert sorted(k for k in again if k != "warm_start") == missing  # only what was missing was submitted again
    assert not (res / "slurm" / "%j").exists()  # no folder named after submitit's job-id template


@pytest.mark.slow
def test_a_submitit_job_with_two_tasks_is_one_data_parallel_run(tmp_path, reference):
    """--slurm.tasks_per_job=2: submitit's TorchDistributedEnvironment gives gnlm torchrun's variables (gloo on
    CPU); each run trains on 2 processes and gets the rows of 1 process (up to float rounding)."""
    pytest.importorskip("submitit")
    adamw = tmp_path / "adamw.yaml"
    adamw.write_text(json.dumps({**STUDY, "methods": STUDY["methods"][:1]}))
    res = tmp_path / "res"
    out = subprocess.run(bench_cmd(adamw, res, "--launcher", "slurm", "--slurm.cluster=local", "--slurm.poll_s=0.2",
                                   "--slurm.time=10", "--slurm.tasks_per_job=2"),
                         env=ENV, capture_output=True, text=True, check=False, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = comparable(read_rows(res))
    expected = [r for r in reference if r["method"] == "adamw"]
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in expected]
    for r, e in zip(rows, expected):
        assert r["final_eval_loss"] == pytest.approx(e["final_eval_loss"], rel=1e-5)
        assert json.loads((res / r["run_dir"] / "summary.json").read_text())["world_size"] == 2


def test_a_refused_slurm_submission_is_a_one_line_config_error(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    launcher = launch.make_launcher(launch.LaunchConfig(launcher="slurm", slurm=slurm.SlurmOptions(cluster="local")),
                                    tmp_path, "s")

    def refuse(*args, **kwargs):
        raise RuntimeError("Could not submit the job:\nsbatch: error: invalid partition specified: gpux")

    monkeypatch.setattr(launcher.executor, "submit", refuse)
    task = tasks.Task("r", print, (), str(tasks.lock_path(tmp_path, "r")))
    with pytest.raises(ConfigError) as err:
        list(launcher.run([task]))
    assert "invalid partition specified: gpux" in str(err.value) and "\n" not in str(err.value)
