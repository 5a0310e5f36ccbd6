"""``gnlm bench``: run (or continue) a study. Trains the shared AdamW warm start once, then the runs that
``plan.plan_runs`` asks for, in waves (an lr search plans its next runs from the rows of the previous ones), with
the launcher of ``launch.py``, and writes the report at the end.

The declaration is ``study.py``, the planning ``plan.py``, the results file ``results.py``. A results directory::

    study.yaml        the resolved study (a different study in the same directory is refused)
    runs.jsonl        one row per finished run (results.Row), appended atomically under runs.jsonl.lock
    locks/            one claim file per run, held while it runs (tasks.py): no run runs twice, even from two processes
    slurm/            --launcher slurm: submitit's job folders and logs, jobs.jsonl (run -> Slurm job id)
    warm_start/       the shared AdamW warm start (a normal run directory; every run starts from its checkpoint)
    runs/<method>/b<batch tokens>/lr<lr>/s<seed>/   one run directory each (config, metrics.jsonl, summary.json)
    report.md, *.png, summary.json    written by ``gnlm report`` (report.py) at the end

Starting the same study again continues it: finished runs are skipped, an unfinished run is resumed from its
checkpoint when it has one and restarted otherwise.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from gnlm import distributed as dist
from gnlm import launch, results
from gnlm.checkpoint import atomic_write_bytes
from gnlm.config import ConfigError, merge, to_dict
from gnlm.plan import LrSearchStop, RunSpec, most_runs, plan_runs
from gnlm.report import write_report
from gnlm.resources import check_run_memory, resolve_device
from gnlm.results import Row
from gnlm.runconfig import run_config_to_dict, run_differences
from gnlm.rundir import has_checkpoint, read_saved_config
from gnlm.study import StudyConfig, study_differences, warm_start_path
from gnlm.tasks import Placement, Task, lock_path
from gnlm.train import run_training


def check_results_dir(study: StudyConfig, results_dir: Path) -> None:
    """Refuse a results directory that holds a different study with finished runs (execution-only options aside);
    a different study with no finished run leaves its partial run directories behind to be replaced."""
    saved_path = results_dir / "study.yaml"
    if results_dir.exists() and not results_dir.is_dir():
        raise ConfigError(f"--results {results_dir} is a file, not a directory; choose another results directory")
    if not saved_path.exists():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text())
        if not isinstance(saved, dict):
            raise ConfigError("it is not a YAML mapping")
        diff = study_differences(saved, study)
    except (yaml.YAMLError, ConfigError) as e:
        why = "it is not valid YAML" if isinstance(e, yaml.YAMLError) else str(e)
        raise ConfigError(f"results directory {results_dir}: cannot read its study.yaml ({why}); use another results "
                          f"directory (--results DIR) or pass --overwrite to replace it") from None
    recorded = results.read_rows(results_dir)  # a runs.jsonl that holds no rows is refused before anything is written
    if not diff:
        return
    if recorded:
        raise ConfigError(f"results directory {results_dir} holds a different study (differs in {', '.join(diff[:4])});"
                          f" use another results directory (--results DIR) or pass --overwrite to replace it")
    shutil.rmtree(results_dir / "runs", ignore_errors=True)  # its partial run directories must not be resumed


def _run_plan(spec: RunSpec, results_dir: Path) -> tuple[str, Any]:
    """What to do with a run, decided from its directory: ("row", row) when it finished before an interruption
    (its row not yet written), else ("train", resume)."""
    run_dir = Path(spec.run_dir)
    saved = read_saved_config(run_dir)
    # Bookkeeping keys (where the directory lives, threads, device, checkpoint cadence) never make a run directory
    # another run's.
    if saved is not None and not run_differences(saved, spec.config) and (run_dir / "summary.json").exists():
        return "row", results.finished_row(spec, json.loads((run_dir / "summary.json").read_text()), results_dir)
    resumable = saved is not None and not run_differences(saved, spec.config, may_continue=True)
    return "train", resumable and has_checkpoint(run_dir)


def execute_run(spec: RunSpec, results_dir: Path) -> Row:
    """Train one run (resuming its checkpoint when there is one) and return its row; a run that raises is recorded
    as not reached with the error, never propagated (except Ctrl-C). Under torchrun rank 0 reads the run directory
    and every rank trains."""
    try:
        action, value = dist.main_first(lambda: _run_plan(spec, results_dir))
        if action == "row":
            return value
        stop = None if spec.prune_against is None else LrSearchStop(
            results_dir, spec.run_id, spec.method, spec.batch_tokens, spec.seed, spec.prune_against)
        summary = run_training(spec.run_config(), resume=value, overwrite=not value, stop=stop)
        return results.finished_row(spec, summary, results_dir)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failing run is a result ("not reached"), not the end of the study
        return results.error_row(spec, e, results_dir)


def record_run(spec: RunSpec, results_dir: str | Path, placement: Placement | None = None) -> Row:
    """One run as a launcher's task (``launch.py``), in whichever process it lands, holding the run's claim: its
    row when runs.jsonl has one already, else train it (:func:`execute_run`) and append its row. ``placement`` (a
    worker of the local pool): the run's CPU threads and GPU."""
    results_dir = Path(results_dir)
    found = dist.main_first(lambda: results.find_row(results_dir, spec.run_id))
    if found is not None:
        return found
    if placement is not None:
        spec = replace(spec, config=merge(spec.config, {"train": placement.train_overrides(spec.config["train"])}))
    row = execute_run(spec, results_dir)
    if dist.is_main():
        results.append_row(results_dir, row)
    return row


def _warm_start_done(study: StudyConfig, results_dir: Path) -> tuple[dict[str, Any] | None, bool]:
    """(the warm start's summary when it finished, whether an unfinished one can resume its checkpoint)."""
    cfg = run_config_to_dict(study.warm_start_config(results_dir))
    wdir = results_dir / "warm_start"
    saved = read_saved_config(wdir)
    if saved is None:
        return None, False
    if (wdir / "summary.json").exists() and warm_start_path(results_dir).exists() and not run_differences(saved, cfg):
        return json.loads((wdir / "summary.json").read_text()), False
    return None, has_checkpoint(wdir) and not run_differences(saved, cfg, may_continue=True)


def run_warm_start(study: StudyConfig, results_dir: Path) -> dict[str, Any]:
    """Train (or reuse) the shared warm start; returns its summary."""
    done, resume = dist.main_first(lambda: _warm_start_done(study, results_dir))
    if done is not None:
        return done
    ws = study.warm_start
    if dist.is_main():
        how = "resuming its checkpoint" if resume else "training"
        print(f"gnlm bench: warm start ({how}): AdamW lr {ws.lr:g}, {ws.tokens // ws.batch_tokens} steps of "
              f"{ws.batch_tokens:,} tokens -> {results_dir / 'warm_start'}", file=sys.stderr)
    # An interrupted warm start continues from its checkpoint like every run; anything else there is replaced.
    summary = run_training(study.warm_start_config(results_dir), resume=resume, overwrite=not resume)
    if summary.get("diverged"):
        raise ConfigError(f"the warm start diverged ({summary.get('message')}); lower warm_start.lr")
    return summary


def warm_start_only(study: StudyConfig, results_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """``gnlm bench --warm-start-only``: train the study's shared warm start (or resume it, or find it done) in this
    process and nothing else; returns its summary. No run is planned or trained: only study.yaml and warm_start/
    are written (``overwrite``: the results directory is deleted first, as for a study)."""
    results_dir = Path(results_dir)
    if study.warm_start is None:
        raise ConfigError(f"--warm-start-only: study {study.name!r} declares no warm_start; add warm_start: {{tokens: "
                          f"..., batch_tokens: ...}} or run the study without --warm-start-only")
    dist.init(str(study.base.get("train", {}).get("device", "auto")))
    cfg = study.warm_start_config(results_dir)
    check_run_memory(cfg, resolve_device(cfg.train.device), dist.world_size())
    dist.main_first(lambda: _open_results_dir(study, results_dir, overwrite))
    return run_warm_start(study, results_dir)


def _open_results_dir(study: StudyConfig, results_dir: Path, overwrite: bool) -> None:
    """Create (``overwrite``: first delete) the results directory, check that it holds no other study, and write
    ``study.yaml``."""
    if overwrite and results_dir.is_dir():
        if not (results_dir / "study.yaml").exists() and any(results_dir.iterdir()):
            raise ConfigError(f"--overwrite: {results_dir} is not a gnlm results directory (no study.yaml); "
                              f"refusing to delete it")
        shutil.rmtree(results_dir)
    check_results_dir(study, results_dir)
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the results directory {results_dir} ({e.strerror}); choose another "
                          f"with --results DIR") from None
    atomic_write_bytes(results_dir / "study.yaml", yaml.safe_dump(to_dict(study), sort_keys=False).encode())


def _fmt_row(row: Row, kind: str) -> str:
    head = f"{row.method} batch {row.batch_tokens:,} lr {row.lr:g} seed {row.seed}"
    if row.failed:
        result = f"FAILED ({row.error})"
    elif row.diverged:
        result = f"diverged ({row.error or row.diverged_reason or 'no reason recorded'})"
    elif row.all_steps_skipped:
        result = f"every one of its {row.steps_run} steps was skipped (the model never moved)"
    elif kind == "budget":
        result = f"final eval loss {row.final_eval_loss:.4f} after {row.steps_run} steps"
    elif row.reached:
        result = f"reached target at step {row.steps} ({row.tokens:,} tokens)"
    elif row.stopped_early:
        result = f"lr search: {row.stopped_early}"
    else:
        loss = row.final_eval_loss
        result = f"not reached in {row.steps_run} steps (eval loss {loss:.4f})" if loss is not None else "not reached"
    t = row.total_wall_time
    return f"{head}: {result}" + (f" [{t:.1f} s]" if t is not None else "")


def _run_wave(study: StudyConfig, results_dir: Path, launcher: Any, todo: list[RunSpec], bar: Any, finished: int,
              total: int, main: bool, final: bool) -> bool:
    """Run ``todo`` with the launcher, showing each finished run; returns whether any run was recorded here.
    ``final``: no run is planned after these (else the bar's time left is this wave's)."""
    by_id = {s.run_id: s for s in todo}
    tasks = [Task(s.run_id, record_run, (s, results_dir), str(lock_path(results_dir, s.run_id)), cost=s.cost())
             for s in todo]
    progress, left, recorded = launch.Progress(launcher.slots, wave=not final), len(tasks), 0
    for out in launcher.run(tasks):  # each task appends its row itself; here: failures of its process, display
        row = out.result
        if out.task is not None:
            left -= 1
            progress.add(out.seconds)
            if out.error is not None:  # its process died (pool worker, Slurm job): the run failed
                row = results.error_row(by_id[out.task.key], out.error, results_dir)
                if main:
                    results.append_row(results_dir, row)
        bar.set_postfix_str(progress.text(left, launcher.running), refresh=out.task is None)
        if out.task is None or not main:
            continue
        if row is None:
            tqdm.write(f"{out.task.key}: another gnlm bench process on {results_dir} is running it; skipped",
                       file=sys.stderr)
            continue
        finished += 1
        recorded += 1
        bar.update(1)
        line = f"[{finished}/{total}] {_fmt_row(row, study.kind)}"
        if study.progress:
            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
    return dist.broadcast_object(recorded > 0)


def run_study(study: StudyConfig, results_dir: str | Path, max_runs: int | None = None,
              report: bool = True, launch_cfg: launch.LaunchConfig | None = None,
              retry_failed: bool = False, overwrite: bool = False) -> list[Row]:
    """Run (or continue) a study; returns all rows of runs.jsonl. ``max_runs`` stops after that many new runs
    (0: nothing is trained, the warm start neither). ``launch_cfg``: where the runs run (``launch.py``; default: one
    after another in this process). ``retry_failed``: run again the runs recorded with status "error" (their rows
    move to runs.failed.jsonl, see :func:`results.set_aside_failed`). ``overwrite``: delete the results directory
    first, once every check has passed (only a gnlm results directory, never any other folder)."""
    results_dir = Path(results_dir)
    specs = plan_runs(study, results_dir, [])[0]  # every run's config checked before anything is trained or written
    dist.init(str(study.base.get("train", {}).get("device", "auto")))
    if launch_cfg is None or launch_cfg.launcher == "local":  # a Slurm job checks the memory of its own machine
        warm = [study.warm_start_config(results_dir)] if study.warm_start is not None else []
        for cfg in [*warm, *(s.run_config() for s in specs)]:
            check_run_memory(cfg, resolve_device(cfg.train.device), dist.world_size())

    def prepare_results_dir() -> None:
        _open_results_dir(study, results_dir, overwrite)
        results.repair(results_dir)
        if retry_failed and (n := results.set_aside_failed(results_dir)):
            print(f"gnlm bench: --retry-failed: {n} failed run(s) will run again (their rows moved to "
                  f"{results_dir / results.FAILED_FILE})", file=sys.stderr)

    dist.main_first(prepare_results_dir)  # under torchrun: rank 0 writes the results directory, every rank trains
    main = dist.is_main()
    if max_runs == 0 and main:
        print("gnlm bench: --max-runs 0: nothing is trained (the warm start neither)", file=sys.stderr)
    continuing = sorted({s.method for s in specs if s.config["train"]["init_optimizer"]})
    if study.warm_start is not None and study.warm_start.load_optimizer_state and main:
        print(f"gnlm bench: warm_start.load_optimizer_state: {', '.join(continuing) or 'no method'} continue(s) the "
              f"warm start's optimizer state; every other method starts a fresh optimizer", file=sys.stderr)
    launcher = launch.make_launcher(launch_cfg, results_dir, study.name)
    try:
        return _run(study, results_dir, launcher, max_runs, report, main)
    finally:
        launcher.close()


def _run(study: StudyConfig, results_dir: Path, launcher: Any, max_runs: int | None, report: bool,
         main: bool) -> list[Row]:
    if study.warm_start is not None and max_runs != 0:  # trained once, before any run (on Slurm as a job of its own)
        done = dist.main_first(lambda: _warm_start_done(study, results_dir))[0]
        ws = done or launcher.call(Task("warm_start", run_warm_start, (study, results_dir),
                                        str(lock_path(results_dir, "warm_start")), wait=True))
        loss = ws.get("final_eval_loss")
        if study.kind == "steps_to_target" and loss is not None and loss <= max(study.targets):
            raise ConfigError(f"target {max(study.targets)} is already met by the warm start (eval loss {loss:.4f}); "
                              f"declare targets below {loss:.4f}")

    started, first_wave = 0, True
    bar = tqdm(total=0, initial=0, unit="run", dynamic_ncols=True, file=sys.stderr,
               disable=not (study.progress and main), desc="study", bar_format=launch.BAR_FORMAT)
    try:
        while True:  # waves: an lr search plans its next runs from the rows of the previous ones
            recorded = dist.main_first(lambda: results.read_rows(results_dir))
            specs, final = plan_runs(study, results_dir, recorded)
            done = {r.run_id for r in recorded}
            todo = [s for s in specs if s.run_id not in done]
            finished = len(specs) - len(todo)
            bar.total, bar.n = len(specs), finished
            bar.refresh()
            if first_wave and main:
                more = "" if final else (f" so far (the search adds runs as results come in; at most "
                                         f"{most_runs(study)})")
                print(f"gnlm bench: study {study.name!r}: {len(specs)} runs{more}, {finished} already finished; "
                      f"results in {results_dir}", file=sys.stderr)
                if launcher.slots > 1 and todo and (max_runs is None or max_runs > started):
                    print(f"gnlm bench: {launcher.describe()}", file=sys.stderr)
            first_wave = False
            if max_runs is not None:
                todo = todo[:max(0, max_runs - started)]
            if not todo:
                break
            started += len(todo)
            if not _run_wave(study, results_dir, launcher, todo, bar, finished, len(specs), main, final):
                break  # every run of the wave was taken by another gnlm bench process: nothing more to plan here
    finally:
        bar.close()
    dist.barrier()
    rows = results.read_rows(results_dir)
    specs, final = plan_runs(study, results_dir, rows)
    if report and main and final and {s.run_id for s in specs} <= {r.run_id for r in rows}:
        path = write_report(results_dir)
        print(f"gnlm bench: report written to {path}", file=sys.stderr)
    return rows
