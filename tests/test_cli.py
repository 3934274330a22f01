"""The ``pagedattention`` command line: every level has help a newcomer can follow, ``generate`` prints the
engine's completions, ``bench`` hands its arguments to the scripts untouched."""
import json
import subprocess
import sys

import pytest

from pagedattention import cli

GREEDY = ["--temperature", "0", "--ignore-eos", "--no-progress", "--device", "cpu"]


def run_cli(argv, capsys):
    """(exit code, stdout) of ``pagedattention argv...`` run in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


def engine():
    try:
        from pagedattention import LLM, SamplingParams
    except ImportError as e:
        pytest.skip(f"the engine is not importable yet: {e}")
    return LLM, SamplingParams


@pytest.mark.parametrize("argv", [[], ["generate"], ["bench"], ["demo"]], ids=["main", "generate", "bench", "demo"])
def test_every_command_has_help_with_examples(argv, capsys):
    code, out = run_cli(argv + ["--help"], capsys)
    assert code == 0
    assert out.startswith("usage: pagedattention")
    assert "examples:" in out and "pagedattention " in out.split("examples:")[1]


def test_main_help_names_every_command(capsys):
    _, out = run_cli(["--help"], capsys)
    for command in ("generate", "bench", "demo"):
        assert command in out


def test_generate_help_lists_sampling_options(capsys):
    _, out = run_cli(["generate", "--help"], capsys)
    for option in ("--model", "--temperature", "--top-p", "--top-k", "--max-tokens", "--seed", "--n", "--json", "--file"):
        assert option in out


def test_python_dash_m_is_the_same_command_line():
    result = subprocess.run([sys.executable, "-m", "pagedattention", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout and "bench" in result.stdout and "demo" in result.stdout


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bench_passes_every_argument_through(tmp_path, monkeypatch, capsys):
    script = tmp_path / "fake_bench.py"
    record = tmp_path / "argv.json"
    script.write_text(f"import json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\nsys.exit(3)\n")
    monkeypatch.setitem(cli.BENCHMARKS, "throughput", (str(script), "test script"))
    args = ["--tiny", "--workload", "W2", "-n", "5", "--help-me"]
    code, _ = run_cli(["bench", "throughput", *args], capsys)
    assert json.loads(record.read_text()) == args
    assert code == 3  # the script's exit status is the command's


@pytest.mark.parametrize("name", sorted(cli.BENCHMARKS))
def test_bench_help_is_the_scripts_own(name, capsys):
    if not (cli.REPO_ROOT / cli.BENCHMARKS[name][0]).is_file():
        pytest.skip(f"{cli.BENCHMARKS[name][0]} is not written yet")
    code, out = run_cli(["bench", name, "--help"], capsys)
    assert code == 0
    assert out.startswith("usage:")


def test_missing_script_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.DEMOS, "memory", ("examples/no_such_demo.py", "missing"))
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "memory"])
    assert "examples/no_such_demo.py not found" in str(e.value.code)


def test_generate_without_prompts_says_how_to_give_them(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate"])
    assert "no prompt given" in str(e.value.code)


def test_generate_rejects_bad_sampling_values_by_name(capsys):
    engine()
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "Hi", "--temperature", "-1", "--no-progress"])
    assert "temperature" in str(e.value.code)


def test_generate_prints_the_engines_completions(capsys):
    LLM, SamplingParams = engine()
    prompts = ["Hello, my name is", "The sky is"]
    code, out = run_cli(["generate", *prompts, "--max-tokens", "5", *GREEDY], capsys)
    assert code == 0
    expected = LLM(None, device="cpu").generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    for i, (prompt, request_output) in enumerate(zip(prompts, expected)):
        completion = request_output.outputs[0]
        assert f"[{i}] prompt: {prompt!r}" in out
        assert f"[{i}] {completion.text!r}  (length, 5 tokens)" in out


def test_generate_json_lines_and_prompt_file(tmp_path, capsys):
    engine()
    prompts = ["first prompt", "second prompt", "third"]
    path = tmp_path / "prompts.txt"
    path.write_text(f"{prompts[1]}\n\n{prompts[2]}\n")
    code, out = run_cli(["generate", prompts[0], "--file", str(path), "--json", "--max-tokens", "3", *GREEDY], capsys)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == prompts  # arguments first, then the file's lines in order
    for r in records:
        (completion,) = r["outputs"]
        assert len(completion["token_ids"]) == 3 and completion["finish_reason"] == "length"
        assert isinstance(completion["text"], str)


def test_generate_seeded_sampling_is_reproducible(capsys):
    engine()
    argv = ["generate", "Once upon a time", "--temperature", "1.0", "--seed", "7", "--max-tokens", "8",
            "--json", "--ignore-eos", "--no-progress", "--device", "cpu"]
    _, first = run_cli(argv, capsys)
    _, second = run_cli(argv, capsys)
    assert json.loads(first)["outputs"] == json.loads(second)["outputs"]


def test_generate_n_completions_per_prompt(capsys):
    engine()
    code, out = run_cli(["generate", "Shared prompt", "--n", "3", "--max-tokens", "4", "--json", *GREEDY], capsys)
    if code != 0 and "n must be 1" in str(code):
        pytest.skip("the engine has no parallel sampling yet")
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert [c["index"] for c in record["outputs"]] == [0, 1, 2]
    # greedy children of one prompt all follow the same argmax path
    assert len({tuple(c["token_ids"]) for c in record["outputs"]}) == 1
    _, text = run_cli(["generate", "Shared prompt", "--n", "2", "--max-tokens", "4", *GREEDY], capsys)
    assert "[0.0] " in text and "[0.1] " in text


def test_generate_beam_search_prints_the_engines_hypotheses_best_first(capsys):
    LLM, _ = engine()
    from pagedattention import BeamSearchParams
    argv = ["generate", "The best way to", "--beam-width", "3", "--max-tokens", "4", "--json", *GREEDY]
    code, out = run_cli(argv, capsys)
    assert code == 0
    (record,) = [json.loads(line) for line in out.splitlines()]
    (expected,) = LLM(None, device="cpu").beam_search(
        ["The best way to"], BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True))
    assert [c["token_ids"] for c in record["outputs"]] == [s.token_ids for s in expected.sequences]
    logprobs = [c["cum_logprob"] for c in record["outputs"]]
    assert logprobs == sorted(logprobs, reverse=True)  # equal lengths (EOS ignored): best = highest logprob
