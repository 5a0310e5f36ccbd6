"""`gnlm compare` (two studies side by side) and the CSV tables of every report, on synthetic results (no training)."""

import csv
import json

import pytest
from test_report import STEPS, _write_results

from gnlm.stats import ratio_interval
from gnlm.cli import main
from gnlm.compare import run_compare
from gnlm.config import ConfigError
from gnlm.report import write_report
from gnlm.results import read_rows
from gnlm.tables import markdown_tables


def test_markdown_tables_are_found_with_their_headings():
    text = "# A\n\n| a | b |\n|---|---|\n| 1 | `x` |\n| 2 | y |\n\ntext\n\n## B c\n| z |\n|:---:|\n| 3 |\n\nnot a | table\n"
    tables = markdown_tables(text)
    assert [(t.title, t.header, t.rows) for t in tables] == [("A", ["a", "b"], [["1", "x"], ["2", "y"]]),
                                                             ("B c", ["z"], [["3"]])]


def test_every_table_of_a_report_is_a_csv_file(tmp_path):
    root = tmp_path / "res"
    _write_results(root)
    text = write_report(root, bootstrap=20).read_text()
    files = sorted((root / "tables").glob("*.csv"))
    assert len(files) == len(markdown_tables(text)) > 5
    primary = next(f for f in files if "target-3-primary" in f.name)
    rows = list(csv.reader(primary.open()))
    assert rows[0] == ["method", "1K", "2K", "4K", "8K"] and ["gn", "20.0 (20)", "10.0 (10)", "5.0 (5)", "2.5 (2)"] in rows


def _faster(root, factor):
    """The same synthetic study with every reported GN run ``factor`` times faster."""
    rows = read_rows(root)
    for r in rows:
        if r.method == "gn" and r.seed == 1:
            c = r.crossings["3"]
            r.crossings["3"] = {**c, "step_interp": c["step_interp"] * factor}
    (root / "runs.jsonl").write_text("".join(r.to_json() + "\n" for r in rows))


def test_compare_puts_two_studies_side_by_side_with_ratios(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_results(a)
    _write_results(b)
    _faster(b, 0.5)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = tmp_path / "cmp"
    result = json.loads((out / "compare.json").read_text())
    assert result["shared_targets"] == [3.0] and result["methods"][:2] == ["adamw", "muon"]
    gn8k = next(e for e in result["per_target"]["3"] if e["method"] == "gn" and e["batch_tokens"] == 8192)
    assert [s["steps"] for s in gn8k["studies"]] == [STEPS["gn"][3], STEPS["gn"][3] * 0.5]
    assert gn8k["studies"][1]["ratio"] == pytest.approx(0.5)
    text = (out / "compare.md").read_text()
    assert "| gn | 8K | 2.5 | 1.2 | 0.50× [0.50, 0.50] |" in text  # one seed per study: a degenerate interval
    assert (out / "compare.png").stat().st_size > 1000 and list((out / "tables").glob("*.csv"))


def test_studies_without_a_shared_target_are_refused_on_one_line(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_results(a)
    _write_results(b)
    (b / "study.yaml").write_text((b / "study.yaml").read_text().replace("target_loss: 3.0", "target_loss: 2.5"))
    with pytest.raises(ConfigError, match="share no target") as err:
        run_compare([a, b], tmp_path / "cmp")
    assert "\n" not in str(err.value) and not (tmp_path / "cmp").exists()


def test_ratio_interval_brackets_the_ratio_of_medians():
    base, other = [10.0, 11.0, 12.0], [5.0, 6.0, 7.0]
    lo, hi = ratio_interval(base, other, n=500)
    assert lo <= 6.0 / 11.0 <= hi and 5 / 12 <= lo and hi <= 7 / 10
    assert ratio_interval([], other) == (None, None)
    assert ratio_interval([float("inf")], [1.0]) == (None, None)  # the base never reached the target
