"""The equal-budget multi-hyperparameter search: quasi-random trials, edge extensions, the lr refinement, bad search
spaces, and a tiny searched study end to end."""

import itertools
import json
import math
from dataclasses import replace

import pytest
import yaml

from gnlm.bench import run_study
from gnlm.config import ConfigError
from gnlm.plan import most_runs, plan_runs
from gnlm.results import Row
from gnlm.search import Dim, refined_lrs, rounded, search_seed
from gnlm.selection import selected_cell
from gnlm.study import study_from_dict

LR = {"low": 1e-3, "high": 1e-1, "log": True}
BASE = {"model": {"preset": "nano"}, "data": {"eval_sequences": 4},
        "train": {"eval_every": 1, "eval_batch_size": 4, "threads": 1}, "gn": {"inner_batch_size": 2}}


def _study(**changes):
    raw = {"name": "s", "base": BASE, "target_loss": 7.0, "max_steps": 2, "batch_tokens": [256, 1024],
           "progress": False, "selection_seed": 0, "seeds": [1], "trials": 5, "refine": 2, "search_budget": 9,
           "methods": [{"name": "adamw", "search": {"lr": LR, "optim.weight_decay": {"low": 0.0, "high": 0.2},
                                                    "optim.betas.1": {"choices": [0.95, 0.99]}}},
                       {"name": "muon", "search": {"lr": LR, "optim.momentum": {"low": 0.8, "high": 0.98}}},
                       {"name": "gn", "search": {"lr": LR, "gn.line_search_range": {"low": 2, "high": 6, "int": True},
                                                 "gn.inner_optim.weight_decay": {"choices": [0.0, 0.1]}}}]}
    raw.update(changes)
    return study_from_dict(raw)


def _row(spec, steps):
    """A finished row of ``spec`` that reaches the target (7) at ``steps`` (None: never), its final loss rising
    with the steps so that ties go the same way."""
    crossing = None if steps is None else {"step": math.ceil(steps), "step_interp": float(steps)}
    return Row(run_id=spec.run_id, method=spec.method, family=spec.family, batch_tokens=spec.batch_tokens,
               lr=spec.lr, seed=spec.seed, run_dir="x", hparams=spec.hparams, crossings={"7": crossing},
               final_eval_loss=6.0 + (1.0 if steps is None else steps / 1000))


def _search(study, steps, tmp_path, waves=None):
    """Plan wave after wave, answering every run with the steps ``steps(point)``, until the plan is final (or after
    ``waves`` waves); returns the rows."""
    rows: list[Row] = []
    for _ in range(waves or 100):
        specs, final = plan_runs(study, tmp_path, rows)
        done = {r.run_id for r in rows}
        todo = [s for s in specs if s.run_id not in done]
        if not todo:
            assert final
            break
        rows += [_row(s, steps(s.hparams)) for s in todo]
    return rows


def _selection(rows, method="adamw", batch=256):
    return [r for r in rows if r.method == method and r.batch_tokens == batch and r.seed == 0]


# ------------------------------------------------------------------------------------------------- trials


def test_trials_are_the_same_points_on_every_plan_and_every_method_gets_the_same_number(tmp_path):
    study = _study()
    first = plan_runs(study, tmp_path, [])[0]
    again = plan_runs(_study(), tmp_path, [])[0]  # a restarted study plans the same trials
    assert [(s.run_id, s.hparams) for s in first] == [(s.run_id, s.hparams) for s in again]
    assert search_seed("adamw", 256, 0) == 366539004160725471  # sha256, never the per-process hash()
    for m in ("adamw", "muon", "gn"):
        for b in (256, 1024):
            cell = [s for s in first if s.method == m and s.batch_tokens == b]
            assert [s.run_id for s in cell] == [f"{m}/b{b}/t{k}/s0" for k in range(5)]
            assert len({json.dumps(s.hparams, sort_keys=True) for s in cell}) == 5
    by = {s.run_id: s for s in first}
    assert by["adamw/b256/t0/s0"].hparams != by["adamw/b1024/t0/s0"].hparams  # each cell its own points
    for s in first:
        p = s.hparams
        assert 1e-3 <= p["lr"] < 1e-1 and s.lr == p["lr"] and float(f"{p['lr']:.4g}") == p["lr"]
        if s.method == "adamw":
            assert 0 <= p["optim.weight_decay"] < 0.2 and p["optim.betas.1"] in (0.95, 0.99)
            assert s.config["optim"]["betas"] == [0.9, p["optim.betas.1"]]  # the other element as configured
            assert s.config["optim"]["weight_decay"] == p["optim.weight_decay"] and s.config["optim"]["lr"] == p["lr"]
        if s.method == "gn":
            assert isinstance(p["gn.line_search_range"], int) and 2 <= p["gn.line_search_range"] <= 6
            assert s.config["gn"]["line_search_range"] == p["gn.line_search_range"]
            assert s.config["gn"]["inner_optim"]["lr"] == p["lr"]
        assert s.run_dir.endswith(f"runs/{s.run_id}")


# ---------------------------------------------------------------------------------------- edges, extension


def test_each_kind_of_dimension_finds_its_edge_and_the_value_beyond():
    lr = Dim.parse("lr", LR, "lr")  # 4 trials: a spacing of 10^0.5
    assert Dim.parse("lr", yaml.safe_load("{low: 1e-3, high: 1e-1, log: true}"), "lr") == lr  # YAML 1.1: strings
    assert lr.edge(0.08, [], 4) == "high" and lr.beyond("high", [], 4) == pytest.approx(0.3162)
    assert lr.edge(0.002, [], 4) == "low" and lr.beyond("low", [], 4) == pytest.approx(3.162e-4)
    assert lr.edge(0.01, [], 4) is None
    assert lr.edge(0.08, [0.3162], 4) is None and lr.beyond("high", [0.3162], 4) == pytest.approx(1.0, rel=1e-3)
    wd = Dim.parse("optim.weight_decay", {"low": 0, "high": 0.2}, "wd")
    assert wd.edge(0.18, [], 4) == "high" and wd.beyond("high", [], 4) == pytest.approx(0.25)
    assert wd.edge(0.01, [], 4) == "low" and wd.beyond("low", [], 4) == pytest.approx(-0.05)
    warm = Dim.parse("schedule.warmup_steps", {"low": 0, "high": 10, "int": True}, "w")
    assert warm.edge(9, [], 4) == "high" and warm.beyond("high", [], 4) == 13  # 10 + 2.5, a whole number beyond
    assert warm.edge(5, [], 4) is None and warm.beyond("low", [], 4) == -3
    narrow = Dim.parse("gn.line_search_range", {"low": 4, "high": 6, "int": True}, "n")
    assert narrow.edge(6, [], 8) == "high" and narrow.edge(5, [], 8) is None and narrow.beyond("high", [], 8) == 7
    beta = Dim.parse("optim.betas.1", {"choices": [0.95, 0.99]}, "b")
    assert beta.edge(0.99, [], 4) == "high" and beta.beyond("high", [], 4) == pytest.approx(1.03)
    eps = Dim.parse("optim.eps", {"choices": [1e-8, 1e-7, 1e-6], "log": True}, "e")
    assert eps.edge(1e-8, [], 4) == "low" and eps.beyond("low", [], 4) == pytest.approx(1e-9)
    assert eps.edge(1e-6, [1e-5], 4) is None and eps.beyond("high", [1e-5], 4) == pytest.approx(1e-4)
    assert eps.edge(1e-7, [], 4) is None
    switch = Dim.parse("gn.line_search_skip", {"choices": [True, False]}, "s")
    assert switch.edge(True, [], 4) is None  # unordered: no edge


# A dimension of each kind and the value beyond its high and low edge with 8 trials (None: the run config refuses
# it, the setting's own limit).
DIMS = {
    "lr": (LR, rounded(0.1 * 100 ** (1 / 8)), rounded(1e-3 / 100 ** (1 / 8))),
    "optim.weight_decay": ({"low": 0.0, "high": 0.2}, 0.225, None),
    "schedule.warmup_steps": ({"low": 0, "high": 10, "int": True}, 12, None),
    "optim.eps": ({"choices": [1e-8, 1e-7, 1e-6], "log": True}, 1e-5, 1e-9),
}


@pytest.mark.parametrize("key", list(DIMS))
@pytest.mark.parametrize("side", ["high", "low"])
def test_a_best_value_on_an_edge_gets_one_point_beyond_it_in_every_kind_of_dimension(tmp_path, key, side):
    """8 scrambled Sobol trials put one value in each eighth of every dimension, so the best value of a setting that
    always helps more the further it goes sits in the outer eighth: the next wave holds the best point with that
    setting moved one spacing beyond the edge, nothing else changed, and the cell flags the edge. A next value the
    run config refuses (a weight decay or warm-up below 0) is the setting's own limit: neither planned nor
    flagged."""
    study = _study(trials=8, refine=0, search_budget=12, batch_tokens=[256],
                   methods=[{"name": "adamw", "search": {"lr": LR, **{k: spec for k, (spec, *_) in DIMS.items()}}}])
    sign = 1 if side == "high" else -1
    rows = _search(study, lambda p: 100 - sign * (math.log(p[key]) if key in ("lr", "optim.eps") else p[key]),
                   tmp_path, waves=1)
    cell = selected_cell(study, rows, "adamw", 256)
    best = cell["best_point"]
    new = [s.hparams for s in plan_runs(study, tmp_path, rows)[0] if s.run_id not in {r.run_id for r in rows}]
    moved = [p[key] for p in new if p[key] != best[key] and all(p[k] == best[k] for k in best if k != key)]
    beyond = DIMS[key][1 if side == "high" else 2]
    if beyond is None:
        assert moved == [] and key not in cell["edges"]
    else:
        assert moved == [beyond] and cell["edges"][key] == side


def test_extensions_stop_at_the_budget_then_the_lr_is_refined_and_the_edge_is_reported(tmp_path):
    """An lr that always helps more the larger it is keeps its best on the top edge: one point beyond per wave up
    to search_budget − refine, then the refinement around the best point (its lr only, √2 apart), the reported seed
    at the best point, and the cell flags the lr edge. Every method uses the same budget."""
    study = _study(trials=4, refine=2, search_budget=8, batch_tokens=[256],
                   methods=[{"name": "adamw", "search": {"lr": LR}}, *_study().methods[1:]])
    rows = _search(study, lambda p: 10 - math.log10(p["lr"]), tmp_path)
    sel = _selection(rows)
    assert [r.run_id for r in sel] == [f"adamw/b256/t{k}/s0" for k in range(8)]
    assert len(_selection(rows, "muon")) == len(_selection(rows, "gn")) == 8
    assert [r.lr for r in sel[4:6]] == pytest.approx([0.3162, 1.0], rel=1e-3)  # a spacing (10^0.5) beyond 0.1, twice
    assert [r.lr for r in sel[6:]] == refined_lrs(sel[5].lr, 2) == pytest.approx([1.414, 0.7071], rel=1e-3)
    cell = selected_cell(study, rows, "adamw", 256)
    assert cell["best_point"] == {"lr": sel[6].lr} and cell["trials"] == 8 and cell["edges"] == {"lr": "high"}
    (reported,) = cell["reported"]
    assert reported.run_id == "adamw/b256/t6/s1" and cell["lr_on_edge"]


def test_the_refinement_is_at_most_two_fold_apart():
    for count in (1, 2, 4, 6):
        lrs = sorted([0.01, *refined_lrs(0.01, count)])
        assert len(set(lrs)) == count + 1
        assert all(b / a <= 2 ** 0.5 * 1.001 for a, b in itertools.pairwise(lrs))
    assert refined_lrs(0.01, 2) == [0.01414, 0.007071]


def test_a_bracketed_search_refines_without_extending(tmp_path):
    study = _study(trials=5, refine=2, search_budget=9, batch_tokens=[256], methods=[
        {"name": "adamw", "search": {"lr": LR, "optim.betas.1": {"choices": [0.9, 0.95, 0.99]}}}])
    rows = _search(study, lambda p: 10 + abs(math.log10(p["lr"] / 0.01)) + abs(p["optim.betas.1"] - 0.95), tmp_path)
    sel = _selection(rows)
    cell = selected_cell(study, rows, "adamw", 256)
    assert cell["edges"] == {} and cell["trials"] == len(sel) == 7  # 5 trials, no extension, 2 refinements
    best = min(sel[:5], key=lambda r: (r.crossings["7"]["step_interp"], r.lr))
    assert [r.hparams for r in sel[5:]] == [{**best.hparams, "lr": lr} for lr in refined_lrs(best.lr, 2)]


def test_a_failed_trial_holds_its_search_and_a_row_at_another_point_is_refused(tmp_path):
    study = _study(trials=4, refine=2, search_budget=6, batch_tokens=[256],
                   methods=[{"name": "adamw", "search": {"lr": LR}}])
    trials = plan_runs(study, tmp_path, [])[0]
    rows = [_row(s, 10.0 + k) for k, s in enumerate(trials)]
    rows[1] = replace(rows[1], status="error", crossings={})
    assert plan_runs(study, tmp_path, rows) == (trials, False)  # nothing planned on a failure: --retry-failed first
    rows[1] = _row(trials[1], 11.0)
    assert len(plan_runs(study, tmp_path, rows)[0]) > 4  # the search goes on
    rows[2] = replace(rows[2], hparams={"lr": 0.5}, lr=0.5)
    with pytest.raises(ConfigError, match="adamw/b256/t2/s0 ran at"):
        plan_runs(study, tmp_path, rows)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("methods,changes,message", [
    ([{"name": "adamw", "search": {"lr": LR, "optim.weight_decy": {"low": 0, "high": 1}}}], {},
     "did you mean 'optim.weight_decay'"),
    ([{"name": "adamw", "search": {"lr": {"low": 0.1, "high": 0.01}}}], {}, "empty range"),
    ([{"name": "adamw", "search": {"lr": {"low": 0, "high": 0.1, "log": True}}}], {}, "log range must be positive"),
    ([{"name": "adamw", "search": {"lr": {"low": 0.001, "hi": 0.1}}}], {}, "unknown key 'hi' (did you mean 'high'?)"),
    ([{"name": "adamw", "search": {"lr": {"low": 0.001, "high": 0.1, "choices": [1]}}}], {}, "not both"),
    ([{"name": "adamw", "search": {"lr": LR, "optim.weight_decay": [0.0, 0.1]}}], {}, "or {choices: [...]}, got [0.0"),
    ([{"name": "adamw", "search": {"lr": LR, "optim.weight_decay": {}}}], {}, "or {choices: [...]}, got {}"),
    ([{"name": "adamw", "search": {"lr": {"low": 0.001, "high": 0.1, "log": "yes"}}}], {},
     "log and int are true or false, got log 'yes'"),
    ([{"name": "adamw", "search": {"lr": LR, "optim.weight_decay": {"choices": []}}}], {},
     "optim.weight_decay.choices: expected a non-empty list, got []"),
    ([{"name": "adamw", "search": {"lr": LR, "optim.weight_decay": {"choices": 0.1}}}], {},
     "expected a non-empty list, got 0.1"),
    ([{"name": "adamw", "search": {"lr": LR, "optim.weight_decay": {"choices": [0.0, 0.1, 0.0]}}}], {},
     "choices has duplicates: [0.0, 0.1, 0.0]"),
    ([{"name": "adamw", "search": {"lr": LR, "optim.weight_decay": {"choices": [0.0, 0.1], "log": True}}}], {},
     "log: true needs positive numbers as choices"),
    ([{"name": "adamw", "search": {"lr": {"low": "small", "high": 0.1}}}], {},
     "low and high must be numbers, got low 'small'"),
    ([{"name": "adamw", "search": {"lr": LR, "schedule.warmup_steps": {"low": 0, "high": 10.5, "int": True}}}], {},
     "int: true needs whole-number bounds"),
    ([{"name": "gn", "search": {"lr": LR, "optim.weight_decay": {"low": 0, "high": 1}}}], {}, "never reads optim.*"),
    ([{"name": "adamw", "search": {"lr": LR, "gn.line_search_range": {"low": 2, "high": 6, "int": True}}}], {},
     "never reads gn.*"),
    ([{"name": "adamw", "search": {"optim.weight_decay": {"low": 0, "high": 1}}}], {}, "needs lr"),
    ([{"name": "adamw", "search": {"lr": LR, "optim.lr": LR}}], {}, "is the search key lr"),
    ([{"name": "adamw", "search": {"lr": LR, "train.seed": {"choices": [1, 2]}}}], {}, "set by the study"),
    ([{"name": "adamw", "search": {"lr": LR, "optim.betas": {"choices": [0.9]}}}], {}, "search one element"),
    ([{"name": "adamw", "search": {"lr": LR, "optim.betas.1": {"low": 0.9, "high": 1.0}}}], {},
     "the run config refuses 1.0"),
    ([{"name": "adamw", "search": {"lr": LR, "schedule.warmup_steps": {"low": 0, "high": 10}}}], {}, "add int: true"),
    ([{"name": "adamw", "search": {"lr": LR, "train.ema_decay": {"low": 0, "high": 0.9}},
       "overrides": {"train.ema_decay": 0.5}}], {}, "also in methods.adamw.overrides"),
    ([{"name": "adamw", "search": {"lr": LR}}, {"name": "gn", "lrs": [0.01, 0.03]}], {}, "unequal tuning effort"),
    ([{"name": "adamw", "search": {"lr": LR}, "lrs": [0.01]}], {}, "either lrs or search"),
    ([{"name": "adamw", "search": {"lr": LR}}], {"trials": None}, "a search needs trials"),
    ([{"name": "adamw", "search": {"lr": LR}}], {"search_budget": 4}, "search_budget (4) is below"),
    ([{"name": "adamw", "search": {"lr": LR}}], {"lr_budget": 4}, "lr_budget: no method has an lr grid"),
])
def test_a_bad_search_is_a_one_line_error(methods, changes, message):
    with pytest.raises(ConfigError) as err:
        _study(methods=methods, **changes)
    assert message in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ end to end


def test_a_searched_study_runs_selects_and_reports_the_selected_settings(tmp_path):
    """Nano model, 2 steps, 3 trials of 2 settings plus one lr refinement: the reported seed runs at the selected
    point (its config holds the point's weight decay), summary.json and the report show the point and the trials,
    and a restart plans nothing new."""
    res = tmp_path / "res"
    study = _study(trials=3, refine=1, search_budget=4, batch_tokens=[256], target_loss=None,
                   targets=[7.6, 7.3, 7.0], primary_target=7.3,
                   methods=[{"name": "adamw", "search": {"lr": {"low": 1e-3, "high": 3e-2, "log": True},
                                                         "optim.weight_decay": {"low": 0.0, "high": 0.2}}}])
    rows = run_study(study, res)
    sel = [r for r in rows if r.seed == 0]
    assert [r.run_id for r in sel] == [f"adamw/b256/t{k}/s0" for k in range(4)]
    assert sel[3].hparams["optim.weight_decay"] in [r.hparams["optim.weight_decay"] for r in sel[:3]]  # lr only
    (reported,) = [r for r in rows if r.seed == 1]
    summary = json.loads((res / "summary.json").read_text())
    cell = summary["cells"]["adamw/256"]
    assert reported.hparams == cell["best_point"] and cell["trials"] == 4 and cell["seeds"] == 1
    assert {r.run_id: r.hparams for r in sel}[reported.run_id.replace("/s1", "/s0")] == reported.hparams
    config = yaml.safe_load((res / reported.run_dir / "config.yaml").read_text())
    assert config["optim"]["weight_decay"] == cell["best_point"]["optim.weight_decay"]
    assert config["optim"]["lr"] == cell["best_point"]["lr"]
    report = (res / "report.md").read_text()
    assert "### Selected settings" in report and "| `lr` | `optim.weight_decay` |" in report
    assert f"| adamw | 256 | 4 | {cell['best_point']['lr']:.4g}" in report
    assert run_study(study, res) == rows  # a restart plans the same runs: nothing new to train
    assert len(rows) == most_runs(study) == 5  # search_budget 4 + one reported seed
