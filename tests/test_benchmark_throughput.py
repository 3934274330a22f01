"""The bookkeeping of benchmarks/benchmark_throughput.py that the README's claims rest on."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from benchmark_throughput import ideal_decode_steps, timeline_segments, to_json_text  # noqa: E402


def test_static_batches_last_as_long_as_their_longest_request():
    assert ideal_decode_steps([5, 1, 1, 1], cap=2, scheduling="static") == 5 + 1
    assert ideal_decode_steps([3, 7, 2], cap=8, scheduling="static") == 7


def test_continuous_batching_refills_a_slot_the_step_after_it_frees():
    # slot A runs the 5-token request; slot B runs the three 1-token requests one after another
    assert ideal_decode_steps([5, 1, 1, 1], cap=2, scheduling="continuous") == 5
    # one batch holds everything: both schedules take the longest request's steps
    assert ideal_decode_steps([3, 7, 2], cap=8, scheduling="continuous") == 7
    assert ideal_decode_steps([4, 4, 4, 4], cap=2, scheduling="continuous") == 8


def test_timeline_merges_runs_of_steps_of_one_kind_and_occupancy():
    steps = [(0.0, True, 2, 10), (0.1, False, 2, 2), (0.2, False, 2, 2), (0.3, False, 1, 1), (0.4, True, 2, 7)]
    assert timeline_segments(steps) == {"t_s": [0.0, 0.1, 0.3, 0.4], "prefill": [1, 0, 0, 1],
                                        "running": [2, 2, 1, 2], "steps": [1, 2, 1, 1], "tokens": [10, 4, 1, 7]}


def test_report_text_keeps_number_lists_on_one_line_and_reads_back_the_same():
    report = {"results": [{"timeline": {"t_s": [0.0, 0.25, -1.5], "running": [3, 2, 1]}, "name": "a [b]  c"}]}
    text = to_json_text(report)
    assert json.loads(text) == report
    assert '"t_s": [0.0, 0.25, -1.5]' in text and '"running": [3, 2, 1]' in text
