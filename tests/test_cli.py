"""The ``pagedattention`` command line: every level has help a newcomer can follow, ``generate`` prints the
engine's completions, ``bench`` hands its arguments to the scripts untouched."""
import json
import os
import re
import runpy
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
    from pagedattention import LLM, SamplingParams
    return LLM, SamplingParams


def generate_error(argv, capsys) -> tuple[int, str]:
    """(exit status, what the user sees on stderr) of a ``generate`` that fails."""
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", *argv])
    code = e.value.code
    if isinstance(code, str):  # the interpreter prints it on stderr and exits with 1
        return 1, code + "\n"
    return code, capsys.readouterr().err


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
    for option in ("--model", "--temperature", "--top-p", "--top-k", "--max-tokens", "--seed", "--n", "--stop",
                   "--json", "--file", "--beam-width", "--length-penalty"):
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
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert [c["index"] for c in record["outputs"]] == [0, 1, 2]
    # greedy children of one prompt all follow the same argmax path
    assert len({tuple(c["token_ids"]) for c in record["outputs"]}) == 1
    _, text = run_cli(["generate", "Shared prompt", "--n", "2", "--max-tokens", "4", *GREEDY], capsys)
    assert "[0.0] " in text and "[0.1] " in text


def test_generate_beam_search_prints_the_engines_hypotheses_best_first(capsys):
    LLM, _ = engine()
    from pagedattention import BeamSearchParams
    argv = ["generate", "The best way to", "--beam-width", "3", "--max-tokens", "4", "--json", "--ignore-eos",
            "--no-progress", "--device", "cpu"]
    code, out = run_cli(argv, capsys)
    assert code == 0
    (record,) = [json.loads(line) for line in out.splitlines()]
    (expected,) = LLM(None, device="cpu").beam_search(
        ["The best way to"], BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True))
    assert [c["token_ids"] for c in record["outputs"]] == [s.token_ids for s in expected.sequences]
    assert [c["text"] for c in record["outputs"]] == [s.text for s in expected.sequences]
    logprobs = [c["cumulative_logprob"] for c in record["outputs"]]
    assert logprobs == pytest.approx([s.cum_logprob for s in expected.sequences])
    assert logprobs == sorted(logprobs, reverse=True)  # equal lengths (EOS ignored): best = highest logprob
    assert [c["finish_reason"] for c in record["outputs"]] == ["length"] * 3


def test_beam_search_json_has_the_fields_of_sampling_json(capsys):
    LLM, SamplingParams = engine()
    prompt = "Fields of"
    common = ["--max-tokens", "3", "--json", "--ignore-eos", "--no-progress", "--device", "cpu"]
    _, sampled = run_cli(["generate", prompt, "--temperature", "0", *common], capsys)
    _, beams = run_cli(["generate", prompt, "--beam-width", "2", *common], capsys)
    sampled, beams = json.loads(sampled), json.loads(beams)
    assert beams.keys() == sampled.keys()
    assert all(c.keys() == sampled["outputs"][0].keys() for c in beams["outputs"])
    assert {"prompt", "prompt_token_ids", "outputs"} <= sampled.keys()
    assert {"index", "text", "token_ids", "finish_reason", "cumulative_logprob"} <= sampled["outputs"][0].keys()
    (expected,) = LLM(None, device="cpu").generate(prompt, SamplingParams(temperature=0, max_tokens=3,
                                                                          ignore_eos=True), use_tqdm=False)
    assert beams["prompt"] == sampled["prompt"] == prompt
    assert beams["prompt_token_ids"] == sampled["prompt_token_ids"] == expected.prompt_token_ids
    assert sampled["outputs"][0]["cumulative_logprob"] == pytest.approx(expected.outputs[0].cumulative_logprob)
    assert [c["index"] for c in beams["outputs"]] == [0, 1]


def test_stop_strings_end_the_completion(capsys):
    LLM, SamplingParams = engine()
    llm = LLM(None, device="cpu")
    for prompt in ("Once upon a time", "The sky is", "Hello, my name is", "1 2 3"):
        (full,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
        text = full.outputs[0].text
        stops = [ch for ch in text[1:] if ch.isascii() and ch.isprintable() and ch != " "]
        if stops:
            break
    else:
        pytest.skip("the tiny model's greedy texts hold no printable ASCII character to stop at")
    stop = stops[0]
    code, out = run_cli(["generate", prompt, "--max-tokens", "24", "--stop", stop, "--stop", "\u2603", "--json",
                         *GREEDY], capsys)
    assert code == 0
    (completion,) = json.loads(out)["outputs"]
    assert completion["text"] == text[:text.index(stop)]
    assert completion["finish_reason"] == "stop"
    assert completion["token_ids"] == full.outputs[0].token_ids[:len(completion["token_ids"])]


# --- errors: one line, naming the flag


def write_checkpoint(path, config: str | None, weights: bytes | None = None):
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(config)
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return path


LLAMA_CONFIG = json.dumps({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                           "max_position_embeddings": 128, "rms_norm_eps": 1e-6})


@pytest.mark.parametrize("checkpoint", ["missing", "no-config", "bad-json", "no-weights", "bad-weights", "a-file"])
def test_model_loading_errors_are_one_line(tmp_path, capsys, checkpoint):
    engine()
    path = {"missing": lambda: tmp_path / "missing",
            "no-config": lambda: write_checkpoint(tmp_path / "ckpt", None),
            "bad-json": lambda: write_checkpoint(tmp_path / "ckpt", "{"),
            "no-weights": lambda: write_checkpoint(tmp_path / "ckpt", LLAMA_CONFIG),
            "bad-weights": lambda: write_checkpoint(tmp_path / "ckpt", LLAMA_CONFIG, os.urandom(64)),
            "a-file": lambda: write_checkpoint(tmp_path / "ckpt", None) / "README"}[checkpoint]()
    if checkpoint == "a-file":
        path.write_text("not a checkpoint")
    code, err = generate_error(["Hi", "--model", str(path), "--no-progress", "--device", "cpu"], capsys)
    assert code != 0
    assert err.startswith("pagedattention generate: error: ") and err.count("\n") == 1, err
    assert str(tmp_path) in err  # names the file or directory at fault


def test_model_loading_error_in_a_real_process_prints_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pagedattention", "generate", "Hi", "--model",
                             str(write_checkpoint(tmp_path / "ckpt", "[1, 2]")), "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("pagedattention generate: error: ") and "config.json" in line


@pytest.mark.parametrize("argv,flag", [
    (["--max-tokens", "0"], "--max-tokens"), (["--top-p", "0"], "--top-p"), (["--top-k", "-2"], "--top-k"),
    (["--temperature", "-1"], "--temperature"), (["--n", "0"], "--n"), (["--stop", ""], "--stop"),
    (["--block-size", "0"], "--block-size"), (["--max-model-len", "1"], "--max-model-len"),
    (["--max-model-len", "1000000"], "--max-model-len"), (["--dtype", "float8"], "--dtype"),
    (["--device", "tpu"], "--device"), (["--beam-width", "0"], "--beam-width"),
    (["--beam-width", "2", "--max-tokens", "0"], "--max-tokens"),
    (["--beam-width", "2", "--length-penalty", "nan"], "--length-penalty"),
    (["--model", ""], "--model")])
def test_errors_name_the_flag_not_the_api_argument(capsys, argv, flag):
    engine()
    code, err = generate_error(["Hi", *argv, "--no-progress"], capsys)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("pagedattention generate: error: ")
    assert flag in err, err
    api_name = flag.removeprefix("--").replace("-", "_")
    assert re.search(rf"(?<![-\w]){api_name}\b", err) is None, err


def test_flag_names_replace_only_argument_names():
    assert cli.with_flag_names("max_tokens must be >= 1, got 0") == "--max-tokens must be >= 1, got 0"
    assert cli.with_flag_names("max_model_len=9 exceeds the model's max_position_embeddings=8") == \
        "--max-model-len=9 exceeds the model's max_position_embeddings=8"
    untouched = ["/ckpt/seed/config.json: not readable JSON", "tensor 'model.n' has shape [2]",
                 "the model's n_layers must be > 0", "token ids outside the vocabulary"]
    for message in untouched:
        assert cli.with_flag_names(message) == message


@pytest.mark.parametrize("flag", [["--n", "2"], ["--temperature", "0.5"], ["--top-p", "0.9"], ["--top-k", "5"],
                                  ["--seed", "1"], ["--stop", "x"]])
def test_sampling_flags_with_beam_width_are_refused(capsys, flag):
    code, err = generate_error(["Hi", "--beam-width", "2", *flag], capsys)
    assert code == 2
    assert f"{flag[0]} cannot be used with --beam-width" in err


def test_length_penalty_without_beam_width_is_refused(capsys):
    code, err = generate_error(["Hi", "--length-penalty", "0.5"], capsys)
    assert code == 2
    assert "--length-penalty" in err and "--beam-width" in err


def test_unreadable_prompt_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xff\xfe not utf-8 \x80")
    code, err = generate_error(["--file", str(path)], capsys)
    assert code == 1 and err.count("\n") == 1 and f"--file {path}" in err


@pytest.mark.parametrize("name,script", [("kernels", "bench_kernels.py"), ("prefill", "bench_prefill.py")])
def test_gpu_benchmarks_on_a_cpu_say_so_in_one_line(capsys, name, script):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    code = cli.main(["bench", name])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.startswith(f"{script} needs a CUDA GPU") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err + captured.out


def test_tiny_sharing_benchmark_prints_tables_and_keeps_committed_results(tmp_path, capsys):
    engine()
    module = runpy.run_path(str(cli.REPO_ROOT / "benchmarks" / "bench_sharing.py"), run_name="bench_sharing")
    scope = module["main"].__globals__  # the module the function runs in
    scope["RESULTS"], scope["SCRATCH"] = tmp_path / "results", tmp_path / "scratch"
    assert module["main"](["--tiny", "--num-requests", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "{'" not in out and "workload" in out and "prefix caching" in out
    assert not (tmp_path / "results").exists()
    report = json.loads((tmp_path / "scratch" / "sharing_cpu_tiny.json").read_text())
    for row in report["sharing"]:  # one table line per run, with its saving
        line = f"{row['workload']:<18} {row['sharing']:<7} {row['n']:>2} "
        assert any(l.startswith(line) and f"{row['kv_memory_saving_pct']:.1f}%" in l for l in out.splitlines())
