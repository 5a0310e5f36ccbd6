"""`gnlm report`: the Markdown report and figures from a synthetic results directory (no training)."""

import json

import pytest
import yaml

from gnlm.config import ConfigError
from gnlm.report import ratio, write_report

METHODS = ["adamw", "muon", "soap", "gn", "gn_prox_linear", "gn_layerwise"]
# steps to target at the best lr, per batch: baselines flatten, GN keeps improving
STEPS = {"adamw": [80, 60, 55], "muon": [60, 40, 36], "soap": [50, 32, 29],
         "gn": [20, 10, 5], "gn_prox_linear": [21, 11, 6], "gn_layerwise": [30, 15, 8]}
BATCHES = [1024, 2048, 4096]
LRS = [1e-3, 3e-3, 1e-2]


def _write_results(root, kind="steps_to_target"):
    study = {"name": "synthetic", "kind": kind, "batch_tokens": BATCHES, "seeds": [0], "target_loss": 3.0,
             "max_steps": 100, "token_budget": 8192 if kind == "budget" else None, "critical_fraction": 0.2,
             "methods": [{"name": m, "lrs": LRS} for m in METHODS], "base": {}}
    root.mkdir(parents=True)
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    rows = []
    for m in METHODS:
        family = "gn" if m.startswith("gn") else "baseline"
        for i, b in enumerate(BATCHES):
            for lr in LRS:
                best = lr == 3e-3
                steps = STEPS[m][i] if best else (STEPS[m][i] + 7 if lr == 1e-3 else None)
                ls = 256 if family == "gn" else 0
                run_dir = f"runs/{m}/b{b}/lr{lr:g}/s0"
                reached = steps is not None
                rows.append({
                    "run_id": f"{m}/b{b}/lr{lr:g}/s0", "method": m, "family": family, "batch_tokens": b, "lr": lr,
                    "seed": 0, "status": "finished", "reached": reached, "steps": steps,
                    "tokens": steps * (b + ls) if reached else None,
                    "line_search_tokens": steps * ls if reached else None,
                    "forward_equivalents": 3.0 * steps * b if reached else None,
                    "wall_time": 0.5 * steps if reached else None,
                    "final_eval_loss": 2.9 if reached else (3.2 if kind == "steps_to_target" else 3.1),
                    "diverged": False, "steps_run": steps or 100, "tokens_run": (steps or 100) * b,
                    "total_wall_time": 1.0, "error": None, "run_dir": run_dir})
                d = root / run_dir
                d.mkdir(parents=True)
                n = steps or 100
                curve = [{"step": s, "tokens": s * b, "eval_loss": 4.0 - s / n} for s in range(n + 1)]
                (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    (root / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_report_renders_tables_ratios_critical_batch_and_figures(tmp_path):
    root = tmp_path / "res"
    _write_results(root)
    path = write_report(root)
    text = path.read_text()
    for fig in ("steps_vs_batch.png", "curves_largest_batch.png"):
        assert (root / fig).stat().st_size > 1000 and f"({fig})" in text
    # the steps-vs-batch table
    assert "| gn | 20 | 10 | 5 |" in text and "| soap | 50 | 32 | 29 |" in text
    # the per-batch table at 4096: gn best lr 3e-3 (middle of the grid), 5 steps, tokens 5*(4096+256) (LS 1,280)
    assert "| gn | 0.003 | 5 | 21,760 (1,280) | 6.14e+04 | 2.5 | 1/1 | 2.9000 |" in text
    # ratios at the largest batch: best baseline soap 29 / gn 5 = 5.8x; layerwise 8 / 5 = 1.6x
    assert "best baseline (soap) / gn: steps 5.8×" in text
    assert "gn_layerwise / gn: steps 1.6×" in text
    # critical batch: adamw saves 25% then 8.3% -> 2K; gn saves 50% at every doubling -> beyond the grid
    assert "| adamw | 2K | 25% | 8% |" in text
    assert "| gn | > 4K (still improving) | 50% | 50% |" in text
    assert "Every best learning rate lies inside its grid." in text


def test_report_flags_grid_edges_and_bounds_ratios_when_baselines_miss(tmp_path):
    root = tmp_path / "res"
    rows = _write_results(root)
    for r in rows:  # make the largest lr the best for muon at 1024, and no baseline reach at 4096
        if r["method"] == "muon" and r["batch_tokens"] == 1024 and r["lr"] == 1e-2:
            r.update(reached=True, steps=1, tokens=1024, line_search_tokens=0, forward_equivalents=3072.0,
                     wall_time=0.1)
        if r["family"] == "baseline" and r["batch_tokens"] == 4096:
            r.update(reached=False, steps=None, tokens=None, line_search_tokens=None, forward_equivalents=None,
                     wall_time=None)
    (root / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(root).read_text()
    assert "⚠ muon at batch 1,024: best lr 0.01 is the largest value of [0.001, 0.003, 0.01]" in text
    assert "the grid must grow" in text
    assert "no baseline reached the target within 100 steps: best baseline / gn steps > 20.0×" in text
    assert "| adamw | 80 | 60 | > 100 |" in text


def test_budget_report_has_the_final_loss_plot_and_table(tmp_path):
    root = tmp_path / "res"
    _write_results(root, kind="budget")
    text = write_report(root).read_text()
    assert (root / "final_loss_vs_batch.png").exists()
    assert "## Final validation loss vs batch size" in text
    assert "| gn | 2.9000 | 2.9000 | 2.9000 |" in text


def test_report_of_a_directory_without_a_study_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a gnlm results directory"):
        write_report(tmp_path)


def test_ratio_formatting():
    assert ratio(292, 54) == "5.4×"
    assert ratio(100, 20, num_capped=True) == "> 5.0×"
    assert ratio(float("inf"), 20) == "—" and ratio(10, None) == "—"


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
