"""Benchmark studies: the declaration, planning (lr search), bad input, and tiny end-to-end studies."""

import json
import math
import shutil
from dataclasses import replace

import pytest

from gnlm import bench, results
from gnlm.bench import run_study
from gnlm.config import ConfigError
from gnlm.plan import LrSearchStop, most_runs, plan_runs, run_spec
from gnlm.results import Row
from gnlm.selection import selection_key, steps_to
from gnlm.study import load_study, preset_names, study_from_dict


def _selection_runs(study, res):
    """The runs of the declared grids on the selection seed (what a study starts with)."""
    return plan_runs(study, res, [])[0]


# -------------------------------------------------------------------------------------------- study configs


def _study(tmp_path, **changes):
    raw = {
        "name": "t",
        "base": {"model": {"preset": "nano"}, "data": {"eval_sequences": 4},
                 "train": {"eval_every": 1, "eval_batch_size": 4, "threads": 1}, "gn": {"inner_batch_size": 2}},
        "target_loss": 7.0, "max_steps": 3, "batch_tokens": [256, 1024], "progress": False,
        "selection_seed": 0, "seeds": [1],
        "methods": [{"name": "adamw", "lrs": [1e-2, 3e-2]}, {"name": "gn", "lrs": [1e-2, 3e-2]}],
    }
    raw.update(changes)
    return study_from_dict(raw)


def test_runs_map_batch_tokens_to_batch_size_and_inner_steps(tmp_path):
    study = _study(tmp_path, methods=[
        {"name": "adamw", "lrs": [1e-2, 3e-2]}, {"name": "gn", "lrs": [1e-2, 3e-2]},
        {"name": "gn_layerwise", "lrs": [1e-2, 3e-2], "lrs_by_batch": {1024: [1e-3, 3e-3]}},
        {"name": "sgdm", "optimizer": "torch.optim.SGD", "kwargs": {"momentum": 0.9}, "lrs": [0.1, 0.3]},
        {"name": "gn_adamw_inner", "type": "gn", "lrs": [1e-3, 3e-3],
         "overrides": {"gn.inner_optim.name": "adamw", "gn.warm_start": False}}])
    specs = _selection_runs(study, tmp_path / "res")
    assert len(specs) == 2 * 5 * 2
    by = {s.run_id: s for s in specs}
    a = by["adamw/b1024/lr0.03/s0"].config
    assert a["method"] == "baseline" and a["train"]["batch_size"] == 1024 // 128 and a["optim"]["lr"] == 0.03
    assert a["train"]["steps"] == 3 and a["train"]["target_loss"] == 7.0 and a["train"]["init_from"] is None
    g = by["gn/b1024/lr0.01/s0"]
    assert g.config["method"] == "gn" and g.config["gn"]["inner_steps"] == 1024 // (2 * 128)
    assert g.config["gn"]["inner_optim"]["lr"] == 0.01 and g.config["gn"]["inner_optim"]["name"] == "muon"
    assert g.config["gn"]["line_search_batches"] == "auto"  # the paper's line search: another full outer batch
    assert g.line_search_tokens_per_step == 1024
    assert by["gn_layerwise/b1024/lr0.001/s0"].config["gn"]["layerwise"] is True
    assert "gn_layerwise/b256/lr0.01/s0" in by
    s = by["sgdm/b256/lr0.1/s0"].config
    assert s["optim"]["name"] == "torch.optim.SGD" and s["optim"]["kwargs"] == {"momentum": 0.9}
    ab = by["gn_adamw_inner/b256/lr0.001/s0"].config["gn"]
    assert ab["inner_optim"]["name"] == "adamw" and ab["warm_start"] is False
    assert by["adamw/b256/lr0.01/s0"].run_dir.endswith("runs/adamw/b256/lr0.01/s0")


@pytest.mark.parametrize("model, blocks", [
    ({"preset": "nano", "n_layers": 3}, 5),
    ({"source": "hf", "hf_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "vocab_size": 512, "max_position_embeddings": 64}}, 5)], ids=["gpt", "hf-llama"])
def test_scheduling_cost_weights_layerwise_gn_by_the_models_own_blocks(tmp_path, model, blocks):
    """A local pool starts the costliest runs first: layerwise GN costs its block count (embeddings, each layer,
    the rest) times full GN's, read from the model itself: a Hugging Face model's layers, not GPT's default 4."""
    if "hf_config" in model:
        pytest.importorskip("transformers")
    study = _study(tmp_path, methods=[{"name": "gn_layerwise", "lrs": [1e-2]}, {"name": "gn", "lrs": [1e-2]}],
                   base={"model": model, "data": {"vocab_size": 512, "seq_len": 64, "eval_sequences": 4},
                         "train": {"threads": 1}, "gn": {"inner_batch_size": 2}})
    lw, gn = (run_spec(study, m, 256, {"lr": 1e-2}, 0, tmp_path / "res") for m in study.methods)
    assert lw.cost() == blocks * gn.cost() > 0


def test_budget_study_sets_steps_from_the_token_budget_counting_line_search(tmp_path):
    study = _study(tmp_path, kind="budget", token_budget=8192, target_loss=None)
    by = {s.run_id: s for s in _selection_runs(study, tmp_path / "res")}
    assert by["adamw/b1024/lr0.01/s0"].config["train"]["steps"] == 8
    ls = by["gn/b1024/lr0.01/s0"].line_search_tokens_per_step
    assert by["gn/b1024/lr0.01/s0"].config["train"]["steps"] == 8192 // (1024 + ls)
    assert by["gn/b1024/lr0.01/s0"].config["train"]["target_loss"] is None


LRS = [1e-2, 3e-2]


@pytest.mark.parametrize("changes,message", [
    ({"methods": [{"name": "adamww", "lrs": [1e-3]}]}, "unknown method 'adamww' (did you mean 'adamw'?)"),
    ({"methods": [{"name": "x", "type": "gn_layerwize", "lrs": [1e-3]}]}, "did you mean 'gn_layerwise'?"),
    ({"methods": [{"name": "sgd", "optimizer": "torch.optim.SGDD", "lrs": [1e-3]}]}, "did you mean 'torch.optim.SGD'?"),
    ({"methods": [{"name": "adamw", "lrs": []}]}, "empty learning-rate grid at batch 256"),
    ({"methods": [{"name": "adamw", "lrs": [1e-3, 3e-3]}, {"name": "gn", "lrs": [1e-2]}]},
     "unequal tuning effort at batch 256"),
    ({"target_loss": None}, "needs targets"),
    ({"batch_tokens": [300]}, "not a multiple of data.seq_len (128)"),
    ({"methods": [{"name": "gn", "lrs": [1e-3], "overrides": {"gn.inner_stepz": 3}}]}, "did you mean 'gn.inner_steps'?"),
    ({"methods": []}, "methods is empty"),
    ({"methods": [{"name": "adamw", "lrs": LRS}, {"name": "adamw", "lrs": LRS}]}, "the name 'adamw' appears twice"),
    ({"methods": [{"name": "x", "type": "adamw", "optimizer": "torch.optim.SGD", "lrs": LRS}]},
     "methods.x: give either type or optimizer, not both"),
    ({"methods": [{"name": "adamw", "lrs": LRS, "kwargs": {"eps": 1e-6}}]},
     "methods.adamw.kwargs: only for an optimizer given by import path"),
    ({"batch_tokens": []}, "batch_tokens must be a non-empty list of positive token counts"),
    ({"batch_tokens": [256, 256]}, "batch_tokens has duplicates: [256, 256]"),
    ({"seeds": [1, 1]}, "seeds must be a non-empty list of distinct integers, got [1, 1]"),
    ({"kind": "budget", "target_loss": None}, "a budget study needs token_budget"),
    ({"kind": "budget", "target_loss": None, "token_budget": 512}, "token_budget (512) is smaller than the largest"),
    ({"gn_inner_steps": 0}, "gn_inner_steps must be >= 1 (or unset), got 0"),
    ({"target_loss": None, "targets": [7.0, -1.0, 6.0], "primary_target": 6.0}, "targets must be positive losses"),
    ({"target_loss": None, "targets": [7.0, 7.0, 6.0], "primary_target": 6.0}, "targets has duplicates"),
    ({"restart_level": 6.5}, "restart_level (6.5) must lie above every target (7.0)"),
    ({"lr_budget": 1}, "lr_budget must be >= 2"),
    ({"lr_budget": 2, "methods": [{"name": "adamw", "lrs": [1e-3, 1e-2, 1e-1]}]},
     "the declared grid at batch 256 has 3 lrs, more than lr_budget 2"),
    ({"lr_budget": 4, "methods": [{"name": "adamw", "lrs": [1e-2]}]},
     "an lr search needs a declared grid of at least two log-spaced lrs"),
    ({"reference": "sgd"}, "reference: 'sgd' is not a (non-control) method of the study"),
    ({"kind": "budget", "target_loss": None, "token_budget": 4096, "reference": "adamw"},
     "only a steps-to-target study compares its methods with a reference"),
    ({"methods": [{"name": "adamw", "lrs": LRS, "batches": [512]}]}, "methods.adamw.batches [512] must be among"),
    ({"methods": [{"name": "adamw", "lrs": LRS}, {"name": "c", "type": "adamw", "control_of": "muon"}]},
     "methods.c.control_of: 'muon' is not a (non-control) method"),
    ({"methods": [{"name": "adamw", "lrs": LRS}, {"name": "c", "type": "adamw", "control_of": "adamw", "lrs": LRS}]},
     "methods.c: a control takes the lr (point) selected for adamw"),
    ({"search_budget": 4}, "search_budget: no method declares a search"),
    ({"trials": 0, "methods": [{"name": "adamw", "search": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}}]},
     "trials must be >= 1 and refine >= 0, got trials 0"),
    ({"methods": [{"name": "adamw", "lrs": LRS, "lrs_by_batch": {512: LRS}}]},
     "methods.adamw.lrs_by_batch: 512 is not one of batch_tokens"),
    ({"methods": [{"name": "adamw", "lrs": [-1e-2, 1e-2]}]}, "learning rates must be positive numbers"),
    ({"methods": [{"name": "adamw", "lrs": [1e-2, 1e-2]}]}, "the learning-rate grid at batch 256 has duplicates"),
    ({"warm_start": {"tokens": 256, "batch_tokens": 512, "lr": 0.01}}, "warm_start.tokens (256) must be >= "),
    ({"warm_start": {"tokens": 1024, "batch_tokens": 512, "lr": 0.0}}, "warm_start.lr must be > 0, got 0.0"),
])
def test_bad_study_input_is_one_line_config_error(tmp_path, changes, message):
    with pytest.raises(ConfigError) as err:
        _selection_runs(_study(tmp_path, **changes), tmp_path / "res")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_warm_start_batch_that_is_not_whole_sequences_is_refused(tmp_path):
    study = _study(tmp_path, warm_start={"tokens": 1000, "batch_tokens": 100, "lr": 0.01})
    with pytest.raises(ConfigError, match=r"warm_start.batch_tokens \(100\) is not a multiple of data.seq_len"):
        study.warm_start_config(tmp_path / "res")


def test_unequal_grids_allowed_when_asked(tmp_path):
    study = _study(tmp_path, allow_unequal_grids=True,
                   methods=[{"name": "adamw", "lrs": [1e-3, 3e-3]}, {"name": "gn", "lrs": [1e-2]}])
    assert len(_selection_runs(study, tmp_path)) == 6


def test_presets_load_and_plan(tmp_path):
    assert {"quick", "ablations", "paper-45m", "paper-150m", "budget-quick", "shakespeare-nano",
            "shakespeare-nano-v2", "shakespeare-nano-budget", "shakespeare-nano-ablations"} == set(preset_names())
    for name in preset_names():
        study = load_study(name)
        assert _selection_runs(study, tmp_path / name)
    with pytest.raises(ConfigError, match="did you mean the preset 'quick'"):
        load_study("quik")


# ----------------------------------------------------------------------------------------- end-to-end studies


def test_study_runs_records_every_run_and_refuses_a_different_study(tmp_path):
    res = tmp_path / "res"
    study = _study(tmp_path, methods=[{"name": "adamw", "lrs": [1e-2, 1e3]}, {"name": "gn", "lrs": [1e-2, 3e-2]}],
                   batch_tokens=[256])
    rows = run_study(study, res)
    ids = [r.run_id for r in rows]
    assert ids[:4] == ["adamw/b256/lr0.01/s0", "adamw/b256/lr1000/s0", "gn/b256/lr0.01/s0", "gn/b256/lr0.03/s0"]
    assert sorted(ids[4:]) == ["adamw/b256/lr0.01/s1", f"gn/b256/lr{rows[-1].lr:g}/s1"]  # the reported seed
    wild = rows[1]
    assert wild.reached is False and wild.steps is None  # lr 1e3: never reaches the target
    for r in rows:
        assert (res / r.run_dir / "metrics.jsonl").exists() and r.status == "finished" and r.schema == results.SCHEMA
    assert (res / "study.yaml").exists() and (res / "report.md").exists() and (res / "summary.json").exists()
    with pytest.raises(ConfigError, match="holds a different study"):
        run_study(_study(tmp_path, batch_tokens=[256], max_steps=4), res)


def test_a_raising_run_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    real = bench.run_training

    def flaky(cfg, resume=False, overwrite=False, stop=None):
        if cfg.optim.lr == 3e-2 and cfg.method == "baseline":
            raise RuntimeError("boom\nsecond line")
        return real(cfg, resume=resume, overwrite=overwrite, stop=stop)

    monkeypatch.setattr(bench, "run_training", flaky)
    study = _study(tmp_path, methods=[{"name": "adamw", "lrs": [1e-2, 3e-2]}], batch_tokens=[256])
    rows = run_study(study, tmp_path / "res")
    assert rows[1].status == "error" and rows[1].error == "RuntimeError: boom" and not rows[1].reached
    assert rows[0].status == "finished"


def test_interrupted_study_continues_without_repeating_runs(tmp_path, monkeypatch):
    res = tmp_path / "res"
    study = _study(tmp_path, warm_start={"tokens": 1024, "batch_tokens": 256, "lr": 1e-2}, target_loss=7.5,
                   batch_tokens=[256, 512])
    real = bench.run_training
    calls = []

    def counting(cfg, resume=False, overwrite=False, stop=None):
        calls.append(cfg.out_dir)
        if len(calls) == 4:  # the 3rd study run (call 1 is the warm start): Ctrl-C mid-run
            raise KeyboardInterrupt
        return real(cfg, resume=resume, overwrite=overwrite, stop=stop)

    monkeypatch.setattr(bench, "run_training", counting)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, res)
    assert len(results.read_rows(res)) == 2
    assert (res / "runs.jsonl").read_text().endswith("\n")
    warm_calls = len(calls)
    rows = run_study(study, res, max_runs=3)  # warm start reused; 3 more runs
    assert len(rows) == 5
    rows = run_study(study, res)
    ids = [r.run_id for r in rows]
    assert len(ids) == len(set(ids)) == 8 + 4  # 8 selection runs, then 2 methods x 2 batches x 1 reported seed
    assert sorted(ids) == sorted(s.run_id for s in plan_runs(study, res, rows)[0])
    later = calls[warm_calls:]
    assert not any(c.endswith("warm_start") for c in later)  # the warm start was trained once
    assert len(later) == 10  # the interrupted run again, plus the 9 never started
    assert all(r.status == "finished" for r in rows)


def test_a_target_the_warm_start_already_meets_is_refused(tmp_path):
    study = _study(tmp_path, warm_start={"tokens": 512, "batch_tokens": 256, "lr": 1e-2}, target_loss=20.0)
    with pytest.raises(ConfigError, match="already met by the warm start"):
        run_study(study, tmp_path / "res")
    assert not (tmp_path / "res" / "runs").exists()


@pytest.mark.slow
def test_budget_study_end_to_end(tmp_path):
    study = _study(tmp_path, kind="budget", token_budget=1024, target_loss=None, batch_tokens=[256, 512],
                   methods=[{"name": "adamw", "lrs": [1e-2, 3e-2]}, {"name": "gn", "lrs": [1e-2, 3e-2]}])
    rows = run_study(study, tmp_path / "res")
    assert {r.run_id: r.steps_run for r in rows}["adamw/b512/lr0.01/s0"] == 2
    assert all(r.final_eval_loss is not None for r in rows) and len(rows) == 8 + 4
    assert (tmp_path / "res" / "final_loss_vs_batch.png").exists()
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["kind"] == "budget" and summary["cells"]["gn/512"]["final_eval_loss"] is not None
    assert "## Final validation loss vs batch size" in (tmp_path / "res" / "report.md").read_text()


def test_cli_bench_and_report(tmp_path, capsys):
    from gnlm.cli import build_parser

    parser = build_parser()
    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({
        "name": "cli", "base": {"model": "nano", "data": {"eval_sequences": 4}, "train": {"eval_batch_size": 4}},
        "target_loss": 7.0, "max_steps": 2, "batch_tokens": [256], "seeds": [1],
        "methods": [{"name": "adamw", "lrs": [1e-2]}]}))
    res = tmp_path / "res"
    args = parser.parse_args(["bench", str(study), "progress=false", "--results", str(res)])
    assert args.func(args) == 0
    assert len(results.read_rows(res)) == 2
    (res / "report.md").unlink()
    args = parser.parse_args(["report", str(res)])
    assert args.func(args) == 0 and (res / "report.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["paper-45m", "paper-150m"])
def test_paper_presets_run_two_outer_steps_on_a_local_stand_in(tmp_path, preset, small_docs):
    """The paper configs' GN run, unchanged but for the data (a local JSON-lines stand-in for C4 and a local
    SentencePiece model for the T5 tokenizer, which need the network) and sizes that fit a CPU test."""
    from gnlm.config import merge
    from gnlm.runconfig import build_run_config
    from gnlm.train import run_training

    corpus = tmp_path / "c4-stand-in.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in small_docs))
    _train_spm(small_docs, tmp_path / "spm")
    study = load_study(preset)
    spec = next(s for s in _selection_runs(study, tmp_path / "res") if s.method == "gn")
    stand_in = {
        "out_dir": str(tmp_path / "run"),
        "data": {"source": "hf", "hf_path": "json", "paths": [str(corpus)], "hf_val_split": None,
                 "tokenizer": str(tmp_path / "spm.model"), "seq_len": 64, "eval_sequences": 2,
                 "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 2, "init_from": None, "eval_every": 1, "eval_batch_size": 2, "micro_batch_size": None,
                  "threads": 1, "target_loss": None},
        "gn": {"inner_steps": 2, "inner_batch_size": 1, "line_search_batches": 1},
    }
    cfg = build_run_config(merge(spec.config, stand_in))
    assert cfg.model.preset == preset.split("-")[1] and cfg.gn.inner_optim.name == "muon"
    summary = run_training(cfg)
    assert summary["step"] == 2 and not summary["diverged"]


def _train_spm(docs, prefix):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(prefix), vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)


# ------------------------------------------------------------------------------- declared targets and lr search


def test_targets_are_declared_and_checked(tmp_path):
    study = _study(tmp_path, target_loss=None, targets=[6.8, 7.2, 7.0], primary_target=7.0)
    assert study.targets == [7.2, 7.0, 6.8] and study.deepest_target == 6.8
    spec = _selection_runs(study, tmp_path / "res")[0]
    assert spec.config["train"]["target_loss"] == 6.8 and spec.targets == (7.2, 7.0, 6.8)  # runs stop at the deepest
    for changes, message in [({"targets": [7.0, 6.9]}, "at least three"),
                             ({"targets": [7.2, 7.0, 6.8], "primary_target": 6.5}, "primary_target must be one of"),
                             ({"targets": [7.2, 7.0, 6.8], "primary_target": 7.0, "target_loss": 7.0}, "not both")]:
        with pytest.raises(ConfigError, match=message):
            _study(tmp_path, **{"target_loss": None, **changes})


def test_fixed_inner_steps_grow_the_inner_batch(tmp_path):
    study = _study(tmp_path, gn_inner_steps=2, batch_tokens=[256, 1024])
    by = {s.run_id: s.config["gn"] for s in _selection_runs(study, tmp_path / "res") if s.family == "gn"}
    assert (by["gn/b256/lr0.01/s0"]["inner_steps"], by["gn/b256/lr0.01/s0"]["inner_batch_size"]) == (2, 1)
    assert (by["gn/b1024/lr0.01/s0"]["inner_steps"], by["gn/b1024/lr0.01/s0"]["inner_batch_size"]) == (2, 4)


def test_lr_search_plan_extends_at_the_edge_then_runs_the_reported_seeds(tmp_path):
    study = _study(tmp_path, methods=[{"name": "adamw", "lrs": [0.01, 0.03]}], batch_tokens=[256],
                   lr_budget=4, selection_seed=0, seeds=[1, 2])
    res = tmp_path / "res"
    specs, final = plan_runs(study, res, [])
    assert [s.run_id for s in specs] == ["adamw/b256/lr0.01/s0", "adamw/b256/lr0.03/s0"] and not final

    def row(spec, steps):
        return Row(run_id=spec.run_id, method=spec.method, family=spec.family, batch_tokens=spec.batch_tokens,
                   lr=spec.lr, seed=spec.seed, run_dir="x", final_eval_loss=6.0,
                   crossings={"7": {"step": steps, "step_interp": steps}})

    rows = [row(specs[0], 3.0), row(specs[1], 2.0)]  # best on the top edge: extend upwards by the grid's ratio
    specs, final = plan_runs(study, res, rows)
    assert specs[-1].run_id == "adamw/b256/lr0.09/s0" and not final
    rows.append(row(specs[-1], 2.5))  # now bracketed: 0.03 wins; the reported seeds run at it
    specs, final = plan_runs(study, res, rows)
    assert [s.run_id for s in specs[-2:]] == ["adamw/b256/lr0.03/s1", "adamw/b256/lr0.03/s2"] and final
    with pytest.raises(ConfigError, match="is also in seeds"):
        _study(tmp_path, lr_budget=4, seeds=[0, 1])
    with pytest.raises(ConfigError, match="not log-spaced"):
        _study(tmp_path, methods=[{"name": "adamw", "lrs": [0.01, 0.02, 0.1]}], lr_budget=4, selection_seed=0,
               seeds=[1])


def test_lr_search_study_end_to_end_with_a_control_and_summary_json(tmp_path):
    res = tmp_path / "res"
    study = _study(tmp_path, target_loss=None, targets=[7.6, 7.3, 7.0], primary_target=7.3, batch_tokens=[256],
                   selection_seed=0, seeds=[1], lr_budget=3,
                   methods=[{"name": "adamw", "lrs": [1e-3, 3e-3]},
                            {"name": "adamw_no_warmup", "type": "adamw", "control_of": "adamw",
                             "overrides": {"schedule.warmup_steps": 0}}],
                   base={"model": {"preset": "nano"}, "data": {"eval_sequences": 4},
                         "train": {"eval_every": 1, "eval_batch_size": 4, "threads": 1},
                         "schedule": {"name": "constant", "warmup_steps": 2}})
    rows = run_study(study, res)
    ids = [r.run_id for r in rows]
    assert ids[:2] == ["adamw/b256/lr0.001/s0", "adamw/b256/lr0.003/s0"]
    assert len([i for i in ids if i.endswith("/s0")]) == 3  # the budget: one more lr beyond the better edge
    best = next(r for r in rows if r.method == "adamw" and r.seed == 1).lr
    assert f"adamw_no_warmup/b256/lr{best:g}/s1" in ids and len(ids) == 5
    assert most_runs(study) == 5  # lr_budget 3 + a reported seed + the control's: this search used all of it
    assert all(set(r.crossings) == {"7.6", "7.3", "7"} and r.curve["eval_loss"] for r in rows)
    summary = json.loads((res / "summary.json").read_text())
    cell = summary["cells"]["adamw/256"]
    assert cell["trials"] == 3 and cell["best_lr"] == best and cell["seeds"] == 1
    assert set(cell["per_target"]) == {"7.6", "7.3", "7"} and summary["primary_target"] == 7.3
    assert summary["cells"]["adamw_no_warmup/256"]["control_of"] == "adamw"
    report = (res / "report.md").read_text()
    assert "### target 7.3 (primary)" in report and "### Controls" in report
    assert "no fit of steps against batch size" in report and "per_doubling" not in summary["fit"]["adamw"]  # one batch


def test_lr_search_stop_waits_for_an_incumbent_of_its_own_cell(tmp_path):
    stop = LrSearchStop(tmp_path, "gn/b256/lr0.01/s0", "gn", 256, 0, 3.5)
    assert stop({"step": 50, "eval_loss": 4.0}) is None  # no rows file yet

    def row(run_id, method, batch, seed, lr, crossing):
        return Row(run_id=run_id, method=method, family="gn", batch_tokens=batch, seed=seed, lr=lr, run_dir="x",
                   crossings={"3.5": None if crossing is None else {"step_interp": crossing}})

    others = [row("adamw/b256/lr0.1/s0", "adamw", 256, 0, 0.1, 2.0), row("gn/b512/lr0.1/s0", "gn", 512, 0, 0.1, 2.0),
              row("gn/b256/lr0.1/s1", "gn", 256, 1, 0.1, 2.0), row("gn/b256/lr0.001/s0", "gn", 256, 0, 1e-3, None)]
    for r in others:
        results.append_row(tmp_path, r)
    assert stop({"step": 50, "eval_loss": 4.0}) is None  # other methods, batches, seeds; a loser of its own cell
    results.append_row(tmp_path, row("gn/b256/lr0.1/s0", "gn", 256, 0, 0.1, 4.25))
    assert stop({"step": 4, "eval_loss": 4.0}) is None  # step 4 < 4.25: it could still cross first
    assert stop({"step": 5, "eval_loss": 3.4}) is None  # below the target: it is the run's own crossing
    reason = stop({"step": 5, "eval_loss": 3.6})
    assert reason is not None and "lr 0.1 reached the primary target 3.5 at step 4.25" in reason


@pytest.mark.parametrize("search", [
    {"lr_budget": 3, "methods": [{"name": "adamw", "lrs": [3e-4, 3e-3]}]},
    {"trials": 3, "refine": 0, "methods": [{"name": "adamw", "search": {
        "lr": {"low": 1e-4, "high": 1e-2, "log": True}, "optim.weight_decay": {"low": 0.0, "high": 0.2}}}]},
], ids=["lr_grid", "search"])
def test_lr_search_stop_keeps_the_selection_and_the_reported_runs(tmp_path, search):
    """Run a search (an lr grid; trials of two settings) to the end without stopping, then again with a losing
    run deleted: the rerun stops where it can no longer win, its curve is the prefix of the full one, and the
    selection and reported rows are unchanged."""
    res = tmp_path / "res"
    study = _study(tmp_path, target_loss=None, targets=[7.6, 7.3, 7.0], primary_target=7.3, batch_tokens=[256],
                   selection_seed=0, seeds=[1], max_steps=12, prune_lr_search=False, **search,
                   base={"model": {"preset": "nano"}, "data": {"eval_sequences": 4},
                         "train": {"eval_every": 1, "eval_batch_size": 4, "threads": 1},
                         "schedule": {"name": "constant", "warmup_steps": 2}})
    full = {r.run_id: r for r in run_study(study, res, report=False)}
    search = [r for r in full.values() if r.seed == 0]
    best = min(search, key=lambda r: selection_key(r, 7.3))
    crossing = steps_to(best, 7.3)
    losers = [r for r in search if r is not best and steps_to(r, 7.3) > math.ceil(crossing) and not r.diverged]
    assert math.isfinite(crossing) and losers, "the test needs an lr that ran on past the winner's crossing"
    loser = losers[0]
    kept = [line for line in (res / "runs.jsonl").read_text().splitlines() if json.loads(line)["run_id"] != loser.run_id]
    (res / "runs.jsonl").write_text("\n".join(kept) + "\n")
    shutil.rmtree(res / loser.run_dir)
    again = {r.run_id: r for r in run_study(replace(study, prune_lr_search=True), res, report=False)}
    assert set(again) == set(full)
    stopped = again[loser.run_id]
    assert stopped.stopped_early and stopped.steps_run == math.ceil(crossing)
    n = len(stopped.curve["eval_loss"])
    assert stopped.curve["eval_loss"] == loser.curve["eval_loss"][:n] and n < len(loser.curve["eval_loss"])
    for run_id, row in full.items():
        if run_id != loser.run_id:
            assert again[run_id] == row


def test_a_token_budget_caps_the_steps_of_large_batches(tmp_path):
    study = _study(tmp_path, max_steps=3, max_tokens=2048, batch_tokens=[256, 1024],
                   methods=[{"name": "adamw", "lrs": [1e-2, 3e-2]}, {"name": "gn", "lrs": [1e-2, 3e-2], "max_tokens": 1024}])
    by = {s.run_id: s.config["train"]["steps"] for s in _selection_runs(study, tmp_path / "res")}
    assert by["adamw/b256/lr0.01/s0"] == 3 and by["adamw/b1024/lr0.01/s0"] == 2  # min(3, 2048 // 1024)
    assert by["gn/b256/lr0.01/s0"] == 3 and by["gn/b1024/lr0.01/s0"] == 1  # the method's own token budget
    with pytest.raises(ConfigError, match="max_tokens .* is smaller than the largest batch"):
        _study(tmp_path, max_tokens=512, batch_tokens=[256, 1024])
