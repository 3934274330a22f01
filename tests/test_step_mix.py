"""benchmarks/step_mix.py: a request set's steps by kind and rows (replayed with the model replaced), and the cost
of its mixed steps read off a GPU run's timeline."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402

import benchmarks.step_mix as sm  # noqa: E402


def test_bands_count_every_decode_step_once():
    steps = [("prefill", 8, 0.0, True), ("decode", 1, 10.0, True), ("decode", 16, 30.0, True),
             ("decode", 17, 50.0, True), ("mixed", 250, 40.0, True), ("decode", 250, 100.0, True),
             ("decode", 256, 200.0, False)]
    bands = sm.bands(steps)
    assert [b["steps"] for b in bands] == [2, 1, 0, 0, 0, 2]
    assert bands[0]["context"] == 20.0 and bands[-1]["context"] == 150.0 and bands[2]["context"] is None


def test_full_phase_costs_take_the_prompt_tokens_and_the_time_of_full_steps():
    # a prefill entry, two full entries (the second holds a mixed and a decode step: 2 x 250 rows + 900 prompt
    # tokens), then a tail entry that does not count
    result = {"wall_s": 1.0, "timeline": {"t_s": [0.0, 0.1, 0.2, 0.21], "prefill": [1, 0, 0, 0],
                                          "running": [36, 250, 250, 100], "steps": [1, 1, 2, 50],
                                          "tokens": [8000, 250, 1400, 5000]}}
    costs = sm.full_phase_costs(result, decode_ms=2.0, mixed_steps=1)
    assert costs["seconds"] == pytest.approx(0.11) and costs["steps"] == 3 and costs["prompt_tokens"] == 900
    # 110 ms for 3 steps, 2 ms each: the mixed one took 104 ms more
    assert costs["mixed_extra_ms"] == pytest.approx(104.0)
    assert costs["mixed_extra_us_per_prompt_token"] == pytest.approx(104e3 / 900)


def test_the_replay_runs_the_tiny_w3_with_mixed_steps(tmp_path):
    assert sm.main(["--workload", "W3", "--tiny", "--out", str(tmp_path)]) == 0
    steps = sm.replay_steps("W3", "continuous", cap=8, tiny=True)
    kinds = {kind for kind, *_ in steps}
    assert kinds == {"prefill", "mixed", "decode"} and all(1 <= rows <= 8 for _, rows, *_ in steps)
    assert all(in_flight for *_, in_flight in steps)  # each step's launch overlapped the next one's
    assert (tmp_path / "step_mix_W3_tiny.json").exists()


def test_steps_the_host_waits_for_are_counted(monkeypatch):
    """An engine that may never overlap (as when every request needs its tokens on the host to sample): no step
    stays in flight."""
    from pagedattention.engine.stepper import Stepper

    monkeypatch.setattr(Stepper, "can_overlap", lambda self, batch: False)
    steps = sm.replay_steps("W3", "continuous", cap=8, tiny=True)
    assert steps and not any(in_flight for *_, in_flight in steps)


def test_report_shows_the_bands_side_by_side_and_the_full_phase(tmp_path):
    import runpy

    assert sm.main(["--workload", "W3", "--tiny", "--out", str(tmp_path)]) == 0
    report = runpy.run_path(str(Path(sm.__file__).parent / "report.py"), run_name="report")
    text = report["report"](tmp_path)
    assert "### A request set's decode steps by rows" in text and "(step_mix_W3_tiny.json)" in text
    assert "| rows | continuous steps | continuous mean context | static steps | static mean context |" in text
    assert "| 1-16 |" in text and "| 241-256 |" in text and "steps of >= 240 rows" not in text  # no timeline given
    assert "the host waited for the tokens before the next launch: 0 and 0" in text
