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
import runpy
import sys
from pathlib import Path

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
  echo "From stdin" | pagedattention generate --file -

Without --model the embedded tiny model (random weights, byte tokenizer) is used: it runs anywhere
with nothing downloaded, and its text is gibberish by design. --model takes a Hugging Face checkpoint
directory (config.json, *.safetensors, tokenizer files) of a Llama, Qwen2 or Qwen3 model.
"""

BENCH_EPILOG = """\
examples:
  pagedattention bench kernels                      # on a GPU: writes benchmarks/results/kernels_*.json
  pagedattention bench throughput --tiny            # a quick CPU run with the embedded model
  pagedattention bench sharing --tiny
  pagedattention bench throughput --help            # the script's own options

Every argument after the benchmark's name goes to its script unchanged.
Tables for the README: python benchmarks/report.py
"""

DEMO_EPILOG = """\
examples:
  pagedattention demo memory                          # sizes chosen for the device (GPU or CPU)
  pagedattention demo memory --num-requests 8 --prompt-len 256 --answer-len 16
  pagedattention demo memory --json benchmarks/results/demo_memory.json
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
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    sampling.add_argument("--top-k", type=int, default=-1, help="keep the k likeliest tokens (default: -1 = off)")
    sampling.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per completion (default: 32)")
    sampling.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    sampling.add_argument("--n", type=int, default=1,
                          help="completions per prompt; they share the prompt's KV blocks (default: 1)")
    sampling.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    beam = gen.add_argument_group("beam search (instead of sampling)")
    beam.add_argument("--beam-width", type=int, default=None,
                      help="keep the W likeliest hypotheses per step; beams share KV blocks (copy-on-write)")
    beam.add_argument("--length-penalty", type=float, default=1.0,
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
    gen.set_defaults(func=run_generate)

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
                raise SystemExit(f"pagedattention generate: --file {args.file}: no such file")
            lines = path.read_text(encoding="utf-8").splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise SystemExit("pagedattention generate: no prompt given (pass PROMPT arguments or --file PATH)")
    return prompts


def sampling_kwargs(args) -> dict:
    kwargs = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos)
    if args.n != 1:  # only named when used, so n=1 runs on an engine without parallel sampling
        kwargs["n"] = args.n
    return kwargs


def engine_kwargs(args) -> dict:
    kwargs = dict(dtype=args.dtype, device=args.device, block_size=args.block_size)
    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
    if args.enable_prefix_caching:
        kwargs["enable_prefix_caching"] = True
    return kwargs


def output_record(request_output) -> dict:
    return {
        "prompt": request_output.prompt,
        "prompt_token_ids": list(request_output.prompt_token_ids),
        "outputs": [{"index": c.index, "text": c.text, "token_ids": list(c.token_ids),
                     "finish_reason": c.finish_reason,
                     **({"error": c.error} if getattr(c, "error", None) else {})}
                    for c in request_output.outputs],
    }


def beam_record(prompt: str, beam_output) -> dict:
    return {"prompt": prompt,
            "outputs": [{"index": i, "text": s.text, "token_ids": list(s.token_ids), "cum_logprob": s.cum_logprob}
                        for i, s in enumerate(beam_output.sequences)]}


def print_text(outputs, out) -> None:
    for i, request_output in enumerate(outputs):
        print(f"[{i}] prompt: {request_output.prompt!r}", file=out)
        for c in request_output.outputs:
            label = f"[{i}]" if len(request_output.outputs) == 1 else f"[{i}.{c.index}]"
            detail = f"{c.finish_reason}, {len(c.token_ids)} tokens"
            if c.finish_reason == "error" and getattr(c, "error", None):
                detail += f": {c.error}"
            print(f"{label} {c.text!r}  ({detail})", file=out)


def run_generate(args) -> int:
    prompts = read_prompts(args)
    from . import LLM, SamplingParams  # torch loads here, not for --help
    try:  # bad options and inputs are refused with the engine's message, before anything runs
        if args.beam_width is not None:
            return run_beam_search(args, prompts)
        params = SamplingParams(**sampling_kwargs(args))
        llm = LLM(args.model, **engine_kwargs(args))
        outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"pagedattention generate: {e}")
    if args.json:
        for request_output in outputs:
            print(json.dumps(output_record(request_output), ensure_ascii=False))
    else:
        print_text(outputs, sys.stdout)
    return 0


def run_beam_search(args, prompts: list[str]) -> int:
    from . import LLM, BeamSearchParams
    params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.max_tokens,
                              length_penalty=args.length_penalty, ignore_eos=args.ignore_eos)
    llm = LLM(args.model, **engine_kwargs(args))
    outputs = llm.beam_search(prompts, params, use_tqdm=not args.no_progress)
    for i, (prompt, beam_output) in enumerate(zip(prompts, outputs)):
        if args.json:
            print(json.dumps(beam_record(prompt, beam_output), ensure_ascii=False))
            continue
        print(f"[{i}] prompt: {prompt!r}")
        for rank, s in enumerate(beam_output.sequences):
            print(f"[{i}.{rank}] {s.text!r}  (cum. logprob {s.cum_logprob:.3f}, {len(s.token_ids)} tokens)")
    return 0


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
    except SystemExit as e:  # a script's argparse --help or sys.exit(main())
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
