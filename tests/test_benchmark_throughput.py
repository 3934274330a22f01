"""The bookkeeping of benchmarks/benchmark_throughput.py and its workloads that the README's claims rest on."""
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pytest  # noqa: E402

import common  # noqa: E402
import workloads  # noqa: E402
from benchmark_throughput import ideal_decode_steps, main, speedup_line, timeline_segments, timeline_summary  # noqa: E402
from common import to_json_text  # noqa: E402


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
    steps = [(0.0, "prefill", 2, 10), (0.1, "decode", 2, 2), (0.2, "decode", 2, 2), (0.3, "decode", 1, 1),
             (0.4, "prefill", 2, 7), (0.5, "mixed", 3, 9), (0.6, "decode", 3, 3)]
    assert timeline_segments(steps) == {"t_s": [0.0, 0.1, 0.3, 0.4, 0.5], "prefill": [1, 0, 0, 1, 0],
                                        "running": [2, 2, 1, 2, 3], "steps": [1, 2, 1, 1, 2],
                                        "tokens": [10, 4, 1, 7, 12]}
    summary = timeline_summary(steps, wall=1.0)
    assert (summary["prefill_steps"], summary["mixed_steps"], summary["decode_steps"]) == (2, 1, 5)
    assert summary["prefill_s"] == pytest.approx(0.2) and summary["mixed_s"] == pytest.approx(0.1)
    assert summary["decode_s"] == pytest.approx(0.8)


def test_report_text_keeps_number_lists_on_one_line_and_reads_back_the_same():
    report = {"results": [{"timeline": {"t_s": [0.0, 0.25, -1.5], "running": [3, 2, 1]}, "name": "a [b]  c"}]}
    text = to_json_text(report)
    assert json.loads(text) == report
    assert '"t_s": [0.0, 0.25, -1.5]' in text and '"running": [3, 2, 1]' in text


# --- workloads -------------------------------------------------------------------------------------------

def reference_w1_w2(name, tiny):
    """The generators as they were before they moved to workloads.py: their requests must not change."""
    rng = random.Random(0)
    scale, n = (16, 32) if tiny else (1, 256)
    if name == "W1":
        id_range = (100, 500) if tiny else (100, 149_999)
        prompts = [[rng.randint(*id_range) for _ in range(rng.randint(128 // scale, 512 // scale))] for _ in range(n)]
        outputs = [256 // scale] * n
    else:
        prompts = [[rng.randint(0, 500 if tiny else 10_000) for _ in range(rng.randint(100 // scale, 1024 // scale))]
                   for _ in range(n)]
        outputs = [rng.randint(100 // scale, 1024 // scale) for _ in range(n)]
    return prompts, outputs


@pytest.mark.parametrize("name", ["W1", "W2"])
@pytest.mark.parametrize("tiny", [False, True])
def test_w1_w2_are_the_requests_they_always_were(name, tiny):
    w = workloads.make_workload(name, tiny=tiny)
    prompts, outputs = reference_w1_w2(name, tiny)
    assert w.prompts == prompts and w.output_lens == outputs
    params = w.sampling_params(0.6)
    assert [p.max_tokens for p in params] == outputs and all(p.ignore_eos and p.temperature == 0.6 for p in params)


def test_w3_is_sharegpt_like_and_fits_max_model_len():
    w = workloads.make_workload("W3")
    prompt_lens, outputs = [len(p) for p in w.prompts], w.output_lens
    assert w.num_requests == 2048
    assert 200 <= statistics.fmean(prompt_lens) <= 240 and 170 <= statistics.fmean(outputs) <= 210
    assert statistics.median(prompt_lens) < statistics.fmean(prompt_lens)  # a long tail
    assert min(prompt_lens) >= 4 and min(outputs) >= 4
    assert max(p + o for p, o in zip(prompt_lens, outputs)) <= 2048 and max(prompt_lens) > 1024
    assert all(0 <= t <= 10_000 for p in w.prompts for t in p)
    again = workloads.make_workload("W3")
    assert again.prompts == w.prompts and again.output_lens == w.output_lens


def test_tiny_w3_fits_the_tiny_engine():
    w = workloads.make_workload("W3", tiny=True)
    assert w.num_requests == 128 and max(len(p) + o for p, o in zip(w.prompts, w.output_lens)) <= 128
    assert all(0 <= t <= 500 for p in w.prompts for t in p)


def test_ids_beyond_a_smaller_vocabulary_wrap_around():
    w = workloads.make_workload("W1", vocab_size=128_256)
    plain = workloads.make_workload("W1")
    assert max(max(p) for p in w.prompts) < 128_256 <= max(max(p) for p in plain.prompts)
    assert [[t % 128_256 for t in p] for p in plain.prompts] == w.prompts
    assert workloads.make_workload("W2", vocab_size=151_936).prompts == workloads.make_workload("W2").prompts


def test_unknown_workload_is_a_clear_error():
    with pytest.raises(ValueError, match="W1, W2, W3"):
        workloads.make_workload("W4")


# --- result files and the run -------------------------------------------------------------------------------

def test_result_names_never_mix_cards_shapes_or_tiny_runs():
    tags = {common.result_tag("NVIDIA H200", False), common.result_tag("NVIDIA H200", True),
            common.result_tag("NVIDIA H200", False, "7b"), common.result_tag("cpu", True),
            common.result_tag("NVIDIA H100 80GB HBM3", False)}
    assert len(tags) == 5
    assert common.result_tag("NVIDIA H200", False, common.DEFAULT_SHAPE) == "NVIDIA_H200"
    assert common.result_tag("cpu", True) == "cpu_tiny"


def test_speedup_line_divides_continuous_by_static_requests_per_second():
    rows = [{"workload": "W3", "max_num_seqs": 4, "scheduling": "static", "requests_per_s": 2.0},
            {"workload": "W3", "max_num_seqs": 4, "scheduling": "continuous", "requests_per_s": 3.0}]
    assert speedup_line(rows, "W3", 4) == ("Static Batching Throughput: 2.00 req/s. Continuous Batching (with "
                                           "PagedAttention) Throughput: 3.00 req/s. Achieved 1.50x speedup!")
    assert speedup_line(rows, "W3", 8) is None


def test_tiny_run_end_to_end(tmp_path, capsys):
    assert main(["--tiny", "--hf", "off", "--workloads", "W1,W3", "--max-num-seqs", "4,8",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads((tmp_path / "throughput_cpu_tiny.json").read_text())
    rows = report["results"]
    assert [(r["workload"], r["max_num_seqs"], r["scheduling"]) for r in rows] == [
        ("W1", 4, "static"), ("W1", 4, "continuous"), ("W1", 8, "static"), ("W1", 8, "continuous"),
        ("W3", 8, "static"), ("W3", 8, "continuous")]
    for r in rows:
        w = workloads.make_workload(r["workload"], tiny=True)
        assert r["card"] == report["card"] == "cpu" and report["cpu_threads"] == 1
        assert r["output_tokens"] == w.output_tokens and r["num_requests"] == w.num_requests
        assert max(r["timeline"]["running"]) <= r["max_num_seqs"]
        assert r["preemptions"] == 0
        # the first token of each request comes from its prefill: one decode step fewer than ideal_decode_steps
        # counts per static batch, and at least as many as free admissions would need
        if r["scheduling"] == "static":
            assert r["decode_steps"] == r["ideal_decode_steps"] - -(-w.num_requests // r["max_num_seqs"])
        assert r["decode_steps"] >= ideal_decode_steps([o - 1 for o in w.output_lens], r["max_num_seqs"], "continuous")
        assert sum(r["timeline"]["tokens"]) >= w.prompt_tokens + w.output_tokens - w.num_requests
    static, continuous = rows[-2], rows[-1]
    x, y = static["requests_per_s"], continuous["requests_per_s"]
    assert out[-1] == (f"Static Batching Throughput: {x:.2f} req/s. Continuous Batching (with PagedAttention) "
                       f"Throughput: {y:.2f} req/s. Achieved {y / x:.2f}x speedup!")
    assert (tmp_path / "throughput_cpu_tiny.png").exists()


def test_generate_loop_measures_the_same_requests_without_a_timeline(tmp_path):
    assert main(["--tiny", "--hf", "off", "--workloads", "W2", "--scheduling", "continuous", "--loop", "generate",
                 "--out", str(tmp_path), "--no-plots"]) == 0
    row, = json.loads((tmp_path / "throughput_cpu_tiny.json").read_text())["results"]
    w = workloads.make_workload("W2", tiny=True)
    assert row["loop"] == "generate" and row["output_tokens"] == w.output_tokens
    assert "decode_steps" not in row and row["timeline"]["t_s"] == []
    assert 0 < row["ttft_s"]["p50"] <= row["ttft_s"]["p99"] <= row["wall_s"]
