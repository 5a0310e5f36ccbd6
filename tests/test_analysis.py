"""Pure analysis on synthetic data: interpolated target crossings, the statistics of ``stats.py`` (the S(B) fit, both
critical batches and their intervals, the compute crossover, verdicts) and the summary of ``analysis.py``
(per-segment and restart-level ratios, a study in progress)."""

from __future__ import annotations

import math

import pytest

from gnlm.analysis import early_rise, eta_at_floor, restart_step, summarize_study
from gnlm.results import Row, target_crossing
from gnlm.selection import next_lr, selection_key
from gnlm.stats import (
    bootstrap_fit,
    compute_crossover,
    crossover_batch,
    doubling_reduction,
    fit_steps_vs_batch,
    rank_correlation,
    verdict,
    zhang_cbs,
)
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
    # unbounded for both definitions, and for every interval's upper end
    assert out["cbs"] is None and out["cbs_unbounded"] and out["cbs_hi"] is None and out["cbs_residual_hi"] is None
    assert out["cbs_jackknife_max"] is None and out["cbs_reference_batch"] == batches[0]
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


@pytest.mark.parametrize("noise", [(1.0,) * 6, (1.02, 0.98, 1.01, 0.99, 1.02, 0.985)])
def test_both_critical_batch_definitions_are_recovered_from_synthetic_curves(noise):
    """S(B) = a + b/B: McCandlish's B_crit = b/a; Zhang et al.'s CBS solves S(B) = 1.2·S(B_ref)·B_ref/B, which is
    their notebook's b − 5a·CBS + 5a·1.2·B_ref = 0."""
    a, b = 20.0, 20.0 * 30_000
    batches = [4096 * 2 ** i for i in range(6)]
    truth = [a + b / x for x in batches]
    out = bootstrap_fit(batches, [[t * e * f for f in (0.97, 1.0, 1.03)] for t, e in zip(truth, noise)], n=100)
    cbs = 0.2 * b / a + 1.2 * batches[0]
    assert out["cbs_reference_batch"] == batches[0] and out["cbs"] == pytest.approx(zhang_cbs(out["b_crit"], 4096))
    rel = 1e-6 if set(noise) == {1.0} else 0.05
    assert out["b_crit"] == pytest.approx(b / a, rel=rel) and out["cbs"] == pytest.approx(cbs, rel=rel)
    assert b - 5 * a * cbs + 5 * a * 1.2 * batches[0] == pytest.approx(0.0, abs=1e-6 * b)
    s_ref = a + b / batches[0]
    assert a + b / cbs == pytest.approx(1.2 * s_ref * batches[0] / cbs)  # 20% above perfect scaling from B_ref
    # the seed interval maps through the same B_ref, so the two definitions keep their order inside it
    assert out["cbs_lo"] == pytest.approx(zhang_cbs(out["b_crit_lo"], 4096)) and out["cbs_lo"] <= out["cbs"]
    assert out["cbs"] <= out["cbs_hi"] and out["cbs_in_range"]


def test_residual_bootstrap_and_jackknife_intervals_bracket_the_truth():
    batches = [2048 * 2 ** i for i in range(6)]
    s_min, b_crit = 10.0, 20_000.0
    noise = [1.04, 0.96, 1.03, 0.97, 1.04, 0.96]  # scatter across batch sizes that the seeds do not see
    steps = [[s_min * (1 + b_crit / x) * e] * 3 for x, e in zip(batches, noise)]
    out = bootstrap_fit(batches, steps, n=300)
    assert out["b_crit_lo"] == out["b_crit_hi"] == out["b_crit"]  # identical seeds: no spread over seeds at all
    assert out["b_crit_residual_lo"] < b_crit < out["b_crit_residual_hi"] and out["residual_resamples"] == 300
    assert out["b_crit_jackknife_min"] < b_crit < out["b_crit_jackknife_max"]
    cbs = zhang_cbs(b_crit, batches[0])
    assert out["cbs_residual_lo"] < cbs < out["cbs_residual_hi"] and out["cbs_jackknife_min"] < cbs
    assert set(out["jackknife"]) == {str(x) for x in batches}
    assert out["b_crit_jackknife_max"] == max(j["b_crit"] for j in out["jackknife"].values())
    assert out["cbs_jackknife_max"] == pytest.approx(zhang_cbs(out["b_crit_jackknife_max"], batches[0]))
    # on exact points every refit is the truth: a zero-width interval
    exact = bootstrap_fit(batches[:4], [[s_min * (1 + b_crit / x)] * 3 for x in batches[:4]], n=50)
    for k in ("b_crit_residual_lo", "b_crit_residual_hi", "b_crit_jackknife_min", "b_crit_jackknife_max"):
        assert exact[k] == pytest.approx(b_crit, rel=1e-4)


def test_crossover_interpolates_geometrically_and_states_its_bound():
    batches = [1000, 2000, 4000, 8000]
    # baseline / GN = B / 3000: log ratio linear in log B, crossing 0 at exactly 3000
    assert crossover_batch(batches, [b / 3000 for b in batches]) == (pytest.approx(3000), "exact")
    assert crossover_batch(batches, [None, 1.5, 2.0, 3.0]) == (2000, "at_or_below")  # cheaper where first compared
    assert crossover_batch(batches, [0.2, 0.4, 0.6, None]) == (4000, "above")
    assert crossover_batch(batches, [None] * 4) == (None, "none")
    # exactly equal at 2000 is not yet cheaper; the crossing lies between 2000 and 4000
    batch, bound = crossover_batch(batches, [0.5, 1.0, 2.0, 4.0])
    assert bound == "exact" and batch == pytest.approx(2000)


@pytest.mark.parametrize("spread", [(1.0, 1.0, 1.0), (0.9, 1.0, 1.1)])
def test_compute_crossover_against_the_cheapest_baseline_with_an_interval_over_seeds(spread):
    batches = [1000, 2000, 4000, 8000]
    gn_cost = [3000.0 * 4] * 4  # GN costs the same at every batch; baselines get dearer with batch
    cheap = [[b * 4 * f for f in spread] for b in batches]  # baseline / GN = B / 3000: crosses at 3000
    dear = [[c * 2 for c in seeds] for seeds in cheap]
    out = compute_crossover(batches, [[g * f for f in spread] for g in gn_cost], {"dear": dear, "cheap": cheap}, n=200)
    assert out["bound"] == "exact" and out["batch"] == pytest.approx(3000)
    assert out["per_batch"]["1000"] == {"baseline": "cheap", "baseline_over_gn": pytest.approx(1 / 3)}
    assert out["lo"] <= out["batch"] <= out["hi"] and out["resamples"] == 200
    assert (out["lo"] == out["hi"]) == (spread == (1.0, 1.0, 1.0))
    never = compute_crossover(batches, [[1e9] * 3] * 4, {"cheap": cheap}, n=20)
    assert never["bound"] == "above" and never["batch"] == 8000 and never["hi_bound"] == "above"
    unreached = compute_crossover(batches, [[math.inf] * 3] * 4, {"cheap": cheap}, n=20)
    assert unreached["bound"] == "none" and unreached["per_batch"] == {} and unreached["resamples"] == 0


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
    assert t["time_to_target_range"] == pytest.approx([72.0, 88.0])  # the seeds' 0.9, 1.0, 1.1 of 80 s
    from gnlm.report import _time_range
    assert _time_range(t["time_to_target_range"]) == " [72.0, 88.0]" and _time_range([5.0, 5.0]) == ""
    assert _time_range(None) == ""  # a summary written before the range existed
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


def _study_rows(steps: dict[str, list[list[float]]], batches, targets, restart=None, seeds=(1, 2, 3),
                flops_per_step=None, inner_steps=4):
    """Rows of a finished study at one lr per method: ``steps[method][i]`` are the steps to each target at
    ``batches[i]`` (seed 1; seeds 2 and 3 scale them by 0.9 and 1.1), and ``restart`` the steps to the restart
    level; GN methods start with "gn"."""
    rows = []
    for m, per_batch in steps.items():
        family = "gn" if m.startswith("gn") else "baseline"
        for b, to_targets in zip(batches, per_batch):
            for seed, f in zip((0, *seeds), (1.0, 1.0, 0.9, 1.1)):
                levels = [*targets, *([] if restart is None else [restart[0]])]
                values = [*to_targets, *([] if restart is None else [restart[1][m]])]
                crossings = {f"{t:g}": {"step": math.ceil(s * f), "step_interp": s * f,
                                        "flops_interp": s * f * (flops_per_step or {}).get(m, 1.0) * b,
                                        "wall_time_interp": s * f, "tokens_interp": s * f * b}
                             for t, s in zip(levels, values)}
                rows.append(Row(run_id=f"{m}/b{b}/lr0.01/s{seed}", method=m, family=family, batch_tokens=b, lr=0.01,
                                seed=seed, run_dir="x", crossings=crossings, final_eval_loss=3.0,
                                inner_steps=inner_steps if family == "gn" else None))
    return rows


def _study(methods, batches, targets, **kw):
    return study_from_dict({"name": "s", "targets": targets, "primary_target": targets[-1], "selection_seed": 0,
                            "seeds": [1, 2, 3], "batch_tokens": batches,
                            "methods": [{"name": m, "lrs": [0.01]} for m in methods], **kw})


def test_segments_restart_ratios_and_inner_steps_from_synthetic_rows():
    targets, batches = [3.6, 3.5, 3.4], [1000, 2000]
    steps = {"adamw": [[40, 50, 70], [30, 36, 44]], "muon": [[30, 45, 60], [20, 30, 40]],
             "gn": [[10, 15, 20], [5, 8, 10]]}
    restart = (3.9, {"adamw": 6.0, "muon": 5.0, "gn": 1.0})  # the baselines pay a restart spike, GN does not
    study = _study(list(steps), batches, targets, restart_level=3.9)
    out = summarize_study(study, _study_rows(steps, batches, targets, restart), bootstrap=20)
    # at 2000 muon has the fewest steps to the primary target: segments 20, 10, 10 against GN's 5, 3, 2
    seg = out["segments"]["gn"]["2000"]
    assert seg["baseline"] == "muon" and [s["from"] for s in seg["segments"]] == [None, 3.6, 3.5]
    assert [s["baseline_steps"] for s in seg["segments"]] == pytest.approx([20, 10, 10])
    assert [s["ratio"] for s in seg["segments"]] == pytest.approx([4.0, 10 / 3, 5.0])
    # medians over seeds of steps from the restart level: muon 40 - 5 = 35 at 2000, GN 10 - 1 = 9
    muon, gn = out["cells"]["muon/2000"], out["cells"]["gn/2000"]
    assert muon["restart_steps"] == 5.0 and muon["per_target"]["3.4"]["steps_from_restart"] == pytest.approx(35.0)
    assert gn["per_target"]["3.4"]["steps_from_restart"] == pytest.approx(9.0) and out["restart_level"] == 3.9
    assert gn["per_target"]["3.4"]["inner_steps_to_target"] == pytest.approx(40.0)  # 10 outer steps x N = 4
    assert "inner_steps_to_target" not in muon["per_target"]["3.4"]


def test_restart_step_reads_the_curve_of_a_row_recorded_without_the_level():
    row = _row(0.01, 8.0, curve={"step": [0, 1, 2, 3], "eval_loss": [3.95, 4.2, 3.95, 3.85]})
    assert restart_step(row, 3.9) == pytest.approx(2.5)  # after the spike: between steps 2 (3.95) and 3 (3.85)
    row.crossings["3.9"] = {"step": 3, "step_interp": 2.7}
    assert restart_step(row, 3.9) == pytest.approx(2.7)  # a recorded crossing wins
    assert restart_step(_row(0.01, None, diverged=True), 3.9) == math.inf


def test_summary_crossover_uses_the_cheapest_baseline_and_a_study_without_baselines_or_restart_level_is_clean():
    targets, batches = [3.6, 3.5, 3.4], [1000, 2000, 4000, 8000]
    # steps to the primary target: baselines 30 at every batch, GN 10; GN's steps cost 6x a baseline step
    steps = {"adamw": [[10, 20, 30]] * 4, "gn": [[4, 7, 10]] * 4}
    # per-step FLOPs: baseline B, GN 6B at 1000 ... falling to 1.5B at 8000, so baseline / GN = 0.5, 1, 2, ...
    flops = {"adamw": 1.0, "gn": 6.0}
    rows = _study_rows(steps, batches, targets, flops_per_step=flops)
    for r in rows:  # GN's FLOPs per outer step fall with batch (a fixed N spread over more data)
        if r.family == "gn":
            for c in r.crossings.values():
                c["flops_interp"] *= {1000: 1.0, 2000: 0.5, 4000: 0.25, 8000: 0.125}[r.batch_tokens]
    out = summarize_study(_study(list(steps), batches, targets), rows, bootstrap=50)
    flops_x = out["crossover"]["gn"]["flops"]
    # baseline / GN = 30B / (10·6B·f) = 0.5, 1, 2, 4: equal at 2000, cheaper beyond: the crossing is 2000
    assert flops_x["bound"] == "exact" and flops_x["batch"] == pytest.approx(2000)
    assert flops_x["per_batch"]["4000"]["baseline_over_gn"] == pytest.approx(2.0)
    assert out["crossover"]["gn"]["time"]["bound"] == "at_or_below"  # 30 s against 10 s at every batch
    assert out["restart_level"] is None and "steps_from_restart" not in out["cells"]["gn/1000"]["per_target"]["3.4"]
    gn_only = summarize_study(_study(["gn"], batches, targets), [r for r in rows if r.family == "gn"], bootstrap=10)
    assert gn_only["crossover"] == {} and gn_only["segments"] == {} and gn_only["fit"]["gn"]["b_crit"] == 0.0


def test_a_study_in_progress_names_no_best_baseline_where_a_baselines_seeds_are_still_to_come():
    from gnlm.report import _crossover_lines, _headline_lines
    targets, batches = [3.6, 3.5, 3.4], [1000, 2000, 4000, 8000]
    steps = {"adamw": [[10, 20, 40]] * 4, "muon": [[10, 15, 30]] * 4, "gn": [[4, 7, 10]] * 4}
    rows = [r for r in _study_rows(steps, batches, targets)  # muon: seeds to come at 2000, not started at 4000
            if not (r.method == "muon" and (r.batch_tokens == 4000 or r.batch_tokens == 2000 and r.seed != 0))]
    out = summarize_study(_study(list(steps), batches, targets), rows, bootstrap=20)
    assert out["pending_baselines"] == {"2000": ["muon"], "4000": ["muon"]}
    # adamw (40 steps) would be named the best baseline at 2000 and 4000; muon (30) still could beat it
    assert out["segments"]["gn"]["2000"]["baseline"] is None and out["segments"]["gn"]["2000"]["pending"] == ["muon"]
    assert out["segments"]["gn"]["1000"]["baseline"] == "muon" and out["segments"]["gn"]["1000"]["pending"] == []
    assert sorted(out["crossover"]["gn"]["time"]["per_batch"]) == ["1000", "8000"]  # 2000, 4000 not compared yet
    text = "\n".join(_headline_lines(out, {"adamw": "baseline", "muon": "baseline", "gn": "gn"}, "gn"))
    assert "| 2,000 | 10.0 | pending (seeds of muon to come) | — | — |" in text
    assert "| 1,000 | 10.0 | muon | 30.0 | 3.00× |" in text
    crossover = "\n".join(_crossover_lines(out))
    assert "| gn | time | ≤ 1,000 | ≤ 1,000 | 3.00× (muon) | pending | pending | 3.00× (muon) |" in crossover
    done = summarize_study(_study(list(steps), batches, targets), _study_rows(steps, batches, targets), bootstrap=20)
    assert done["pending_baselines"] == {} and done["segments"]["gn"]["4000"]["baseline"] == "muon"


@pytest.mark.parametrize("expect, steps, ref, lo, hi, want", [
    ("more_steps", 15, 10, 1.2, 1.8, "agrees"),
    ("more_steps", 9, 10, 0.8, 0.95, "disagrees"),
    ("more_steps", 11, 10, 0.9, 1.3, "not resolved"),
    ("fewer_steps", 9, 10, 0.8, 0.95, "agrees"),
    ("fewer_steps", 15, 10, 1.2, 1.8, "disagrees"),
    ("same", 10.5, 10, 0.95, 1.08, "agrees"),
    ("same", 15, 10, 1.2, 1.8, "disagrees"),
    ("same", 10.5, 10, 0.95, 1.3, "not resolved"),
    ("more_steps", math.inf, 10, None, None, "agrees"),       # never reached where the reference did
    ("same", math.inf, 10, None, None, "disagrees"),
    ("fewer_steps", 10, math.inf, None, None, "agrees"),
    ("same", math.inf, math.inf, None, None, "not resolved"),
    ("same", 10, 10, None, None, "not resolved"),             # no interval
])
def test_a_published_claim_is_judged_by_the_whole_interval(expect, steps, ref, lo, hi, want):
    assert verdict(expect, steps, ref, lo, hi, same_within=0.1) == want


def test_rank_correlation_is_spearmans_with_a_bootstrap_interval_over_pairs():
    from scipy.stats import spearmanr
    x, y = [0.1, 0.4, 0.2, 0.9, 0.5, 0.7], [90.0, 40.0, 70.0, 10.0, 45.0, 12.0]
    out = rank_correlation(x, y, n=200)
    assert out["spearman"] == pytest.approx(spearmanr(x, y).statistic) and out["n"] == 6
    assert out["spearman"] < -0.9 and out["interval"][0] <= out["spearman"] <= out["interval"][1] <= -0.5
    assert rank_correlation([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["spearman"] == pytest.approx(1.0)
    assert rank_correlation([1.0, 2.0], [2.0, 1.0])["spearman"] is None          # too few pairs
    assert rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["spearman"] is None  # a constant side
    with pytest.raises(ValueError):
        rank_correlation([1.0], [1.0, 2.0])
