"""`gnlm report`: the Markdown report, summary.json and figures from a synthetic results directory (no training)."""

import json
from pathlib import Path

import pytest
import yaml

from gnlm.config import ConfigError
from gnlm.report import write_report
from gnlm.results import Row
from gnlm.study import study_from_dict

METHODS = ["adamw", "muon", "soap", "gn", "gn_prox_linear", "gn_layerwise"]
# steps to target at the selected lr, per batch: baselines flatten, GN keeps improving
STEPS = {"adamw": [80, 60, 55, 52], "muon": [60, 40, 36, 34], "soap": [50, 32, 29, 28],
         "gn": [20, 10, 5, 2.5], "gn_prox_linear": [21, 11, 6, 3], "gn_layerwise": [30, 15, 8, 4]}
BATCHES = [1024, 2048, 4096, 8192]
LRS = [1e-3, 3e-3, 1e-2]


def _row(m, b, lr, seed, steps, kind):
    family = "gn" if m.startswith("gn") else "baseline"
    n = 100 if steps is None else int(steps) + 1
    losses = [4.0 - 1.2 * s / (n - 1) if steps is None else 4.0 - s / steps for s in range(n)]
    curve = {"step": list(range(n)), "eval_loss": losses, "tokens": [s * b for s in range(n)],
             "flops": [s * 1e9 for s in range(n)], "wall_time": [0.5 * s for s in range(n)]}
    crossing = None if steps is None else {"step": int(steps), "step_interp": float(steps), "flops_interp": steps * 1e9,
                                           "wall_time_interp": 0.5 * steps, "tokens_interp": steps * b}
    return Row(run_id=f"{m}/b{b}/lr{lr:g}/s{seed}", method=m, family=family, batch_tokens=b, lr=lr, seed=seed,
               run_dir=f"runs/{m}/b{b}/lr{lr:g}/s{seed}", reached=steps is not None, steps=None if steps is None
               else int(steps), final_eval_loss={3e-3: 2.9, 1e-3: 3.0}.get(lr, 3.2 if kind == "steps_to_target" else 3.1),
               steps_run=n - 1, curve=curve, crossings={} if kind == "budget" else {"3": crossing},
               inner_steps=8 if family == "gn" else None, etas=[1.0] * (n - 1) if family == "gn" else None)


def _write_results(root, kind="steps_to_target", methods=METHODS, **study_keys):
    """A finished study: lrs selected on seed 0 (3e-3 is best), reported seed 1 at the selected lr."""
    study = {"name": "synthetic", "kind": kind, "batch_tokens": BATCHES, "selection_seed": 0, "seeds": [1],
             "max_steps": 100, "methods": [{"name": m, "lrs": LRS} for m in methods], "base": {}, **study_keys}
    study.update({"token_budget": 16384} if kind == "budget" else {} if "targets" in study_keys else
                 {"target_loss": 3.0})
    root.mkdir(parents=True)
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    rows = []
    for m in methods:
        for i, b in enumerate(BATCHES):
            for lr in LRS:
                steps = STEPS[m][i] if lr == 3e-3 else (STEPS[m][i] + 7 if lr == 1e-3 else None)
                rows.append(_row(m, b, lr, 0, steps, kind))
            rows.append(_row(m, b, 3e-3, 1, STEPS[m][i], kind))
    (root / "runs.jsonl").write_text("".join(r.to_json() + "\n" for r in rows))
    return rows


def test_report_renders_the_declared_target_tables_the_fit_and_the_headline(tmp_path):
    root = tmp_path / "res"
    _write_results(root)
    text = write_report(root, bootstrap=100).read_text()
    for fig in ("curves_largest_batch.png", "steps_vs_batch_fit.png"):
        assert (root / fig).stat().st_size > 1000 and f"({fig})" in text
    assert "| gn | 20.0 (20) | 10.0 (10) | 5.0 (5) | 2.5 (2) |" in text  # interpolated (integer step)
    assert "| soap | 50.0 (50) | 32.0 (32) | 29.0 (29) | 28.0 (28) |" in text
    # the headline at 8K: best baseline soap 28 / gn 2.5 = 11.2x; layerwise 4 / 2.5 = 1.6x
    assert "| 8K | 2.5 | soap | 28.0 | 11.20× |" in text and "| 1.60× |" in text
    assert "0.003 (3; N 8; skipped 0; η floor 0%)" in text  # the selected lr, its trials, GN's N, η at its floor
    summary = json.loads((root / "summary.json").read_text())
    assert summary["cells"]["gn/8192"]["per_target"]["3"]["steps_interp"] == 2.5
    assert summary["fit"]["adamw"]["b_crit"] > 0 and summary["fit"]["gn"]["b_crit_unbounded"]
    # both critical batches, with the reference batch stated; GN's is unbounded for both
    fit = summary["fit"]["adamw"]
    assert fit["cbs"] == pytest.approx(0.2 * fit["b_crit"] + 1.2 * 1024) and fit["cbs_reference_batch"] == 1024
    assert f"| adamw | 1,024 | {fit['cbs']:,.0f} |" in text and "| gn | 1,024 | unbounded |" in text
    # GN's inner steps to the target (2.5 outer steps x N = 8) beside its outer steps
    assert "| gn | 8K | 2.5 | 20 |" in text and "| adamw | 8K | 52.0 | — |" in text
    # every run costs 1e9 FLOPs per step: GN, with fewer steps, is cheaper already at the smallest batch
    assert summary["crossover"]["gn"]["flops"]["bound"] == "at_or_below"
    assert "| gn | FLOPs | ≤ 1,024 | ≤ 1,024 | 2.50× (soap) |" in text  # soap: the fewest FLOPs at 1K
    assert "standard error of its mean loss over sequences: not recorded" in text
    assert "64 sequences, 8,192 tokens (as declared in the study)" in text


def test_report_shows_where_a_method_missed_the_target_within_its_own_budget(tmp_path):
    root = tmp_path / "res"
    rows = _write_results(root)
    for r in rows:  # no baseline reaches the target at 8K
        if r.family == "baseline" and r.batch_tokens == 8192:
            r.reached, r.steps, r.crossings = False, None, {"3": None}
            r.final_eval_loss = 3.0 if r.lr == 3e-3 else 3.1  # selected: the lowest final loss
    (root / "runs.jsonl").write_text("".join(r.to_json() + "\n" for r in rows))
    text = write_report(root, bootstrap=20).read_text()
    assert "| adamw | 80.0 (80) | 60.0 (60) | 55.0 (55) | not reached in 100 (0/1) |" in text
    assert "| 8K | 2.5 | none reached |" in text


def test_an_ablation_study_compares_every_method_with_its_reference(tmp_path):
    """``reference: gn``: each method's steps over GN's per batch, with the interval over seeds; a method that did
    not reach the target says so."""
    root = tmp_path / "res"
    rows = _write_results(root, methods=["gn", "gn_prox_linear", "gn_layerwise"], reference="gn")
    for r in rows:  # layerwise never reaches the target at 8K
        if r.method == "gn_layerwise" and r.batch_tokens == 8192:
            r.reached, r.steps, r.crossings = False, None, {"3": None}
    (root / "runs.jsonl").write_text("".join(r.to_json() + "\n" for r in rows))
    text = write_report(root, bootstrap=20).read_text()
    summary = json.loads((root / "summary.json").read_text())
    assert summary["reference"] == "gn" and set(summary["against_reference"]) == {"gn_prox_linear", "gn_layerwise"}
    e = summary["against_reference"]["gn_prox_linear"]["4096"]["3"]
    assert (e["steps"], e["reference_steps"], e["ratio"], e["reached"]) == (6.0, 5.0, 1.2, 1)
    assert e["interval"] == [pytest.approx(1.2), pytest.approx(1.2)]  # one seed: a degenerate interval
    assert "### Against the reference `gn`" in text
    assert "| gn_prox_linear | — | 4K | 6.0 / 5.0 = 1.20× [1.20, 1.20] |" in text
    assert "| gn_layerwise | — | 8K | not reached (0/1) |" in text


def test_an_ablation_reports_its_declared_published_findings_and_their_verdicts(tmp_path):
    """Claims declared with the methods: prox-linear 'almost overlaps GN' (same) measured 1.20x at 4K with the default
    ±10% tolerance disagrees; layerwise 'needs more steps' agrees where it never reached the target."""
    root = tmp_path / "res"
    rows = _write_results(root, methods=["gn", "gn_prox_linear", "gn_layerwise"], reference="gn")
    for r in rows:
        if r.method == "gn_layerwise" and r.batch_tokens == 8192:
            r.reached, r.steps, r.crossings = False, None, {"3": None}
    (root / "runs.jsonl").write_text("".join(r.to_json() + "\n" for r in rows))
    study = yaml.safe_load((root / "study.yaml").read_text())
    study["methods"][1].update(claim="almost overlaps GN (§5.4)", expect="same")
    study["methods"][2].update(claim="78 vs 54 steps", expect="more_steps")
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    text = write_report(root, bootstrap=20).read_text()
    per = json.loads((root / "summary.json").read_text())["against_reference"]
    assert per["gn_prox_linear"]["4096"]["3"]["verdict"] == "disagrees"   # 1.20 > 1.1
    assert per["gn_layerwise"]["8192"]["3"]["verdict"] == "agrees"        # not reached where gn did
    assert per["gn_layerwise"]["1024"]["3"]["verdict"] == "agrees"        # 30 / 20 = 1.5
    assert "| published finding | verdict |" in text
    assert "| gn_prox_linear | — | 4K | 6.0 / 5.0 = 1.20× [1.20, 1.20] | almost overlaps GN (§5.4) (expects same) " \
           "| disagrees |" in text
    with pytest.raises(ConfigError, match="declare claim .* and expect .* together"):
        study_from_dict({"methods": [{"name": "gn", "lrs": [0.01]}, {"name": "gn_layerwise", "lrs": [0.01],
                         "expect": "more_steps"}], "batch_tokens": [512], "target_loss": 3.0, "reference": "gn"})
    with pytest.raises(ConfigError, match="a claim compares a method with the study's reference"):
        study_from_dict({"methods": [{"name": "gn", "lrs": [0.01]}, {"name": "gn_layerwise", "lrs": [0.01],
                         "claim": "x", "expect": "same"}], "batch_tokens": [512], "target_loss": 3.0})


def test_a_reference_that_is_not_a_method_is_refused_on_one_line(tmp_path):
    with pytest.raises(ConfigError, match="reference: 'gm' is not a") as err:
        study_from_dict({"methods": [{"name": "gn", "lrs": [0.01]}], "batch_tokens": [512], "target_loss": 3.0,
                         "reference": "gm"})
    assert "\n" not in str(err.value)


def test_report_with_a_restart_level_and_a_recorded_eval_noise(tmp_path):
    """Steps counted from the restart level beside the headline ratio; the eval set's measured standard error next
    to the targets' spacing. The rows carry no restart crossing: it is read off their curves."""
    root = tmp_path / "res"
    _write_results(root, restart_level=3.5)
    (root / "warm_start").mkdir()
    (root / "warm_start" / "summary.json").write_text(json.dumps(
        {"tokens": 4096, "step": 4, "final_eval_loss": 4.0, "final_eval_loss_se": 0.0123, "eval_sequences": 32,
         "eval_tokens": 2048}))
    text = write_report(root, bootstrap=10).read_text()
    # every run crosses 3.5 halfway to its target (loss 4 − step/steps), so from there the ratio is the same
    assert "| steps ratio | steps ratio from 3.5 | FLOPs ratio |" in text
    assert "| 8K | 2.5 | soap | 28.0 | 11.20× | 11.20× |" in text
    assert "32 sequences, 2,048 tokens (recorded); standard error of its mean loss over sequences: 0.0123 (warm " \
           "start)" in text
    summary = json.loads((root / "summary.json").read_text())
    assert summary["cells"]["soap/8192"]["per_target"]["3"]["steps_from_restart"] == pytest.approx(14.0)
    assert summary["eval_set"] == {"sequences": 32, "tokens": 2048, "size_from": "recorded", "loss_se": 0.0123,
                                   "loss_se_from": "warm start"}


def test_report_of_a_study_without_baselines_has_no_comparison_sections(tmp_path):
    root = tmp_path / "res"
    _write_results(root, methods=["gn", "gn_layerwise"], targets=[3.5, 3.2, 3.0], primary_target=3.0)
    text = write_report(root, bootstrap=10).read_text()
    assert "### Fitted critical batch" in text and "| gn | 1,024 | unbounded |" in text
    assert "becomes cheaper" not in text and "Steps per segment" not in text
    assert "vs the best baseline" not in text and "by target depth" not in text
    summary = json.loads((root / "summary.json").read_text())
    assert summary["crossover"] == {} and summary["segments"] == {} and summary["restart_level"] is None
    one = tmp_path / "one"  # an ablation study at one batch size: no fit either, the reference table instead
    rows = _write_results(one, methods=["gn", "gn_layerwise"], batch_tokens=[4096], reference="gn")
    (one / "runs.jsonl").write_text("".join(r.to_json() + "\n" for r in rows if r.batch_tokens == 4096))
    text = write_report(one, bootstrap=10).read_text()
    assert "### Fitted critical batch" not in text and "One batch size (4K): no fit" in text
    assert not (one / "steps_vs_batch_fit.png").exists() and "### Against the reference `gn`" in text


def test_budget_report_has_the_final_loss_plot_and_table(tmp_path):
    root = tmp_path / "res"
    _write_results(root, kind="budget")
    text = write_report(root).read_text()
    assert (root / "final_loss_vs_batch.png").exists()
    assert "## Final validation loss vs batch size" in text
    assert "| gn | 2.9000 [2.9000, 2.9000] (—; lr 0.003) |" in text
    assert json.loads((root / "summary.json").read_text())["cells"]["gn/1024"]["final_eval_loss_range"] == [2.9, 2.9]
    assert json.loads((root / "summary.json").read_text())["kind"] == "budget"
    # every run trained to the budget's end: the table shows what it ran, not a target it never had
    assert "| run | steps | tokens | time (s) | final eval loss | best eval loss |" in text
    assert f"| gn/b{BATCHES[0]}/lr0.003/s0 | {STEPS['gn'][0]} |" in text


def test_report_of_a_directory_without_a_study_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a gnlm results directory"):
        write_report(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_headline_puts_steps_flops_and_time_ratios_side_by_side():
    from gnlm.report import _headline_lines

    def cell(steps, flops, time, seeds=3):
        return {"seeds": seeds, "per_target": {"3.5": {"steps_interp": steps, "flops_to_target": flops,
                                                       "time_to_target_s": time}}}

    summary = {"primary_target": 3.5, "batch_tokens": [1024, 2048], "cells": {
        "gn/1024": cell(10.0, 1e12, 100.0), "adamw/1024": cell(50.0, 5e11, 50.0), "muon/1024": cell(40.0, 8e11, 60.0),
        "gn_layerwise/1024": cell(12.5, 2e12, 300.0), "adamw/2048": cell(30.0, 6e11, 40.0),
        "gn/2048": cell(None, None, None)}}
    families = {"gn": "gn", "gn_layerwise": "gn", "adamw": "baseline", "muon": "baseline"}
    lines = _headline_lines(summary, families, "gn")
    row = next(line for line in lines if line.startswith("| 1K |"))
    # muon has the fewest steps: 40/10 = 4× fewer steps for GN, but 0.8× the FLOPs and 0.6× the time
    assert row == "| 1K | 10.0 | muon | 40.0 | 4.00× | 0.80× | 0.60× | 1.25× |"
    assert next(line for line in lines if line.startswith("| 2K |")).startswith("| 2K | not reached | adamw | 30.0 | —")


STUDIES = Path(__file__).resolve().parents[1] / "studies"
# each is its packaged preset's name
PUBLISHED_STUDIES = ["shakespeare-nano", "shakespeare-nano-v2", "shakespeare-nano-budget", "shakespeare-nano-ablations"]


def _changed(committed, now, path="") -> list[str]:
    """The keys of ``committed`` (nested) that ``now`` lacks or gives another value; keys only in ``now`` are new."""
    if not isinstance(committed, dict) or not isinstance(now, dict):
        return [] if committed == now else [path]
    return [p for k, v in committed.items() for p in (_changed(v, now[k], f"{path}/{k}") if k in now else [f"{path}/{k}"])]


@pytest.mark.parametrize("name", PUBLISHED_STUDIES)
def test_the_published_study_is_the_preset_and_recomputes_its_cells_from_its_rows(name):
    """A published study (shakespeare-nano was written by an earlier gnlm: old key names, schema-1 rows) is still the
    same study as its packaged preset, and its rows alone give every value of the committed summary's cells."""
    from gnlm.analysis import summarize_study
    from gnlm.plan import most_runs
    from gnlm.results import read_rows
    from gnlm.study import load_study, study_differences

    published = STUDIES / name
    study = load_study(name)
    assert study_differences(yaml.safe_load((published / "study.yaml").read_text()), study) == []
    committed = json.loads((published / "summary.json").read_text())
    rows = read_rows(published)
    cells = json.loads(json.dumps(summarize_study(study, rows, bootstrap=0)["cells"]))
    assert _changed(committed["cells"], cells) == []
    assert len(rows) <= most_runs(study)  # the bound gnlm bench states before the search has planned every run


@pytest.mark.slow
@pytest.mark.parametrize("name", PUBLISHED_STUDIES)
def test_the_published_report_regenerates_identically(tmp_path, name):
    """gnlm report on a copy of a published study keeps every value of the committed summary.json (new keys may
    come) and writes the committed report.md byte for byte."""
    import shutil

    published, copy = STUDIES / name, tmp_path / "copy"
    shutil.copytree(published, copy, ignore=shutil.ignore_patterns("*.pt", "runs", "locks"))
    write_report(copy)
    assert _changed(json.loads((published / "summary.json").read_text()),
                    json.loads((copy / "summary.json").read_text())) == []
    assert (copy / "report.md").read_text() == (published / "report.md").read_text()
