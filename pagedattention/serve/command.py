"""``pagedattention serve`` / ``python -m pagedattention.serve``: the options and the start-up.

Imports stay light here (argparse only) so ``--help`` is fast; torch, FastAPI and the model load in
``run_serve``.
"""
from __future__ import annotations

import argparse
import os

SERVE_DESCRIPTION = "Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."
SERVE_EPILOG = """\
examples:
  pagedattention serve                                   # the embedded tiny model on the CPU, port 8000
  pagedattention serve --model ~/models/Qwen2.5-0.5B-Instruct --port 8000
  pagedattention serve --scheduling static --max-num-seqs 64
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Hello", "max_tokens": 16, "temperature": 0}'

Without --model the embedded tiny model (random weights, byte tokenizer) is served as "tiny": its text is
gibberish by design and it has no chat template, so /v1/chat/completions answers 400 for it.
SIGTERM drains: running requests finish, new ones get 503, then the server exits.
"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="Hugging Face checkpoint directory (default: the embedded tiny model)")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: random weights of the checkpoint's config.json, no tokenizer (benchmarks)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model's name in the API (default: the checkpoint directory's name, or 'tiny')")
    http = parser.add_argument_group("server")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    http.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    http.add_argument("--max-queue-len", type=int, default=256,
                      help="requests held beyond the batch's max-num-seqs; more get 503 (default: 256)")
    http.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    http.add_argument("--no-access-log", action="store_true", help="do not log each HTTP request")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    engine.add_argument("--dtype", default="auto",
                        help="float16, bfloat16, float32 or auto (default: bf16 on CUDA, fp32 on CPU)")
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    engine.add_argument("--num-kv-blocks", type=int, default=None,
                        help="KV cache size in blocks (default: from --gpu-memory-utilization)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of free GPU memory for the KV cache (default: 0.9)")
    engine.add_argument("--max-num-seqs", type=int, default=256, help="sequences per batch at most (default: 256)")
    engine.add_argument("--max-num-batched-tokens", type=int, default=8192,
                        help="tokens per prefill step at most (default: 8192)")
    engine.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output in tokens (default: the model's limit)")
    engine.add_argument("--scheduling", choices=["continuous", "static"], default="continuous",
                        help="continuous batching, or static batches that admit nobody until they end")
    engine.add_argument("--enable-prefix-caching", action="store_true",
                        help="reuse the KV blocks of prompts that share a prefix")
    engine.add_argument("--attention-backend", choices=["auto", "numba", "torch"], default="auto")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    engine.add_argument("--seed", type=int, default=0, help="the engine's seed (default: 0)")
    engine.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="split the model over N processes (GPUs; on a CPU, gloo ranks) (default: 1)")
    return parser


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to a command line's subparsers; its ``func`` default runs the server."""
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                                   description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser).set_defaults(func=run_serve)
    return parser


def engine_kwargs(args) -> dict:
    return dict(device=args.device, dtype=args.dtype, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                scheduling=args.scheduling, enable_prefix_caching=args.enable_prefix_caching,
                attention_backend=args.attention_backend, enforce_eager=args.enforce_eager, seed=args.seed,
                tensor_parallel_size=args.tensor_parallel_size)


def model_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    return os.path.basename(os.path.normpath(os.path.expanduser(args.model))) if args.model else "tiny"


def run_serve(args) -> int:
    import logging

    from ..engine import LLM
    from .api_server import serve
    from .async_engine import AsyncEngine
    from .chat_template import ChatTemplate
    from .openai_serving import OpenAIServing

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    model = os.path.expanduser(args.model) if args.model else None
    try:  # bad options are refused with the engine's own message, before the port opens
        if args.load_format == "dummy":
            if model is None:
                raise ValueError("--load-format dummy needs --model (a directory with a config.json)")
            from ..models.loader import read_model_config
            llm = LLM(read_model_config(model), **engine_kwargs(args))
        else:
            llm = LLM(model, **engine_kwargs(args))
        engine = AsyncEngine(llm, max_queue_len=args.max_queue_len)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"pagedattention serve: {e}")
    chat_template = ChatTemplate.load(model) if args.load_format == "auto" else None
    serving = OpenAIServing(engine, model_name(args), chat_template)
    serve(engine, serving, args.host, args.port, log_level=args.log_level, access_log=not args.no_access_log)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedattention serve", description=SERVE_DESCRIPTION,
                                     epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    return run_serve(add_arguments(parser).parse_args(argv))
