"""Pure analysis on synthetic data: interpolated target crossings, the S(B) fit and its bootstrap."""

from __future__ import annotations

import math

import pytest

from gnlm.analysis import (
    bootstrap_fit,
    doubling_reduction,
    early_rise,
    eta_at_floor,
    fit_steps_vs_batch,
    summarize_study,
)
from gnlm.results import Row, target_crossing
from gnlm.selection import next_lr, selection_key
from gnlm.study import study_from_dict


def test_target_crossing_interpolates_linearly_in_loss_between_evaluations():
    curve = [{"step": 0, "tokens": 0, "eval_loss": 5.0, "wall_time": 0.0},
             {"step": 1, "tokens": 100, "loss": 3.0},  # a training row: no eval_loss, never counts
             {"step": 4, "tokens": 400, "eval_loss": 4.5, "wall_time": 4.0},
             {"step": 8, "tokens": 800, "eval_loss": 3.5, "wall_time": 10.0},
             {"step": 12, "tokens": 1200, "eval_loss": 3.0, "wall_time": 14.0}]
    c = target_crossing(curve, 4.0)  # halfway in loss between steps 4 (4.5) and 8 (3.5)
    assert c["step"] == 8 and c["step_interp"] == pytest.approx(6.0)
    assert c["tokens_interp"] == pytest.approx(600.0) and c["wall_time_interp"] == pytest.approx(7.0)
    assert target_crossing(curve, 3.25)["step_interp"] == pytest.approx(10.0)
    assert target_crossing(curve, 3.5)["step_interp"] == pytest.approx(8.0)  # exactly at an evaluation
    assert target_crossing(curve, 5.0)["step_interp"] == 0.0  # met at the first evaluation
    assert target_crossing(curve, 2.0) is None


def test_target_crossing_skips_non_finite_evaluations():
    curve = [{"step": 0, "eval_loss": 5.0}, {"step": 2, "eval_loss": math.nan}, {"step": 4, "eval_loss": 3.0}]
    assert target_crossing(curve, 4.0)["step_interp"] == pytest.approx(2.0)


@pytest.mark.parametrize("s_min,b_crit", [(20.0, 30_000.0), (5.0, 200_000.0), (100.0, 2_000.0)])
def test_fit_recovers_s_min_and_b_crit_of_synthetic_data(s_min, b_crit):
    batches = [4096 * 2 ** i for i in range(6)]
    noise = [1.02, 0.98, 1.01, 0.99, 1.02, 0.985]  # ±2% measurement noise
    steps = [s_min * (1 + b_crit / b) * e for b, e in zip(batches, noise)]
    fit = fit_steps_vs_batch(batches, steps)
    assert fit.s_min == pytest.approx(s_min, rel=0.05)
    assert fit.b_crit == pytest.approx(b_crit, rel=0.05)
    assert fit.in_range == (batches[0] <= b_crit <= batches[-1])
    exact = fit_steps_vs_batch(batches, [s_min * (1 + b_crit / b) for b in batches])
    assert exact.s_min == pytest.approx(s_min, rel=1e-6) and exact.b_crit == pytest.approx(b_crit, rel=1e-6)


def test_fit_of_flat_steps_has_zero_critical_batch():
    fit = fit_steps_vs_batch([1, 2, 4, 8], [10.0, 10.0, 10.0, 10.0])
    assert fit.b_crit == 0.0 and fit.s_min == pytest.approx(10.0)


def test_fit_of_steps_falling_like_one_over_b_is_unbounded():
    batches = [2048 * 2 ** i for i in range(4)]
    fit = fit_steps_vs_batch(batches, [1e6 / b for b in batches])  # every doubling halves the steps
    assert fit.unbounded and not fit.in_range
    assert fit.steps(batches[0]) == pytest.approx(1e6 / batches[0], rel=1e-3)
    out = bootstrap_fit(batches, [[1e6 / b * f for f in (0.98, 1.0, 1.02)] for b in batches], n=50)
    assert out["b_crit"] is None and out["b_crit_unbounded"] and out["b_crit_hi"] is None
    assert out["steps_times_batch"] == pytest.approx(1e6, rel=1e-3)
    assert not fit_steps_vs_batch(batches, [30 * (1 + 8192 / b) for b in batches]).unbounded


def test_fit_refuses_fewer_than_four_batch_sizes():
    with pytest.raises(ValueError, match=">= 4 batch sizes, got 3"):
        fit_steps_vs_batch([1, 2, 4], [8.0, 4.0, 2.0])
    with pytest.raises(ValueError, match="got 3"):  # a batch whose target was never reached does not count
        fit_steps_vs_batch([1, 2, 4, 8], [8.0, 4.0, 2.0, math.inf])


def test_bootstrap_interval_brackets_the_fit_and_is_deterministic():
    batches = [1024 * 2 ** i for i in range(5)]
    truth = [30.0 * (1 + 8192 / b) for b in batches]
    seeds = [[t * 0.95, t, t * 1.05] for t in truth]
    out = bootstrap_fit(batches, seeds, n=200, seed=1)
    assert out["b_crit_lo"] <= out["b_crit"] <= out["b_crit_hi"]
    assert out["b_crit"] == pytest.approx(8192, rel=1e-3) and out["in_range"]
    assert bootstrap_fit(batches, seeds, n=200, seed=1) == out


def _row(lr, steps, final=3.0, method="adamw", batch=1000, seed=0, family="baseline", **kw):
    crossings = {} if steps is None else {"3.5": {"step": math.ceil(steps), "step_interp": steps}}
    return Row(run_id=f"{method}/b{batch}/lr{lr:g}/s{seed}", method=method, family=family, batch_tokens=batch, lr=lr,
               seed=seed, run_dir="x", crossings=crossings, final_eval_loss=final, **kw)


def test_lr_search_extends_at_an_edge_and_stops_inside_or_at_the_budget():
    grid = {0.01: _row(0.01, 9.0), 0.03: _row(0.03, 6.0), 0.1: _row(0.1, 4.5)}
    assert next_lr(grid, 10 ** 0.5, 5, 3.5) == pytest.approx(0.1 * 10 ** 0.5)  # best on the top edge
    low = {0.01: _row(0.01, 4.0), 0.03: _row(0.03, 6.0), 0.1: _row(0.1, None, diverged=True)}
    assert next_lr(low, 3.0, 5, 3.5) == pytest.approx(0.01 / 3)  # best on the bottom edge
    inside = {0.01: _row(0.01, 9.0), 0.03: _row(0.03, 4.0), 0.1: _row(0.1, 5.0)}
    assert next_lr(inside, 3.0, 5, 3.5) is None  # bracketed: done
    full = {lr: _row(lr, 10 - i) for i, lr in enumerate([0.001, 0.003, 0.01, 0.03, 0.1])}
    assert next_lr(full, 3.0, 5, 3.5) is None  # budget spent, although the best is still on the edge


def test_lr_search_ties_go_to_the_lower_final_loss_and_never_to_a_run_that_did_not_move():
    tie = {0.01: _row(0.01, 5.0, final=3.2), 0.03: _row(0.03, 5.0, final=3.1), 0.1: _row(0.1, 7.0)}
    assert next_lr(tie, 3.0, 3, 3.5) is None and selection_key(tie[0.03], 3.5) < selection_key(tie[0.01], 3.5)
    stuck = {0.01: _row(0.01, None, final=3.9, skipped_steps=10), 0.03: _row(0.03, None, final=3.7)}
    assert selection_key(stuck[0.03], 3.5) < selection_key(stuck[0.01], 3.5)
    assert next_lr(stuck, 3.0, 4, 3.5) == pytest.approx(0.09)


def test_every_method_gets_the_same_budget():
    """The budget is the study's, not the method's: a method whose best lr keeps sitting on an edge stops at the
    same number of trials as any other."""
    for ratio in (2.0, 10 ** 0.5):
        results = {0.01: _row(0.01, 9.0), 0.02: _row(0.02, 8.0)}
        while (lr := next_lr(results, ratio, 6, 3.5)) is not None:
            results[lr] = _row(lr, 8.0 - len(results))  # always better at the larger lr: the edge never closes
        assert len(results) == 6


def test_summarize_study_selects_on_the_selection_seed_and_reports_the_other_seeds():
    def row(method, b, lr, seed, steps, final=3.4):
        r = _row(lr, steps, final=final, method=method, batch=b, seed=seed)
        if steps is not None:
            r.crossings["3.5"].update(flops_interp=100.0 * steps, wall_time_interp=2.0 * steps,
                                      tokens_interp=b * steps)
        return r

    batches = [1000, 2000, 4000, 8000]
    rows = []
    for b in batches:
        truth = 10 * (1 + 3000 / b)
        rows += [row("adamw", b, 0.01, 0, truth * 1.5), row("adamw", b, 0.03, 0, truth),  # seed 0 selects 0.03
                 row("adamw", b, 0.1, 0, None, final=6.0)]
        rows += [row("adamw", b, 0.03, s, truth * f) for s, f in ((1, 0.9), (2, 1.0), (3, 1.1))]
        rows += [row("adamw", b, 0.01, 1, 1.0)]  # a reported seed at an unselected lr never counts
    raw = {"name": "s", "target_loss": 3.5, "selection_seed": 0, "seeds": [1, 2, 3], "batch_tokens": batches,
           "lr_budget": 5, "methods": [{"name": "adamw", "lrs": [0.01, 0.03, 0.1]}]}
    out = summarize_study(study_from_dict(raw), rows, bootstrap=50)
    cell = out["cells"]["adamw/1000"]
    assert cell["best_lr"] == 0.03 and cell["trials"] == 3 and not cell["lr_on_edge"] and cell["seeds"] == 3
    t = cell["per_target"]["3.5"]
    assert t["steps_interp"] == pytest.approx(40.0) and t["steps"] == 40 and t["reached"] == 3
    assert t["flops_to_target"] == pytest.approx(4000.0) and t["time_to_target_s"] == pytest.approx(80.0)
    fit = out["fit"]["adamw"]
    assert fit["s_min"] == pytest.approx(10.0, rel=1e-6) and fit["b_crit"] == pytest.approx(3000, rel=1e-6)
    assert fit["b_crit_lo"] <= fit["b_crit"] <= fit["b_crit_hi"]
    # per doubling from 1000: S = 10(1 + 3000/B) gives 40 -> 25, a saving of 3/8
    assert fit["per_doubling"]["1000"] == pytest.approx(1 - 25 / 40) and set(fit["per_doubling"]) == {"1000", "2000",
                                                                                                     "4000"}
    few = summarize_study(study_from_dict({**raw, "batch_tokens": batches[:3]}), rows, bootstrap=10)
    assert "needs >= 4" in few["fit"]["adamw"]["reason"]


def test_early_rise_is_the_restart_spike_above_the_start():
    def row(losses, first=0):
        return _row(0.01, None, curve={"step": list(range(first, first + len(losses))), "eval_loss": losses})

    assert early_rise(row([4.0, 4.1, 4.3, 3.9] + [3.0] * 20)) == pytest.approx(0.3)
    assert early_rise(row([4.0] + [3.0] * 8 + [5.0])) == pytest.approx(1.0)  # step 9: still early
    assert early_rise(row([4.0] + [3.0] * 10 + [5.0])) == pytest.approx(-1.0)  # step 11: not early; it only fell
    assert early_rise(row([4.1, 4.0], first=5)) is None and early_rise(_row(0.01, None)) is None


def test_eta_at_floor_is_the_share_of_steps_at_the_smallest_step_size():
    floor = 2.0 ** -2  # line_search_range 5: η ∈ {1, .707, .5, .354, .25}
    rows = [_row(0.01, None, etas=[floor, floor, 0.5]), _row(0.01, None, etas=[floor, 1.0])]
    assert eta_at_floor(rows, 5) == pytest.approx(3 / 5)
    assert eta_at_floor(rows, 7) == 0.0
    assert eta_at_floor([_row(0.01, None, etas=[0.0])], 5) is None  # η = 0: a skipped step
    assert eta_at_floor([_row(0.01, None)], 5) is None


def test_a_methods_line_search_range_comes_from_the_study():
    """The study holds each method's settings: base, the method's built-in keys and its overrides."""
    study = study_from_dict({"target_loss": 3.5, "batch_tokens": [512], "base": {"gn": {"line_search_range": 7}},
                             "methods": [{"name": "gn", "lrs": [0.01]},
                                         {"name": "g2", "type": "gn", "lrs": [0.01],
                                          "overrides": {"gn.line_search_range": 3}}]})
    assert [study.method_run_config(m).gn.line_search_range for m in ("gn", "g2")] == [7, 3]


def test_a_budget_study_selects_the_lowest_final_loss():
    rows = [_row(lr, None, final=f) for lr, f in ((0.01, 3.4), (0.03, 3.2), (0.1, 3.3))]
    assert min(rows, key=lambda r: selection_key(r, None)).lr == 0.03
    raw = {"kind": "budget", "token_budget": 10_000, "batch_tokens": [1000], "selection_seed": 0, "seeds": [1],
           "methods": [{"name": "adamw", "lrs": [0.01, 0.03, 0.1]}]}
    rows += [_row(0.03, None, final=3.25, seed=1, best_eval_loss=3.2)]
    out = summarize_study(study_from_dict(raw), rows, bootstrap=0)
    cell = out["cells"]["adamw/1000"]
    assert cell["best_lr"] == 0.03 and cell["final_eval_loss"] == 3.25 and cell["best_eval_loss"] == 3.2
    assert out["kind"] == "budget" and out["fit"] == {}


def test_doubling_reduction_interpolates_on_log2_batch_when_batches_are_not_doublings():
    # S(2) is interpolated geometrically between S(1)=1000 and S(4)=250: 500 -> 50% saving at B=1.
    assert doubling_reduction([1, 4, 16], [1000, 250, 200], 0) == pytest.approx(0.5)
    # at B=4: S(8) between S(4)=250 and S(16)=200 is 250*(0.8)**0.5 = 223.6 -> saving 10.56%
    assert doubling_reduction([1, 4, 16], [1000, 250, 200], 1) == pytest.approx(1 - math.sqrt(0.8))
    # the last span shorter than a doubling is scaled to one: 3 -> 4 with steps 100 -> 90
    assert doubling_reduction([3, 4], [100, 90], 0) == pytest.approx(1 - 0.9 ** (1 / math.log2(4 / 3)))
    assert doubling_reduction([1, 2, 4], [math.inf, 10, 10], 0) == 1.0  # reached only at the larger batch
    assert doubling_reduction([1, 2, 4], [100, 50, math.inf], 1) == -math.inf  # reached, then lost
