"""benchmarks/probe_validation.py: probe measures paired with a study's measured steps, and their correlation
(no probing here: a probe result and a summary of the shapes `gnlm probe` and `gnlm report` write)."""

from __future__ import annotations

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def pv():
    return load_benchmark("probe_validation")


def _summary(steps: dict[str, float | None], batch: int) -> dict:
    return {"cells": {f"{m}/{batch}": {"per_target": {"3.49": {"steps_interp": s, "reached": 3 if s else 0}}}
                      for m, s in steps.items()}}


def test_points_pair_each_scored_direction_with_its_methods_measured_steps(pv):
    probe = {"optimizers": {"adamw": {"rho": 0.05, "step_efficiency": 0.04}, "muon": {"rho": 0.12,
                                                                                     "step_efficiency": 0.1}},
             "references": {"layerwise": {"rho": 0.8, "step_efficiency": 0.4}, "gn": {"rho": 1.0}}, "damping": 0.01,
             "by_damping": [{"damping": 0.001, "rho": {"adamw": 0.03, "muon": 0.2, "layerwise": 0.7}},
                            {"damping": 0.01, "rho": {"adamw": 0.05, "muon": 0.12, "layerwise": 0.8}}]}
    summary = _summary({"adamw": 120.0, "muon": 80.0, "gn_layerwise": None}, 8192)
    points = pv.points_of(probe, summary, 8192, 3.49)
    assert [(p["method"], p["steps"], p["rho"]) for p in points] == [("adamw", 120.0, 0.05), ("muon", 80.0, 0.12)]
    assert "rho_fixed" not in points[0]  # no fixed λ asked
    fixed = pv.points_of(probe, summary, 8192, 3.49, fixed_damping=1e-3)
    assert [p["rho_fixed"] for p in fixed] == [0.03, 0.2]  # ρ at that λ from the sweep
    assert "rho_fixed" not in pv.points_of(probe, summary, 8192, 3.49, fixed_damping=1.0)[0]  # λ not solved
    summary = _summary({"adamw": 120.0, "muon": 80.0, "gn_layerwise": 40.0}, 8192)
    points = pv.points_of(probe, summary, 8192, 3.49)
    assert points[-1] == {"batch": 8192, "method": "gn_layerwise", "steps": 40.0, "damping": 0.01, "rho": 0.8,
                          "step_efficiency": 0.4}
    corr = pv.correlations(points, [8192], bootstrap=50)
    assert corr["rho"]["pooled"]["spearman"] == pytest.approx(-1.0) and corr["rho"]["pooled"]["n"] == 3
    assert "| rho | -1.00" in pv.markdown({"study": "s", "primary_target": 3.49, "seeds": [1], "batches": [8192],
                                           "probe_batches": 1, "wall_time": 1.0, "points": points,
                                           "damping": "calibrated", "fixed_damping": 1e-3,
                                           "correlations": corr})
