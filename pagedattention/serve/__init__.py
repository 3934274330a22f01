"""An OpenAI-compatible HTTP server over the engine: ``pagedattention serve`` or
``python -m pagedattention.serve --model DIR --port 8000``.

    protocol.py        request bodies, their SamplingParams, OpenAI's error shape
    async_engine.py    the engine thread that owns the LLM; per-request output streams
    openai_serving.py  /v1/completions and /v1/chat/completions (streamed or not)
    chat_template.py   a checkpoint's chat template
    metrics.py         Prometheus text for /metrics
    api_server.py      the FastAPI app and the uvicorn server that drains on SIGTERM
    command.py         the command line
"""
from .command import add_serve_parser, main

__all__ = ["add_serve_parser", "main"]
