"""benchmarks/ab_engine.py: two builds' throughput runs interleaved, and the table made of them."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ab_engine  # noqa: E402


def test_runs_alternate_so_that_each_tree_goes_first_as_often():
    assert ab_engine.run_order(1) == ["old", "new"]
    assert ab_engine.run_order(2) == ["old", "new", "new", "old"]
    assert ab_engine.run_order(3).count("old") == 3


def test_the_summary_is_per_workload_with_the_ratio_of_the_means():
    def run(w1, w3):
        return {"results": [{"workload": "W1", "output_tok_per_s": w1}, {"workload": "W3", "output_tok_per_s": w3}]}
    rows = ab_engine.summarize({"old": [run(100.0, 10.0), run(300.0, 30.0)], "new": [run(250.0, 20.0)]})
    assert [r["workload"] for r in rows] == ["W1", "W3"]
    assert rows[0]["old_tok_per_s"] == [100.0, 300.0] and rows[0]["new_over_old"] == pytest.approx(250 / 200)
    assert rows[1]["new_over_old"] == pytest.approx(1.0)


def test_a_tiny_ab_of_this_tree_against_itself(tmp_path, capsys):
    assert ab_engine.main(["--old", str(ab_engine.NEW), "--tiny", "--runs", "1", "--workloads", "W1",
                           "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "ab_engine.json").read_text())
    assert report["order"] == ["old", "new"] and [r["workload"] for r in report["rows"]] == ["W1"]
    assert all(v > 0 for r in report["rows"] for v in r["old_tok_per_s"] + r["new_tok_per_s"])
    assert (tmp_path / "old_0").is_dir() and (tmp_path / "new_1").is_dir()


def test_the_other_build_must_hold_the_benchmark(tmp_path):
    with pytest.raises(SystemExit):
        ab_engine.main(["--old", str(tmp_path)])


def test_the_step_summary_is_per_batch_with_the_host_work_and_the_ratio_of_the_walls():
    def run(*walls):
        return {"rows": [{"batch": b, "wall_ms": w, "host_wait_ms": 0.25, "device_busy_ms": 0.5}
                         for b, w in zip((1, 64), walls)]}
    rows = ab_engine.summarize_steps({"old": [run(1.0, 2.0), run(1.5, 2.0)], "new": [run(1.0, 1.0)]})
    assert [r["batch"] for r in rows] == [1, 64]
    assert rows[0]["old_wall_ms"] == [1.0, 1.5] and rows[0]["old_host_ms"] == [0.75, 1.25]
    assert rows[0]["new_over_old"] == pytest.approx(1.0 / 1.25) and rows[1]["new_over_old"] == pytest.approx(0.5)


def test_a_tiny_step_ab_of_this_tree_against_itself(tmp_path):
    assert ab_engine.main(["--old", str(ab_engine.NEW), "--tiny", "--runs", "1", "--steps",
                           "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "ab_steps.json").read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 4, 8]
    assert all(r["old_wall_ms"][0] > 0 and r["new_wall_ms"][0] > 0 for r in report["rows"])
