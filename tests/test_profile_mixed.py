"""benchmarks/profile_mixed.py: a mixed step's parts next to a decode step's, from the steps that launched them."""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import profile_mixed as pm  # noqa: E402


def test_pick_prompts_keeps_the_prompt_part_under_the_token_limit():
    rng = random.Random(0)
    pool = [[7] * n for n in (5, 40, 90, 200, 600, 1500, 3000)]
    for _ in range(50):
        chosen = pm.pick_prompts(pool, 3, 400, rng)
        assert len(chosen) == 3 and sum(map(len, chosen)) <= 400
    # four prompts never fit in 100 tokens here (5 + 40 + 90 > 100): as many as fit, the shortest last
    chosen = pm.pick_prompts(pool, 4, 100, rng)
    assert 1 <= len(chosen) < 4 and sum(map(len, chosen)) <= 100


def test_a_tiny_run_compares_decode_and_mixed_steps(tmp_path):
    assert pm.main(["--tiny", "--steps", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "profile_mixed_cpu_tiny.json").read_text())
    assert report["kinds_traced"] == ["decode", "mixed"] * 3
    assert len(report["prompt_lens"]) == 3 and all(len(lens) == 2 for lens in report["prompt_lens"])
    assert set(report["mixed_ms"]) == set(pm.PARTS) == set(report["decode_ms"])
    # the mixed step runs the decode batch and the prompts: more work on the same model
    assert sum(report["mixed_ms"].values()) > sum(report["decode_ms"].values()) > 0
    assert report["padded_tokens"] is None  # no CUDA graphs on a CPU
    assert report["inside_graphs_ms"] == {"decode": 0, "mixed": 0}  # (nor their gaps)
    assert all(report["span_ms"][k] >= 0.999 * sum(report[f"{k}_ms"].values()) for k in ("decode", "mixed"))
