"""Never lose a run (issue 11): resume that refuses to discard data, one writer per run directory, finite blow-ups
and collapses caught, strict JSON, all-skipped GN runs, config traps, one-line errors, failed study runs retried,
and readable reports under failure. Tiny runs (nano, 32-token sequences, a few steps): the file runs in well under
a minute on 2 CPU cores."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

import gnlm.run as run_mod
from gnlm import bench
from gnlm.cli import main
from gnlm.config import ConfigError, dumps_json
from gnlm.results import Row
from gnlm.run import divergence
from gnlm.runconfig import load_run_config
from gnlm.rundir import LOCK_NAME, RunDirLock
from gnlm.selection import select_lr
from gnlm.study import study_from_dict
from gnlm.train import BaselineTrainer, run_training

COMMON = ["model=nano", "data.seq_len=32", "data.eval_sequences=4", "train.progress=false", "train.threads=1",
          "train.eval_every=1"]
BASE = [*COMMON, "train.batch_size=4"]
GN = [*COMMON, "method=gn", "gn.inner_steps=2", "gn.inner_batch_size=2", "gn.line_search_batches=1"]


def cfg_of(run_dir: Path | str, *args: str):
    return load_run_config(None, [f"out_dir={run_dir}", *args])


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity, as strict parsers do."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def metrics(run_dir: Path) -> list[dict]:
    return [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class StopAt:
    """Raises KeyboardInterrupt (Ctrl-C) when the baseline trainer is about to take step ``n``."""

    def __init__(self, monkeypatch, n: int):
        real, self.calls = BaselineTrainer.step, 0

        def step(trainer):
            self.calls += 1
            if self.calls == n:
                raise KeyboardInterrupt
            return real(trainer)

        monkeypatch.setattr(BaselineTrainer, "step", step)


# ------------------------------------------------------------------------------------- 1. resume, Ctrl-C, cadence


def test_resume_without_a_checkpoint_is_refused_and_keeps_the_metrics(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_training(cfg_of(run_dir, *BASE, "train.steps=3"))
    for p in run_dir.glob("checkpoint*.pt"):
        p.unlink()
    before = (run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["train", f"out_dir={run_dir}", *BASE, "train.steps=5", "--resume"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gnlm: error")]
    assert len(err) == 1 and "no checkpoint" in err[0] and "--overwrite" in err[0], err
    assert (run_dir / "metrics.jsonl").read_bytes() == before  # nothing truncated, nothing restarted


def test_resume_of_a_directory_that_does_not_exist_starts_a_new_run_and_says_so(tmp_path, capsys):
    summary = run_training(cfg_of(tmp_path / "new", *BASE, "train.steps=1"), resume=True)
    assert summary["step"] == 1
    assert "holds no run yet; starting a new run there" in capsys.readouterr().err


def test_ctrl_c_names_a_checkpoint_only_when_one_exists(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_mod.CheckpointTimer, "due", lambda self: False)  # no time-based checkpoint either
    StopAt(monkeypatch, 3)
    run_dir = tmp_path / "run"
    assert main(["train", f"out_dir={run_dir}", *BASE, "train.steps=5"]) == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "checkpoint.pt" not in err, err
    StopAt(monkeypatch, 3)
    assert main(["train", f"out_dir={tmp_path / 'b'}", *BASE, "train.steps=5", "train.checkpoint_every=1"]) == 130
    err = capsys.readouterr().err
    assert "continue from the last checkpoint" in err and "checkpoint.pt" in err, err


class FakeClock:
    """Stands in for the module ``time`` in gnlm.run: monotonic() advances 250 s per call, the rest is real."""

    def __init__(self):
        import time

        self.real, self.now = time, 0.0

    def monotonic(self) -> float:
        self.now += 250.0
        return self.now

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_long_run_checkpoints_by_default_and_resumes_after_ctrl_c(tmp_path, monkeypatch, capsys):
    assert load_run_config(None, []).train.checkpoint_every_seconds > 0  # the default cadence is on
    args = [*BASE, "train.steps=6"]
    full = run_training(cfg_of(tmp_path / "full", *args))
    monkeypatch.setattr(run_mod, "time", FakeClock())  # every step "takes" minutes
    StopAt(monkeypatch, 5)
    run_dir = tmp_path / "run"
    assert main(["train", f"out_dir={run_dir}", *args]) == 130
    assert "continue from the last checkpoint" in capsys.readouterr().err
    monkeypatch.undo()
    resumed = run_training(cfg_of(run_dir, *args), resume=True)
    assert resumed["final_eval_loss"] == full["final_eval_loss"]


# -------------------------------------------------------------------------------- 2. the study's warm start resumes


def _study(**changes):
    raw = {"name": "t", "progress": False, "target_loss": 1.0, "max_steps": 2, "batch_tokens": [128],
           "base": {"model": {"preset": "nano"}, "data": {"seq_len": 32, "eval_sequences": 4},
                    "train": {"threads": 1, "eval_every": 1, "eval_batch_size": 4}},
           "seeds": [1], "methods": [{"name": "adamw", "lrs": [1e-2]}]}
    raw.update(changes)
    return study_from_dict(raw)


def test_an_interrupted_warm_start_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    study = _study(warm_start={"tokens": 640, "batch_tokens": 128, "lr": 1e-2,
                               "overrides": {"train.checkpoint_every": 1}})
    real, calls = bench.run_training, []

    def recording(cfg, resume=False, overwrite=False, stop=None):
        calls.append((Path(cfg.out_dir).name, resume, overwrite))
        return real(cfg, resume=resume, overwrite=overwrite, stop=stop)

    monkeypatch.setattr(bench, "run_training", recording)
    StopAt(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        bench.run_study(study, tmp_path / "res")
    assert calls == [("warm_start", False, True)]
    monkeypatch.undo()
    monkeypatch.setattr(bench, "run_training", recording)
    rows = bench.run_study(study, tmp_path / "res")
    assert calls[1] == ("warm_start", True, False)  # resumed, not retrained with overwrite
    ws = metrics(tmp_path / "res" / "warm_start")
    assert [r["step"] for r in ws if "eval_loss" in r][-1] == 5 and rows[0].status == "finished"


def test_max_runs_0_trains_nothing_not_even_the_warm_start(tmp_path, monkeypatch, capsys):
    study = _study(warm_start={"tokens": 256, "batch_tokens": 128, "lr": 1e-2})
    monkeypatch.setattr(bench, "run_training", lambda *a, **k: pytest.fail("trained"))
    assert bench.run_study(study, tmp_path / "res", max_runs=0) == []
    assert not (tmp_path / "res" / "warm_start").exists()
    assert "--max-runs 0: nothing is trained" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- 3. paths, moved directories


def test_relative_dotted_and_absolute_out_dir_are_one_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_training(cfg_of("runs/t0", *BASE, "train.steps=1"))
    assert run_training(cfg_of("./runs/t0", *BASE, "train.steps=2"), resume=True)["step"] == 2
    assert run_training(cfg_of(tmp_path / "runs" / "t0", *BASE, "train.steps=3"), resume=True)["step"] == 3


def test_a_moved_run_directory_resumes_where_it_now_lives(tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "elsewhere" / "run"
    run_training(cfg_of(old, *BASE, "train.steps=2"))
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    assert main(["train", str(new / "config.yaml"), "train.steps=4", "--resume"]) == 0
    assert not old.exists()  # no new run started at the old path
    assert [r["step"] for r in metrics(new)] == [0, 1, 2, 3, 4]
    # and with the original config and out_dir set to the new place: out_dir is where a run lives, not what it is
    assert main(["train", f"out_dir={new}", *BASE, "train.steps=5", "--resume"]) == 0
    assert "resuming" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 4. one writer per dir


def test_a_second_writer_on_a_run_directory_is_refused_with_the_holders_pid(tmp_path):
    import os

    run_dir = tmp_path / "run"
    run_training(cfg_of(run_dir, *BASE, "train.steps=1"))
    assert not (run_dir / LOCK_NAME).exists()  # released when the run ended
    holder = RunDirLock(run_dir)
    holder.acquire()  # another open file description: flock treats it as another writer
    try:
        before = (run_dir / "metrics.jsonl").read_bytes()
        with pytest.raises(ConfigError, match=rf"in use by another gnlm process \(pid {os.getpid()}") as err:
            run_training(cfg_of(run_dir, *BASE, "train.steps=2"), resume=True)
        assert "\n" not in str(err.value)
        assert (run_dir / "metrics.jsonl").read_bytes() == before
    finally:
        holder.release()
    assert run_training(cfg_of(run_dir, *BASE, "train.steps=2"), resume=True)["step"] == 2


# ---------------------------------------------------------------------------------------------- 5. divergence rule


def test_a_finite_blow_up_is_divergence_and_a_study_records_the_reason(tmp_path, capsys):
    summary = run_training(cfg_of(tmp_path / "run", *BASE, "optim.lr=100", "train.steps=5"))
    assert summary["diverged"] and summary["diverged_reason"] == "above_bound"
    assert "train.divergence_margin" in summary["message"]
    assert capsys.readouterr().err.count("gnlm: run diverged") == 1
    rows = bench.run_study(_study(methods=[{"name": "adamw", "lrs": [100.0]}]), tmp_path / "res")
    assert rows[0].diverged is True and rows[0].diverged_reason == "above_bound" and not rows[0].reached


def test_the_divergence_rule(tmp_path):
    cfg = cfg_of(tmp_path, *BASE)  # vocab 4096: ln V = 8.318
    log_v = math.log(4096)
    st = {"initial_eval_loss": 8.7}
    assert divergence(cfg, st, {"step": 1, "loss": 8.0, "eval_loss": 7.0}) is None
    assert divergence(cfg, st, {"step": 2, "loss": float("nan")})[0] == "non_finite"
    assert divergence(cfg, st, {"step": 2, "eval_loss": float("inf")})[0] == "non_finite"
    assert divergence(cfg, st, {"step": 2, "loss": 8.7 + 2.9}) is None  # within the margin of 3 nats
    assert divergence(cfg, st, {"step": 2, "loss": 8.7 + 3.1})[0] == "above_bound"
    assert divergence(cfg, st, {"step": 3, "eval_loss": log_v + 1e-5})[0] == "collapsed"  # after being at 7.0
    assert divergence(cfg, {"initial_eval_loss": 8.7}, {"step": 1, "eval_loss": log_v}) is None  # never below
    off = cfg_of(tmp_path, *BASE, "train.divergence_margin=.inf", "train.collapse_tolerance=0")
    assert divergence(off, {"initial_eval_loss": 8.7, "best_eval_loss": 5.0},
                      {"step": 2, "loss": 1e9, "eval_loss": log_v}) is None


def test_a_collapse_to_the_uniform_predictor_ends_the_run(tmp_path, monkeypatch):
    evals = iter([8.7, 6.0, math.log(4096), 5.0])
    monkeypatch.setattr(run_mod.Run, "evaluate", lambda self: run_mod.Evaluation(next(evals), None, 1, 1))
    summary = run_training(cfg_of(tmp_path / "run", *BASE, "train.steps=3"))
    assert summary["diverged"] and summary["diverged_reason"] == "collapsed" and summary["step"] == 2


# --------------------------------------------------------------------------- 6. one stderr line, null not NaN


def test_gn_divergence_says_so_on_stderr_once(tmp_path, capsys):
    summary = run_training(cfg_of(tmp_path / "run", *GN, "gn.inner_optim.lr=1000", "train.steps=3"))
    assert summary["diverged"]
    err = capsys.readouterr().err
    assert err.count("gnlm: run diverged") == 1, err


def test_non_finite_values_are_written_as_null_in_every_json_file(tmp_path, monkeypatch):
    evals = iter([8.7, float("nan")])
    monkeypatch.setattr(run_mod.Run, "evaluate", lambda self: run_mod.Evaluation(next(evals), None, 1, 1))
    summary = run_training(cfg_of(tmp_path / "run", *BASE, "train.steps=3"))
    assert summary["diverged_reason"] == "non_finite"
    rows = metrics(tmp_path / "run")
    assert rows[-1]["step"] == 1 and rows[-1]["eval_loss"] is None
    assert strict_json((tmp_path / "run" / "summary.json").read_text())["final_eval_loss"] is None
    assert strict_json(dumps_json({"a": [float("inf"), {"b": -math.inf}]})) == {"a": [None, {"b": None}]}
    monkeypatch.undo()
    evals = iter([8.7, float("nan")])
    monkeypatch.setattr(run_mod.Run, "evaluate", lambda self: run_mod.Evaluation(next(evals), None, 1, 1))
    bench.run_study(_study(), tmp_path / "res")
    for line in (tmp_path / "res" / "runs.jsonl").read_text().splitlines():
        assert strict_json(line)["final_eval_loss"] is None


# ------------------------------------------------------------------------------------- 7. all-skipped GN runs


def _row(lr, final, best, skipped, steps_run=3):
    return Row(run_id=f"gn/b128/lr{lr:g}/s0", method="gn", family="gn", batch_tokens=128, lr=lr, seed=0,
               run_dir=f"runs/gn/lr{lr:g}", final_eval_loss=final, best_eval_loss=best, skipped_steps=skipped,
               steps_run=steps_run)


def test_a_gn_run_whose_every_step_was_skipped_is_counted_and_never_best_over_a_lower_loss(tmp_path, capsys):
    summary = run_training(cfg_of(tmp_path / "run", *GN, "gn.line_search_skip=true", "gn.inner_optim.lr=1000",
                                  "train.steps=2"))
    assert summary["skipped_steps"] == 2 and not summary["diverged"]
    assert "every outer step of the run was skipped (2 of 2)" in capsys.readouterr().err
    # the stuck run keeps its starting loss 3.92; lr 0.03 went down to 3.80 and ended at 3.95
    rows = [_row(1000.0, 3.92, 3.92, 3), _row(0.03, 3.95, 3.80, 0)]
    assert select_lr(rows, 3.5)[0] == 0.03 and select_lr(rows, None)[0] == 0.03
    rows[1].best_eval_loss = 3.99  # never lower than the stuck run: then the stuck run may stay best
    assert select_lr(rows, 3.5)[0] == 1000.0


# ----------------------------------------------------------------------------------------------- 8, 9. config traps


def test_model_fields_are_checked_against_the_resolved_preset():
    cfg = load_run_config(None, ["model=150m", "model.n_heads=12"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers) == (768, 12, 12)
    with pytest.raises(ConfigError, match=r"model.d_model \(768\) must be divisible by model.n_heads \(7\)"):
        load_run_config(None, ["model=150m", "model.n_heads=7"])


def test_gn_run_given_optim_lr_is_told_where_its_lr_lives(capsys):
    load_run_config(None, ["method=gn", "optim.lr=100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr" in err[0] and "gn.inner_optim.lr" in err[0]
    load_run_config(None, ["optim.lr=100"])  # a baseline reads optim.lr: no warning
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError) as e:
        load_run_config(None, ["method=gn", "gn.inner_optim.lr=-1"])
    assert str(e.value).startswith("gn.inner_optim.lr:") and "inner_optim.optim" not in str(e.value)
    assert "gn.inner_optim.lr=" in str(e.value)


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_training(cfg_of(run_dir, *BASE, "train.steps=3"))
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"checkpoint is at step 3 but train.steps is 2; set train.steps >= 3"):
        run_training(cfg_of(run_dir, *BASE, "train.steps=2"), resume=True)
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_cli_traps_train_config_to_bench_no_config_and_version(tmp_path, capsys):
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text("method: baseline\nmodel: {preset: nano}\noptim: {lr: 0.01}\n")
    assert main(["bench", str(train_yaml), "--results", str(tmp_path / "res")]) == 2
    assert "is a gnlm train config" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert "gnlm train needs a config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    from gnlm import __version__

    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"gnlm {__version__}"


# ------------------------------------------------------------------------------------ 10. one line, no traceback


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_out_dir_that_is_a_file_is_one_line_and_the_file_stays(tmp_path, capsys, flags):
    f = tmp_path / "a-file"
    f.write_text("keep me")
    assert main(["train", f"out_dir={f}", *BASE, "train.steps=1", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gnlm: error: out_dir") and "is a file" in err[-1]
    assert f.read_text() == "keep me"


def test_unwritable_data_cache_is_one_line(tmp_path, monkeypatch):
    import gnlm.data as data_mod

    def denied(parent, prefix):
        raise PermissionError(13, "Permission denied", str(parent))

    monkeypatch.setattr(data_mod, "make_tmp_dir", denied)
    cfg = cfg_of(tmp_path / "run", *BASE, f"data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match=r"cannot write to the data cache .*\(Permission denied\); set "
                                          r"data.cache_dir"):
        data_mod.prepare_data(cfg.data, progress=False)


def test_report_on_broken_results_is_one_line(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    (res / "study.yaml").write_text(yaml.safe_dump({"name": "x", "batch_tokens": [128]}))
    assert main(["report", str(res)]) == 2
    assert "a study needs methods" in capsys.readouterr().err
    (res / "study.yaml").write_text(yaml.safe_dump({"name": "x", "batch_tokens": [128], "max_steps": 2,
                                                    "target_loss": 3.0, "seeds": [1],
                                                    "methods": [{"name": "adamw", "lrs": [0.01]}]}))
    (res / "runs.jsonl").write_text(json.dumps({"run_id": "adamw/b128/lr0.01/s0", "method": "adamw"}) + "\n")
    assert main(["report", str(res)]) == 0
    err = capsys.readouterr().err
    assert "runs.jsonl: line 1 is not a complete study row: lacks family, batch_tokens, lr, seed, run_dir" in err
    assert "Traceback" not in err


# -------------------------------------------------------------------------------------- 11. failed runs, retried


def test_bench_exits_non_zero_when_a_run_failed_and_retry_failed_runs_it_again(tmp_path, monkeypatch, capsys):
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "name": "t", "progress": False, "target_loss": 1.0, "max_steps": 1, "batch_tokens": [128],
        "base": {"model": "nano", "data": {"seq_len": 32, "eval_sequences": 4}, "train": {"threads": 1}},
        "seeds": [1], "methods": [{"name": "adamw", "lrs": [0.01, 0.03]}]}))
    res = tmp_path / "res"
    real = bench.run_training

    def flaky(cfg, resume=False, overwrite=False, stop=None):
        if cfg.optim.lr == 0.03:
            raise RuntimeError("node lost")
        return real(cfg, resume=resume, overwrite=overwrite, stop=stop)

    monkeypatch.setattr(bench, "run_training", flaky)
    assert main(["bench", str(study), "--results", str(res)]) == 1
    assert "1 of 3 runs failed" in capsys.readouterr().err
    monkeypatch.setattr(bench, "run_training", real)
    assert main(["bench", str(study), "--results", str(res)]) == 1  # not retried unless asked
    assert main(["bench", str(study), "--results", str(res), "--retry-failed"]) == 0
    rows = [strict_json(line) for line in (res / "runs.jsonl").read_text().splitlines()]
    assert {"adamw/b128/lr0.01/s0", "adamw/b128/lr0.03/s0"} < {r["run_id"] for r in rows}
    assert all(r["status"] == "finished" for r in rows)
    failed = [strict_json(line) for line in (res / "runs.failed.jsonl").read_text().splitlines()]
    assert [r["error"] for r in failed] == ["RuntimeError: node lost"]  # the failure stays on record


# ------------------------------------------------------------------------------------------------ 12. the report


def test_one_batch_study_renders_valid_tables_and_fits_nothing(tmp_path):
    from gnlm.report import write_report

    res = tmp_path / "res"
    (res / "study.yaml").parent.mkdir(parents=True)
    (res / "study.yaml").write_text(yaml.safe_dump({"name": "one", "batch_tokens": [128], "max_steps": 3,
                                                    "target_loss": 3.0, "seeds": [1],
                                                    "methods": [{"name": "adamw", "lrs": [0.01]}]}))
    rows = []
    for seed in (0, 1):
        rows.append(Row(run_id=f"adamw/b128/lr0.01/s{seed}", method="adamw", family="baseline", batch_tokens=128,
                        lr=0.01, seed=seed, run_dir=f"runs/{seed}", reached=True, steps=2, tokens=256,
                        final_eval_loss=2.9, steps_run=2, curve={"step": [0, 1, 2], "eval_loss": [4.0, 3.5, 2.9]},
                        crossings={"3": {"step": 2, "step_interp": 1.8333}}))
    (res / "runs.jsonl").write_text("".join(r.to_json() + "\n" for r in rows))
    text = write_report(res).read_text()
    assert "no fit of steps against batch size" in text and "| adamw | 1.8 (2) |" in text
    table: list[str] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
        elif table:  # every row of a Markdown table has as many cells as its header
            assert len({t.count("|") for t in table}) == 1, table
            table = []
    assert "Fitted critical batch" not in text and "saving per doubling" not in text


def test_a_line_of_runs_jsonl_that_is_not_a_row_is_named_and_left_out(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    (res / "study.yaml").write_text(yaml.safe_dump({"name": "x", "batch_tokens": [128], "target_loss": 3.0,
                                                    "seeds": [1], "methods": [{"name": "adamw", "lrs": [0.01]}]}))
    good = Row(run_id="adamw/b128/lr0.01/s0", method="adamw", family="baseline", batch_tokens=128, lr=0.01, seed=0,
               run_dir="runs/a", final_eval_loss=3.5)
    (res / "runs.jsonl").write_text(good.to_json() + "\n" + '{"run_id": "adamw/b128/lr0.03/s0", "meth')  # torn
    assert main(["report", str(res)]) == 0
    err = capsys.readouterr().err
    assert "runs.jsonl: line 2 is not a complete study row (cut off: a process died while writing it)" in err
    assert "runs recorded: 1" in (res / "report.md").read_text()


def test_repair_names_every_line_that_is_not_a_row_and_keeps_every_row(tmp_path, capsys):
    """A JSON line that is not an object, a row of a newer gnlm, a row with a field this gnlm does not know and a
    torn last line are each named and dropped by ``repair``; every complete row stays, and the next row appended
    starts on a line of its own."""
    from gnlm.results import SCHEMA, append_row, read_rows, repair

    def row(lr: float) -> Row:
        return Row(run_id=f"adamw/b128/lr{lr:g}/s0", method="adamw", family="baseline", batch_tokens=128, lr=lr,
                   seed=0, run_dir="runs/a", final_eval_loss=3.5)

    newer = {**json.loads(row(0.02).to_json()), "schema": SCHEMA + 1}
    unknown = {**json.loads(row(0.04).to_json()), "colour": "red"}
    lines = [row(0.01).to_json(), "[1, 2]", json.dumps(newer), json.dumps(unknown), row(0.03).to_json(),
             '{"run_id": "adamw/b128/lr0.05/s0", "meth']
    (tmp_path / "runs.jsonl").write_text("\n".join(lines))
    assert [r.lr for r in read_rows(tmp_path)] == [0.01, 0.03]
    repair(tmp_path)
    err = capsys.readouterr().err
    assert "line 2 is not a complete study row: not a JSON object" in err
    assert f"line 3 is not a complete study row: schema {SCHEMA + 1} is newer than this gnlm's ({SCHEMA})" in err
    assert "line 4 is not a complete study row: unknown fields colour" in err
    assert "line 6 is not a complete study row (cut off: a process died while writing it)" in err
    assert (tmp_path / "runs.jsonl").read_text() == row(0.01).to_json() + "\n" + row(0.03).to_json() + "\n"
    assert append_row(tmp_path, row(0.05)) and not append_row(tmp_path, row(0.05))
    assert [r.lr for r in read_rows(tmp_path)] == [0.01, 0.03, 0.05]
    repair(tmp_path)  # nothing to repair: the file and stderr stay as they are
    assert capsys.readouterr().err == "" and len(read_rows(tmp_path)) == 3


def test_report_of_an_unreadable_study_yaml_or_a_missing_directory_is_one_line(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    (res / "study.yaml").write_text("name: [unclosed\n")
    assert main(["report", str(res)]) == 2
    err = capsys.readouterr().err.strip()
    assert "study.yaml is not valid YAML" in err and len(err.splitlines()) == 1
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


def test_bench_with_results_that_is_a_file_is_one_line_and_the_file_stays(tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("keep me")
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"name": "t", "target_loss": 1.0, "batch_tokens": [128], "seeds": [1],
                                     "base": {"model": "nano", "data": {"seq_len": 32}},
                                     "methods": [{"name": "adamw", "lrs": [0.01]}]}))
    for flags in ([], ["--overwrite"]):
        assert main(["bench", str(study), "--results", str(f), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "is a file, not a directory" in err and len(err.splitlines()) == 1
    assert f.read_text() == "keep me"


def test_overwrite_deletes_a_results_directory_only(tmp_path, capsys):
    """--overwrite replaces a results directory (it holds study.yaml) and refuses, in one line, to delete any other
    directory that holds files; --warm-start-only of a study without a warm start is refused the same way."""
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"name": "t", "target_loss": 1.0, "batch_tokens": [128], "seeds": [1],
                                     "base": {"model": "nano", "data": {"seq_len": 32}},
                                     "methods": [{"name": "adamw", "lrs": [0.01]}]}))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["bench", str(study), "--results", str(mine), "--overwrite", "--max-runs", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a gnlm results directory (no study.yaml); refusing to delete it" in err
    assert len(err.splitlines()) == 1 and (mine / "notes.txt").read_text() == "keep me"
    res = tmp_path / "res"
    assert main(["bench", str(study), "--results", str(res), "--max-runs", "0"]) == 0
    (res / "stale.txt").write_text("from before")
    assert main(["bench", str(study), "--results", str(res), "--overwrite", "--max-runs", "0"]) == 0
    assert (res / "study.yaml").exists() and not (res / "stale.txt").exists()
    capsys.readouterr()
    assert main(["bench", str(study), "--results", str(tmp_path / "ws"), "--warm-start-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--warm-start-only: study 't' declares no warm_start" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ws").exists()


def test_a_diverged_gn_run_in_a_study_says_so_on_one_line_like_a_baseline(tmp_path, capsys):
    study = _study(methods=[{"name": "adamw", "lrs": [1000.0]}, {"name": "gn", "lrs": [1000.0]}],
                   base={"model": {"preset": "nano"}, "data": {"seq_len": 32, "eval_sequences": 4},
                         "train": {"threads": 1, "eval_every": 1, "eval_batch_size": 4},
                         "gn": {"inner_batch_size": 2, "line_search_batches": 1}})
    rows = bench.run_study(study, tmp_path / "res")
    assert all(r.diverged for r in rows)
    err = capsys.readouterr().err
    assert err.count("gnlm: run diverged") == len(rows) == 4  # each method on the selection and the reported seed
