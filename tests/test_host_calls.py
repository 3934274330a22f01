"""benchmarks/host_calls.py: a whole request set's host time by function, and its CUDA calls and GPU busy share per
traced step."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pytest  # noqa: E402

import host_calls  # noqa: E402


def event(cat, name, ts, dur, **args):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


def test_api_calls_count_calls_inside_the_steps_and_merge_overlapping_device_work():
    windows = [(100.0, 200.0), (200.0, 300.0)]  # two steps, 100 us each
    events = [
        event("cuda_runtime", "cudaGraphLaunch", 110, 8), event("cuda_runtime", "cudaGraphLaunch", 210, 12),
        event("cuda_runtime", "cudaEventSynchronize", 150, 40),
        event("cuda_runtime", "cudaMemcpyAsync", 50, 5),          # before the first step: not counted
        event("kernel", "a", 120, 50), event("kernel", "b", 150, 40),  # overlap: 120 .. 190 is 70 us busy
        event("gpu_memcpy", "c", 280, 40),                        # runs past the span: 20 us inside
        event("kernel", "g1", 220, 10, correlation=7), event("kernel", "g2", 236, 4, correlation=7),  # one replay:
    ]                                                             # 6 us between its kernels
    calls, traced = host_calls.api_calls(events, windows)
    by_name = {c["call"]: c for c in calls}
    assert set(by_name) == {"cudaGraphLaunch", "cudaEventSynchronize"}
    assert by_name["cudaGraphLaunch"]["per_step"] == 1.0
    assert by_name["cudaGraphLaunch"]["us_per_step"] == pytest.approx(10.0)
    assert by_name["cudaGraphLaunch"]["us_per_call"] == pytest.approx(10.0)
    assert calls[0]["call"] == "cudaEventSynchronize"  # the most time per step first
    assert traced["steps"] == 2 and traced["wall_ms_mean"] == pytest.approx(0.1)
    assert traced["gpu_busy_fraction"] == pytest.approx((70 + 20 + 14) / 200)
    assert traced["gpu_idle_inside_graphs_fraction"] == pytest.approx(6 / 200)


def test_a_tiny_run_reports_functions_and_traced_steps(tmp_path):
    assert host_calls.main(["--tiny", "--trace-skip", "5", "--trace-steps", "4", "--top", "12",
                            "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "host_calls_W3_cpu_tiny.json").read_text())
    functions = report["cprofile"]["functions"]
    assert len(functions) == 12
    assert [f["tottime_ms"] for f in functions] == sorted((f["tottime_ms"] for f in functions), reverse=True)
    assert all(0 <= f["share"] <= 1 for f in functions) and report["cprofile"]["steps"] > 0
    trace = report["trace"]
    assert trace["steps"] == 4 and trace["skip"] == 5 and trace["wall_ms_mean"] > 0
    assert 0 < trace["gpu_busy_fraction"] <= 1  # on a CPU the "device" work is the aten ops' own time
    assert trace["gpu_idle_inside_graphs_fraction"] == 0  # (and no graphs)


def test_the_traced_steps_stay_inside_a_short_run(tmp_path):
    assert host_calls.main(["--tiny", "--workload", "W1", "--trace-skip", "100000", "--trace-steps", "3",
                            "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "host_calls_W1_cpu_tiny.json").read_text())
    assert report["trace"]["skip"] == report["cprofile"]["steps"] - 3 and report["trace"]["steps"] == 3
