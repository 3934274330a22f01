"""benchmarks/admission_sweep.py: a request set's continuous schedule replayed under other admission settings."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402

import benchmarks.admission_sweep as sweep  # noqa: E402
import pagedattention.engine.scheduler as scheduler  # noqa: E402


def test_waiting_for_more_seats_makes_fewer_and_bigger_mixed_steps_of_the_same_work():
    one, four = (sweep.summary(sweep.replay("W3", m, (256, 8), cap=32, tiny=True), 32) for m in (1, 4))
    assert four["steps"]["mixed"] < one["steps"]["mixed"]
    assert four["mixed_prompts_mean"] > one["mixed_prompts_mean"]
    assert four["empty_seat_steps_while_waiting"] > one["empty_seat_steps_while_waiting"]
    # every request runs whole either way: the same prompt tokens in mixed steps, the same decode rows
    assert four["mixed_prompt_tokens"] == one["mixed_prompt_tokens"] > 0
    assert four["seat_steps"] == one["seat_steps"]
    assert four["mixed_prompt_rows_padded"] % sweep.GRAPH_TOKENS == 0
    assert four["mixed_prompt_rows_padded"] >= four["mixed_prompt_tokens"]


def test_the_summary_counts_each_kind_and_pads_each_prompt_part():
    steps = [("prefill", 4, 900, 0, 10), ("mixed", 34, 330, 30, 6), ("decode", 32, 32, 32, 6),
             ("mixed", 33, 632, 32, 5), ("decode", 20, 20, 20, 0)]
    s = sweep.summary(steps, cap=40)
    assert s["steps"] == {"prefill": 1, "mixed": 2, "decode": 2}
    assert s["mixed_prompts_mean"] == 2.5 and s["mixed_prompt_tokens"] == 300 + 600
    assert s["mixed_prompt_rows_padded"] == 512 + 768
    assert s["empty_seat_steps_while_waiting"] == 6 + 8 + 7  # the last step had nobody waiting
    assert s["seat_steps"] == 34 + 32 + 33 + 20


def test_padding_takes_the_smallest_bucket_that_holds_the_tokens_and_the_prompts():
    buckets = [(1024, 4), (256, 2), (512, 4)]
    assert sweep.padded_rows(2, 200, buckets) == 256
    assert sweep.padded_rows(3, 200, buckets) == 512  # too many prompts for the 256-token bucket
    assert sweep.padded_rows(4, 513, buckets) == 1024
    assert sweep.padded_rows(9, 513, None) == 768
    with pytest.raises(ValueError, match="5 prompts"):
        sweep.padded_rows(5, 100, buckets)


def test_the_scheduler_constant_is_put_back_even_when_the_replay_fails():
    before = scheduler.MIN_MIXED_ADMISSION
    with pytest.raises(RuntimeError), sweep.min_mixed_admission(before + 5):
        assert scheduler.MIN_MIXED_ADMISSION == before + 5
        raise RuntimeError("replay failed")
    assert scheduler.MIN_MIXED_ADMISSION == before


def test_main_writes_one_run_per_setting(tmp_path):
    assert sweep.main(["--tiny", "--min-admission", "1,4", "--mixed-limits", "256:8,512:16",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "admission_W3_tiny.json").read_text())
    assert [(r["mixed_prompt_limit"], r["min_mixed_admission"]) for r in report["runs"]] == \
        [([256, 8], 1), ([256, 8], 4), ([512, 16], 1), ([512, 16], 4)]
    assert report["max_num_seqs"] == 32 and report["min_mixed_admission_now"] == scheduler.MIN_MIXED_ADMISSION
