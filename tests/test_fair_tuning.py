"""benchmarks/fair_tuning.py: two studies side by side, each at its own primary target (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import load_benchmark


@pytest.fixture(scope="module")
def ft():
    return load_benchmark("fair_tuning")


def _study(root: Path, name: str, target: float, steps: dict[str, dict[int, float | None]], kind="steps_to_target"):
    """A results directory with study.yaml and the summary.json cells the table reads."""
    batches = sorted({b for per in steps.values() for b in per})
    root.mkdir(parents=True)
    study = {"name": name, "kind": kind, "batch_tokens": batches, "seeds": [1], "max_steps": 100,
             "methods": [{"name": m, "lrs": [0.01]} for m in steps], "base": {}}
    study.update({"target_loss": target} if kind == "steps_to_target" else {"token_budget": 4096})
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    key = f"{target:g}"
    cells = {f"{m}/{b}": {"per_target": {key: {"steps_interp": s}}, "seeds": 0 if s == "pending" else 1}
             for m, per in steps.items() for b, s in per.items()}
    for c in cells.values():
        if c["seeds"] == 0:
            c["per_target"][key]["steps_interp"] = None
    pending: dict[str, list[str]] = {}
    for m, per in steps.items():
        for b, s in per.items():
            if s == "pending" and m != "gn":
                pending.setdefault(str(b), []).append(m)
    (root / "summary.json").write_text(json.dumps({"name": name, "primary_target": target, "batch_tokens": batches,
                                                   "cells": cells, "pending_baselines": pending}))
    return root


def test_each_study_at_its_own_primary_target(ft, tmp_path):
    v1 = _study(tmp_path / "v1", "v1", 3.49, {"adamw": {2048: 200.0, 4096: 120.0}, "muon": {2048: 150.0, 4096: None},
                                              "gn": {2048: None, 4096: 40.0}})
    v2 = _study(tmp_path / "v2", "v2", 3.349, {"adamw": {4096: 90.0, 8192: 60.0}, "gn": {4096: 45.0, 8192: 20.0}})
    h1, h2 = ft.headline(v1), ft.headline(v2)
    assert h1["batches"][2048] == {"baseline": "muon", "baseline_steps": 150.0, "gn_steps": None, "ratio": None,
                                   "baselines_pending": False, "gn_ran": True}
    assert h1["batches"][4096]["baseline"] == "adamw" and h1["batches"][4096]["ratio"] == 3.0
    assert h2["batches"][8192]["ratio"] == 3.0
    text = ft.markdown([h1, h2])
    assert "GN, `v2` (target 3.349)" in text
    assert "| 2,048 | muon 150.0 | not run | — | not run | — | — |" in text
    assert "| 4,096 | adamw 120.0 | adamw 90.0 | 40.0 | 45.0 | 3.00× | 2.00× |" in text
    assert "| 8,192 | not run | adamw 60.0 | not run | 20.0 | — | 3.00× |" in text
    v3 = _study(tmp_path / "v3", "v3", 3.3, {"adamw": {4096: "pending"}, "gn": {4096: "pending"}})
    assert "| 4,096 | seeds not run yet | seeds not run yet | — |" in ft.markdown([ft.headline(v3)])
    # muon's seeds are still to come where adamw's have run: no best baseline yet, not adamw's steps
    v4 = _study(tmp_path / "v4", "v4", 3.3, {"adamw": {4096: 90.0, 8192: None}, "muon": {4096: "pending", 8192: None},
                                             "gn": {4096: 30.0, 8192: 20.0}})
    text = ft.markdown([ft.headline(v4)])
    assert "| 4,096 | seeds not run yet | 30.0 | — |" in text and "| 8,192 | none reached | 20.0 | — |" in text


def test_a_budget_study_is_refused_on_one_line(ft, tmp_path):
    budget = _study(tmp_path / "b", "b", 3.5, {"adamw": {2048: 1.0}}, kind="budget")
    with pytest.raises(SystemExit, match="is a budget study; give steps-to-target studies"):
        ft.headline(budget)
