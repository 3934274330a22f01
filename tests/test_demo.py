"""The memory demo: its headline line agrees with its JSON, and the paged figure is what block sharing predicts."""
import json
import math
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = re.compile(r"Naive: (\S+) GB\. PagedAttention: (\S+) GB\. Saved (\S+)%")
TINY = dict(num_requests=4, prompt_len=40, question_len=5, answer_len=6, block_size=8)


def demo_main():
    try:
        import pagedattention.memory as memory
    except ImportError as e:
        pytest.skip(f"the memory layer is not importable yet: {e}")
    if not hasattr(memory, "PagedAttentionManager"):
        pytest.skip("PagedAttentionManager is not written yet")
    return runpy.run_path(str(ROOT / "examples" / "demo_memory.py"), run_name="demo")["main"]


def tiny_argv(json_path, mode, **sizes):
    sizes = {**TINY, **sizes}
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    return argv + ["--device", "cpu", "--mode", mode, "--json", str(json_path), "--no-progress"]


def run_demo(tmp_path, capsys, mode, **sizes):
    main = demo_main()
    path = tmp_path / f"demo_{mode}.json"
    assert main(tiny_argv(path, mode, **sizes)) == 0
    out = capsys.readouterr().out
    return out, json.loads(path.read_text())


def check_headline_matches_json(out, result):
    (match,) = HEADLINE.findall(out)
    naive_gb, paged_gb, saved_pct = map(float, match)
    # the printed figures are the JSON's, rounded as printed (4 significant digits, percent to 0.1)
    assert naive_gb == pytest.approx(result["naive_bytes"] / 1e9, rel=1e-3)
    assert paged_gb == pytest.approx(result["paged_bytes"] / 1e9, rel=1e-3)
    assert saved_pct == pytest.approx(100 * (1 - result["paged_bytes"] / result["naive_bytes"]), abs=0.05)
    assert result["saved_fraction"] == pytest.approx(1 - result["paged_bytes"] / result["naive_bytes"])
    assert result["paged_bytes"] == result["paged_peak_blocks"] * result["bytes_per_block"]
    assert result["naive_bytes"] == result["naive_blocks"] * result["bytes_per_block"]


def check_naive_arithmetic(result):
    n, p, a, bs = (result[k] for k in ("num_requests", "prompt_len", "answer_len", "block_size"))
    assert result["naive_blocks"] == n * math.ceil((p + a) / bs)
    # K and V, every layer, one block: the tiny model's KV shape read from the manager's own statistics
    assert result["bytes_per_block"] == result["stats_at_peak"]["bytes_per_block"]


@pytest.mark.parametrize("sizes", [{}, dict(prompt_len=48, question_len=8)], ids=["partial-block", "block-aligned"])
def test_manager_sharing_peak_is_exactly_the_shared_prompt_plus_private_blocks(tmp_path, capsys, sizes):
    out, result = run_demo(tmp_path, capsys, "manager", **sizes)
    check_headline_matches_json(out, result)
    check_naive_arithmetic(result)
    n, p, q, a, bs = (result[k] for k in ("num_requests", "prompt_len", "question_len", "answer_len", "block_size"))
    system = p - q
    # the system prompt's blocks are held once; each request owns every block past the system prompt's full
    # ones (its copy of a partial last block included); the last answer token is never stored
    predicted = math.ceil(system / bs) + n * (math.ceil((p + a - 1) / bs) - system // bs)
    assert result["paged_peak_blocks"] == predicted
    assert result["mode"] == "manager" and "fork_sequence" in out
    assert result["paged_bytes"] < result["naive_bytes"]


def test_manager_fragmentation_line_counts_slots_and_tokens(tmp_path, capsys):
    out, result = run_demo(tmp_path, capsys, "manager")
    stats = result["stats_at_peak"]
    assert stats["slots_held"] == result["paged_peak_blocks"] * result["block_size"]
    assert f"holds {stats['slots_held']:,} slots for {stats['tokens_stored']:,} distinct tokens" in out
    assert f"holds {result['naive_blocks'] * result['block_size']:,} slots for {result['naive_tokens']:,} tokens" in out
    n, p, a = (result[k] for k in ("num_requests", "prompt_len", "answer_len"))
    assert result["naive_tokens"] == n * (p + a - 1)
    # a shared block's tokens count once; each request's blocks past the system prompt's full blocks are its own
    # (its copy of a partial last block repeats those system tokens)
    system, bs = p - result["question_len"], result["block_size"]
    assert stats["tokens_stored"] == system + n * (p + a - 1 - system // bs * bs)


def test_unshared_engine_run_holds_a_private_copy_per_request(tmp_path, capsys):
    main = demo_main()
    try:
        from pagedattention import LLM  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the engine is not importable yet: {e}")
    path = tmp_path / "demo.json"
    assert main(tiny_argv(path, "manager") + ["--unshared"]) == 0
    result = json.loads(path.read_text())
    n, p, a, bs = (result[k] for k in ("num_requests", "prompt_len", "answer_len", "block_size"))
    # every request in flight at once, each with its prompt and all answer tokens but the last in its own blocks
    assert result["unshared_peak_blocks"] == n * math.ceil((p + a - 1) / bs)
    assert result["unshared_peak_blocks"] <= result["naive_blocks"]
    assert "measured without sharing" in capsys.readouterr().out


def test_engine_with_prefix_caching_shares_the_system_prompt(tmp_path, capsys):
    main = demo_main()
    out, result = run_demo(tmp_path, capsys, "engine")
    check_headline_matches_json(out, result)
    check_naive_arithmetic(result)
    n, p, q, a, bs = (result[k] for k in ("num_requests", "prompt_len", "question_len", "answer_len", "block_size"))
    system_full = (p - q) // bs
    private = math.ceil((p + a - 1) / bs) - system_full
    # at least the system prompt once and every request's private blocks; sharing keeps it below naive
    assert system_full + n * private <= result["paged_peak_blocks"] < result["naive_blocks"]
    assert result["generated_tokens"] == n * a
    assert main is not None
    engine_stats = result.get("engine_stats", {})
    if "peak_blocks_held" in engine_stats:  # the engine counts its own peak: the same figure
        assert engine_stats["peak_blocks_held"] == result["paged_peak_blocks"]
        assert "the engine's own statistics agree" in out
    if "prefix_cache_hit_tokens" in engine_stats:  # every request found the system prompt's full blocks
        assert engine_stats["prefix_cache_hit_tokens"] == n * system_full * bs


def test_default_mode_runs_the_engine_with_prefix_caching(tmp_path, capsys):
    main = demo_main()
    path = tmp_path / "demo.json"
    assert main([a for a in tiny_argv(path, "manager") if a not in ("--mode", "manager")]) == 0
    assert json.loads(path.read_text())["mode"] == "engine"


@pytest.mark.parametrize("name", ["demo_memory_gpu.json", "demo_memory_cuda.json",
                                  "demo_memory_NVIDIA_H100_80GB_HBM3.json", "demo_a100.json"])
def test_a_cpu_run_refuses_to_write_a_file_named_for_a_gpu(tmp_path, capsys, name):
    main = demo_main()
    path = tmp_path / name
    committed = '{"card": "a GPU"}\n'
    path.write_text(committed)
    with pytest.raises(SystemExit) as e:
        main(tiny_argv(path, "manager"))
    assert e.value.code == 2
    assert f"--json {path}" in capsys.readouterr().err
    assert path.read_text() == committed


def test_a_cpu_run_writes_a_file_named_for_the_cpu(tmp_path, capsys):
    out, result = run_demo(tmp_path, capsys, "manager")  # demo_manager.json
    main = demo_main()
    assert main(tiny_argv(tmp_path / "demo_memory_cpu.json", "manager")) == 0
    assert json.loads((tmp_path / "demo_memory_cpu.json").read_text())["card"] == result["card"] == "cpu"


def test_command_line_runs_the_demo(tmp_path, capsys):
    demo_main()
    from pagedattention import cli
    path = tmp_path / "demo.json"
    assert cli.main(["demo", "memory", *tiny_argv(path, "manager")]) == 0
    out = capsys.readouterr().out
    check_headline_matches_json(out, json.loads(path.read_text()))


def test_report_renders_the_demo_result_with_card_date_and_command(tmp_path, capsys):
    _, result = run_demo(tmp_path, capsys, "manager")
    report = runpy.run_path(str(ROOT / "benchmarks" / "report.py"), run_name="report")
    text = report["report"](tmp_path)
    assert "(demo_manager.json)" in text
    assert f"card: {result['card']}; date: {result['date']}" in text
    assert f"command: `{result['command']}`" in text
    assert f"{result['saved_fraction']:.1%}" in text


def test_report_rewrites_only_the_results_section(tmp_path, capsys):
    run_demo(tmp_path, capsys, "manager")
    report = runpy.run_path(str(ROOT / "benchmarks" / "report.py"), run_name="report")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n{report['BEGIN']}\nold table\n{report['END']}\n\n## After\n")
    report["main"](["--results", str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert "old table" not in text and "(demo_manager.json)" in text
    assert text.startswith("# Title\n\n## Results\n") and text.endswith(f"{report['END']}\n\n## After\n")


def test_report_shows_any_results_file_even_after_its_format_changes(tmp_path):
    report = runpy.run_path(str(ROOT / "benchmarks" / "report.py"), run_name="report")
    row = {"workload": "W1", "scheduling": "static", "requests_per_s": 3.25, "latency": {"p50": 0.125}}
    # a throughput file without the keys its table expects falls back to the rows as they are, flattened
    (tmp_path / "throughput_x.json").write_text(json.dumps({"device": "some card", "results": [row]}))
    text = report["report"](tmp_path)
    assert "card: some card" in text and "command: not recorded" in text
    header, _, line = text.split("\n\n")[-1].strip().splitlines()
    assert header.split(" | ")[1:3] == ["scheduling", "requests_per_s"] and "latency p50" in header
    assert line == "| W1 | static | 3.25 | 0.125 |"


def test_readme_shows_one_run_per_benchmark_and_card_and_names_the_others(tmp_path):
    report = runpy.run_path(str(ROOT / "benchmarks" / "report.py"), run_name="report")
    for name, card in (("kernels_cardA", "A"), ("kernels_cardA_variant", "A"), ("kernels_cardB", "B")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"card": card, "rows": [{"x": 1, "y": 2}]}))
    readme = report["report"](tmp_path, all_files=False)
    assert "(kernels_cardA.json)" in readme and "(kernels_cardB.json)" in readme
    assert "(kernels_cardA_variant.json)" not in readme and "kernels_cardA_variant.json" in readme.splitlines()[-1]
    assert "(kernels_cardA_variant.json)" in report["report"](tmp_path)  # the full report keeps every file


def test_the_prefill_profile_is_its_own_benchmark_beside_the_decode_profile(tmp_path):
    report = runpy.run_path(str(ROOT / "benchmarks" / "report.py"), run_name="report")
    (tmp_path / "profile_cardA.json").write_text(json.dumps({"card": "A", "rows": [{"batch": 1}]}))
    step = {"tokens": 8000, "sequences": 20, "host_step_ms": 9.5, "device_idle_in_span": 0.2,
            "parts_ms": {"gemm": 7.5, "sampling": 0.02}, "bounds_ms": {"gemm": 8.0}}
    (tmp_path / "profile_prefill_cardA.json").write_text(json.dumps(
        {"card": "A", "kinds": [{"kind": "W1-like", "prompt_lens": [128, 512], "untraced_step_ms": [10.0, 12.5, 11.0],
                                 "steps": [step]}]}))
    readme = report["report"](tmp_path, all_files=False)
    assert "(profile_cardA.json)" in readme
    assert "### Prefill step profile: GPU time per part against its bound (profile_prefill_cardA.json)" in readme
    assert "| W1-like U[128, 512] | 8,000 | 20 | 7.52 | 9.5 | 11 | 7.500 / 8.000 | 0.020 |" in readme
