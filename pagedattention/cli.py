"""The ``pagedattention`` command line: generate text, run the benchmarks, run the memory demo.

    pagedattention generate "Once upon a time" --max-tokens 32
    pagedattention bench kernels
    pagedattention demo memory

``generate`` drives the same ``LLM`` / ``SamplingParams`` API a Python user calls. ``bench`` and
``demo`` run the scripts under ``benchmarks/`` and ``examples/`` of a source checkout, passing every
argument after the subcommand through, so each script's own ``--help`` is the reference.
"""
from __future__ import annotations

import argparse
import json
import re
import runpy
import sys
import warnings
from pathlib import Path
from typing import NoReturn

# The scripts live in the source checkout, next to the package (an editable install points here).
REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = {
    "kernels": ("benchmarks/bench_kernels.py", "decode kernels V1/V2 vs torch SDPA and the copy roofline (GPU)"),
    "prefill": ("benchmarks/bench_prefill.py", "paged prefill kernel vs torch SDPA flash (GPU)"),
    "throughput": ("benchmarks/benchmark_throughput.py", "continuous vs static batching on W1/W2, and HF transformers"),
    "sharing": ("benchmarks/bench_sharing.py", "parallel sampling, beam search and prefix caching memory"),
}
DEMOS = {
    "memory": ("examples/demo_memory.py", "KV memory of many requests sharing one long system prompt"),
}

GENERATE_EPILOG = """\
examples:
  pagedattention generate "Hello, my name is"                 # embedded tiny model, random weights
  pagedattention generate "Hello" "The sky is" --temperature 0 --max-tokens 20
  pagedattention generate --model ~/models/Qwen2.5-0.5B-Instruct --file prompts.txt --json
  pagedattention generate "Tell me a story" --n 4 --temperature 0.8 --seed 1
  pagedattention generate "The best way to" --beam-width 4 --max-tokens 16
  pagedattention generate "Q: Name a color. A:" --stop "Q:" --stop "." --temperature 0
  echo "From stdin" | pagedattention generate --file -

Without --model the embedded tiny model (random weights, byte tokenizer) is used: it runs anywhere
with nothing downloaded, and its text is gibberish by design. --model takes a Hugging Face checkpoint
directory (config.json, *.safetensors, tokenizer files) of a Llama, Qwen2 or Qwen3 model.
"""

BENCH_EPILOG = """\
examples:
  pagedattention bench kernels                      # on a GPU: writes benchmarks/results/kernels_*.json
  pagedattention bench throughput --tiny            # a quick CPU run with the embedded model
  pagedattention bench sharing --tiny               # seconds on a CPU; writes to a scratch directory
  pagedattention bench throughput --help            # the script's own options

Every argument after the benchmark's name goes to its script unchanged.
Tables for the README: python benchmarks/report.py
"""

DEMO_EPILOG = """\
examples:
  pagedattention demo memory                          # sizes chosen for the device (GPU or CPU)
  pagedattention demo memory --num-requests 8 --prompt-len 256 --answer-len 16
  pagedattention demo memory --json demo.json         # a name that claims another device is refused
  pagedattention demo memory --help                   # the demo's own options
"""

MAIN_EPILOG = """\
examples:
  pagedattention generate "Hello, my name is" --max-tokens 16
  pagedattention demo memory
  pagedattention bench throughput --tiny
  python -m pagedattention --help                   # the same command line

Run "pagedattention COMMAND --help" for each command's options.
"""


def listing(scripts: dict) -> str:
    return "\n".join(f"  {name:<11} {what}  ({path})" for name, (path, what) in scripts.items())


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="pagedattention",
        description="A compact PagedAttention inference engine: paged KV cache, continuous batching, "
                    "Numba CUDA kernels.",
        epilog=MAIN_EPILOG, formatter_class=formatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"pagedattention {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "generate", help="generate completions for prompts", epilog=GENERATE_EPILOG,
        formatter_class=formatter,
        description="Generate completions for one or more prompts with the LLM engine.")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (one argument per prompt)")
    gen.add_argument("--file", metavar="PATH",
                     help="read prompts from a file, one per line (blank lines skipped; '-' = stdin)")
    gen.add_argument("--model", metavar="DIR", default=None,
                     help="Hugging Face checkpoint directory (default: the embedded tiny model)")
    # Sampling flags default to None so that giving one with --beam-width can be refused; SAMPLING_DEFAULTS
    # fills in the rest.
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, help="0 = greedy (default: 1.0)")
    sampling.add_argument("--top-p", type=float, help="nucleus sampling mass (default: 1.0 = off)")
    sampling.add_argument("--top-k", type=int, help="keep the k likeliest tokens (default: -1 = off)")
    sampling.add_argument("--seed", type=int, help="seed for reproducible sampling")
    sampling.add_argument("--n", type=int,
                          help="completions per prompt; they share the prompt's KV blocks (default: 1)")
    sampling.add_argument("--stop", action="append", metavar="TEXT",
                          help="end a completion when it produces TEXT (cut from the text); repeatable")
    both = gen.add_argument_group("sampling and beam search")
    both.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per completion (default: 32)")
    both.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    beam = gen.add_argument_group("beam search (instead of sampling)")
    beam.add_argument("--beam-width", type=int, default=None,
                      help="keep the W likeliest hypotheses per step; beams share KV blocks (copy-on-write)")
    beam.add_argument("--length-penalty", type=float, default=None,
                      help="hypotheses ranked by cum. logprob / length**penalty (default: 1.0)")
    engine = gen.add_argument_group("engine")
    engine.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    engine.add_argument("--dtype", default="auto",
                        help="float16, bfloat16, float32 or auto (default: bf16 on CUDA, fp32 on CPU)")
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    engine.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output in tokens (default: the model's limit)")
    engine.add_argument("--enable-prefix-caching", action="store_true",
                        help="reuse the KV blocks of prompts that share a prefix")
    output = gen.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object per prompt (JSON lines)")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    engine.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="split the model over N processes (GPUs; on a CPU, gloo ranks) (default: 1)")
    gen.set_defaults(func=run_generate, parser=gen)

    bench = commands.add_parser(
        "bench", help="run a benchmark script", epilog=BENCH_EPILOG, formatter_class=formatter,
        description="Run one of the benchmark scripts under benchmarks/ (they write JSON under "
                    "benchmarks/results/).\n\n" + listing(BENCHMARKS))
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS), metavar="BENCHMARK", help="which benchmark (above)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    bench.set_defaults(func=run_bench)

    demo = commands.add_parser(
        "demo", help="run a demo", epilog=DEMO_EPILOG, formatter_class=formatter,
        description="Run a demo under examples/.\n\n" + listing(DEMOS))
    demo.add_argument("demo", choices=sorted(DEMOS), metavar="DEMO", help="which demo (above)")
    demo.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the demo")
    demo.set_defaults(func=run_demo)

    from .serve import add_serve_parser  # argparse only: FastAPI and the model load when the server starts
    add_serve_parser(commands)
    return parser


# --- generate ---------------------------------------------------------------------------------------

def read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.file is not None:
        if args.file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            path = Path(args.file).expanduser()
            if not path.is_file():
                fail(f"--file {args.file}: no such file")
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                fail(f"--file {args.file}: {e}")
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        fail("no prompt given (pass PROMPT arguments or --file PATH)")
    return prompts


SAMPLING_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=-1, seed=None, n=1, stop=None)
# The flag of every API argument the generate flags set, for messages: the engine names `max_tokens`, the
# user typed `--max-tokens`.
FLAG_OF = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "max_tokens": "--max-tokens",
           "seed": "--seed", "n": "--n", "stop": "--stop", "ignore_eos": "--ignore-eos",
           "beam_width": "--beam-width", "length_penalty": "--length-penalty", "model": "--model",
           "device": "--device", "dtype": "--dtype", "block_size": "--block-size", "max_model_len": "--max-model-len",
           "enable_prefix_caching": "--enable-prefix-caching", "tensor_parallel_size": "--tensor-parallel-size"}
# An API name where a message uses it as the name of a value: "max_tokens must be", "max_model_len=9000",
# "stop strings must be"; not inside other words or paths.
_API_NAME = re.compile(r"(?<![\w./-])(" + "|".join(sorted(FLAG_OF, key=len, reverse=True)) +
                       r")(?=\s+must\b|\s+strings\b|\s+exceeds\b|=)")


def with_flag_names(message: str) -> str:
    """``message`` with the API argument names it mentions replaced by the flags that set them."""
    return _API_NAME.sub(lambda m: FLAG_OF[m.group(1)], message)


def check_flag_combinations(args) -> None:
    """Flags that have no effect together are refused (argparse error, exit status 2), not ignored."""
    if args.beam_width is not None:
        given = [FLAG_OF[name] for name in SAMPLING_DEFAULTS if getattr(args, name) is not None]
        if given:
            args.parser.error(f"{', '.join(given)} cannot be used with --beam-width: beam search keeps the "
                              "likeliest hypotheses, it does not sample")
    elif args.length_penalty is not None:
        args.parser.error("--length-penalty only applies to beam search: add --beam-width")


def sampling_kwargs(args) -> dict:
    kwargs = {name: default if getattr(args, name) is None else getattr(args, name)
              for name, default in SAMPLING_DEFAULTS.items()}
    kwargs.update(max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    return kwargs


def engine_kwargs(args) -> dict:
    kwargs = dict(dtype=args.dtype, device=args.device, block_size=args.block_size)
    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
    if args.enable_prefix_caching:
        kwargs["enable_prefix_caching"] = True
    if args.tensor_parallel_size != 1:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    return kwargs


def completion_record(index: int, text: str, token_ids, cumulative_logprob: float, finish_reason: str | None,
                      error: str | None = None) -> dict:
    """One completion in ``--json`` output: the same fields for a sample and a beam."""
    record = {"index": index, "text": text, "token_ids": list(token_ids),
              "cumulative_logprob": cumulative_logprob, "finish_reason": finish_reason}
    if error:
        record["error"] = error
    return record


def output_record(request_output) -> dict:
    return {"prompt": request_output.prompt, "prompt_token_ids": list(request_output.prompt_token_ids),
            "outputs": [completion_record(c.index, c.text, c.token_ids, c.cumulative_logprob, c.finish_reason,
                                          c.error) for c in request_output.outputs]}


def beam_record(prompt: str, prompt_token_ids, beam_output, eos_token_ids) -> dict:
    """A beam search's hypotheses, best first, as ``output_record`` shows samples; a hypothesis that ends
    with an end-of-text token stopped, any other reached --max-tokens (or the model's length)."""
    outputs = [completion_record(i, s.text, s.token_ids, s.cum_logprob,
                                 "stop" if s.token_ids and s.token_ids[-1] in eos_token_ids else "length")
               for i, s in enumerate(beam_output.sequences)]
    return {"prompt": prompt, "prompt_token_ids": list(prompt_token_ids), "outputs": outputs}


def print_text(outputs, out) -> None:
    for i, request_output in enumerate(outputs):
        print(f"[{i}] prompt: {request_output.prompt!r}", file=out)
        for c in request_output.outputs:
            label = f"[{i}]" if len(request_output.outputs) == 1 else f"[{i}.{c.index}]"
            detail = f"{c.finish_reason}, {len(c.token_ids)} tokens"
            if c.finish_reason == "error" and c.error:
                detail += f": {c.error}"
            print(f"{label} {c.text!r}  ({detail})", file=out)


def run_generate(args) -> int:
    check_flag_combinations(args)
    prompts = read_prompts(args)
    from . import LLM, BeamSearchParams, SamplingParams  # torch loads here, not for --help
    beam = args.beam_width is not None
    # Bad flag values, a checkpoint that cannot be loaded and prompts the engine refuses all end here, before
    # anything runs: one line naming the flag or file, no traceback.
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            if beam:
                length_penalty = 1.0 if args.length_penalty is None else args.length_penalty
                params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.max_tokens,
                                          length_penalty=length_penalty, ignore_eos=args.ignore_eos)
            else:
                params = SamplingParams(**sampling_kwargs(args))
            llm = LLM(args.model, **engine_kwargs(args))
            if beam:
                outputs = llm.beam_search(prompts, params, use_tqdm=not args.no_progress)
            else:
                outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    except (TypeError, ValueError, OSError) as e:
        fail(with_flag_names(str(e)))
    if beam:
        print_beam_search(args, llm, prompts, outputs)
    elif args.json:
        for request_output in outputs:
            print(json.dumps(output_record(request_output), ensure_ascii=False))
    else:
        print_text(outputs, sys.stdout)
    return 0


def print_beam_search(args, llm, prompts: list[str], outputs) -> None:
    for i, (prompt, beam_output) in enumerate(zip(prompts, outputs)):
        if args.json:
            record = beam_record(prompt, llm.tokenizer.encode(prompt), beam_output, llm.eos_token_ids)
            print(json.dumps(record, ensure_ascii=False))
            continue
        print(f"[{i}] prompt: {prompt!r}")
        for rank, s in enumerate(beam_output.sequences):
            print(f"[{i}.{rank}] {s.text!r}  (cum. logprob {s.cum_logprob:.3f}, {len(s.token_ids)} tokens)")


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The engine's warnings (e.g. a KV cache that lowers --max-model-len) as one line, flag names included."""
    print(f"pagedattention generate: warning: {with_flag_names(str(message))}", file=file or sys.stderr)


def fail(message: str) -> NoReturn:
    """End the command with one line on stderr and exit status 1."""
    raise SystemExit(f"pagedattention generate: error: {message}")


# --- bench / demo: scripts of the source checkout -----------------------------------------------------

def script_path(relative: str) -> Path:
    path = REPO_ROOT / relative
    if not path.is_file():
        raise SystemExit(f"pagedattention: {relative} not found under {REPO_ROOT}; the benchmarks and "
                         "examples ship with the source checkout (pip install -e . from it)")
    return path


def run_script(path: Path, argv: list[str]) -> int:
    """Run a script as ``python path argv...`` would, in this process."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *argv]
    sys.path.insert(0, str(path.parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:  # a script's argparse --help, sys.exit(main()) or SystemExit("message")
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # what the interpreter prints for a script run on its own
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def run_bench(args) -> int:
    return run_script(script_path(BENCHMARKS[args.benchmark][0]), args.args)


def run_demo(args) -> int:
    path = script_path(DEMOS[args.demo][0])
    module = runpy.run_path(str(path), run_name="pagedattention_demo")  # defines main without running it
    result = module["main"](args.args)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
