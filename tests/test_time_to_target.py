"""benchmarks/time_to_target.py: step times measured side by side × steps to target, and the time crossover."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark

from gnlm.bench import run_study
from gnlm.study import study_from_dict


@pytest.fixture(scope="module")
def ttt():
    return load_benchmark("time_to_target")


def _cell(method, family, batch, steps, cpu_s, measured):
    return {"method": method, "family": family, "batch_tokens": batch, "steps": steps, "cpu_s": cpu_s,
            "time_s": steps * cpu_s, "measured_time_s": measured}


def test_ratios_and_crossover_from_timed_cells(ttt):
    cells = [_cell("adamw", "baseline", 1024, 100, 0.01, 1.5), _cell("muon", "baseline", 1024, 80, 0.02, 1.0),
             _cell("gn", "gn", 1024, 10, 0.2, 2.0),  # adamw 1.0 s vs GN 2.0 s: 0.5
             _cell("adamw", "baseline", 4096, 50, 0.04, 2.0), _cell("gn", "gn", 4096, 2, 0.5, 0.5)]  # 2.0 vs 1.0
    out = ttt.compare(cells, [1024, 4096])["gn"]
    assert out["per_batch"]["1024"]["baseline"] == "adamw" and out["per_batch"]["1024"]["baseline_over_gn"] == 0.5
    assert out["per_batch"]["1024"]["measured_baseline"] == "muon"  # the least measured time, another baseline
    assert out["per_batch"]["1024"]["measured_baseline_over_gn"] == 0.5
    assert out["per_batch"]["4096"]["baseline_over_gn"] == 2.0
    assert out["per_batch"]["4096"]["measured_baseline_over_gn"] == 4.0
    # log ratio -log 2 at 1024 and +log 2 at 4096: crossing halfway in log batch
    assert out["crossover"]["bound"] == "exact" and out["crossover"]["batch"] == pytest.approx(2048)
    assert out["measured_crossover"]["bound"] == "exact"
    assert out["measured_crossover"]["batch"] == pytest.approx(1024 * 4 ** (1 / 3))  # log 0.5 to log 4: a third
    text = ttt.markdown([dict(c, wall_s=c["cpu_s"]) for c in cells], ttt.compare(cells, [1024, 4096]), [1024, 4096],
                        3.5)
    assert "| gn | 0.50 (adamw); measured 0.50 | 2.00 (adamw); measured 4.00 | 2,048 | 1,625 |" in text


def test_a_gn_method_slower_everywhere_has_its_crossover_above(ttt):
    cells = [_cell("adamw", "baseline", 1024, 100, 0.01, None), _cell("gn", "gn", 1024, 10, 0.2, None)]
    out = ttt.compare(cells, [1024])["gn"]
    assert out["crossover"] == {"batch": 1024, "bound": "above"}
    assert out["measured_crossover"] == {"batch": None, "bound": "none"}  # no measured times: not compared


def test_times_every_selected_cell_of_a_study_and_leaves_its_results_alone(ttt, tmp_path, capsys):
    res = tmp_path / "res"
    study = study_from_dict({
        "name": "t", "progress": False, "targets": [8.0], "primary_target": 8.0, "max_steps": 6,
        "batch_tokens": [256, 512], "selection_seed": 0, "seeds": [1],
        "base": {"model": {"preset": "nano"}, "data": {"eval_sequences": 4},
                 "train": {"eval_every": 1, "eval_batch_size": 4, "threads": 1}, "gn": {"inner_batch_size": 2}},
        "methods": [{"name": "adamw", "lrs": [3e-2]}, {"name": "gn", "lrs": [3e-2]}]})
    run_study(study, res)
    before = sorted(p.relative_to(res) for p in res.rglob("*"))
    summary = json.loads((res / "summary.json").read_text())
    reached = {k for k, c in summary["cells"].items() if c["per_target"]["8"]["steps_interp"] is not None}
    assert reached, "the tiny study should reach its target somewhere"
    ttt.main([str(res), "--rounds", "2", "--warmup", "0"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {f"{c['method']}/{c['batch_tokens']}" for c in out["cells"]} == reached
    for c in out["cells"]:
        assert c["cpu_s"] > 0 and c["time_s"] == pytest.approx(c["steps"] * c["cpu_s"])
        assert c["point"] == summary["cells"][f"{c['method']}/{c['batch_tokens']}"]["best_point"]
    assert sorted(p.relative_to(res) for p in res.rglob("*")) == before  # nothing written into the study


def test_bad_input_is_one_line(ttt, tmp_path):
    with pytest.raises(SystemExit, match="--rounds and --threads must be >= 1"):
        ttt.main([str(tmp_path), "--rounds", "0"])
