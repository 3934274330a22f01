"""The HTTP app (FastAPI) and its server (uvicorn), which drains on SIGTERM.

    POST /v1/completions, /v1/chat/completions   OpenAI's API (openai_serving.py)
    GET  /v1/models, /health, /metrics           the served model, liveness, Prometheus text

Every error, including a malformed body or an unknown route, is answered in OpenAI's JSON error shape.
SIGTERM (or Ctrl-C) drains: the listening socket closes, new requests on open connections get 503, the
requests already accepted run to their end, then the engine thread stops and the process exits.
"""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse

from .async_engine import AsyncEngine
from .openai_serving import OpenAIServing
from .protocol import APIError

logger = logging.getLogger("pagedattention.serve")


def build_app(engine: AsyncEngine, serving: OpenAIServing) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="pagedattention", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown route, wrong method
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logger.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {e}", type="internal_server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        if engine.error is not None:
            raise APIError(503, str(engine.error), type="service_unavailable_error")
        if engine.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable_error")
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": serving.model_name, "object": "model", "created": created, "owned_by": "pagedattention",
            "max_model_len": serving.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.snapshot, engine.num_in_flight),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serving.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serving.chat_completions(request)

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which also refuses new requests (503) once asked to exit."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        if not self.engine.draining:
            logger.info("draining: finishing %d requests in flight, accepting no new ones", self.engine.num_in_flight)
        self.engine.draining = True
        super().handle_exit(sig, frame)


def serve(engine: AsyncEngine, serving: OpenAIServing, host: str, port: int, log_level: str = "info",
          access_log: bool = True) -> None:
    """Run the server until SIGTERM/SIGINT, then drain and return."""
    config = uvicorn.Config(build_app(engine, serving), host=host, port=port, log_level=log_level,
                            access_log=access_log, timeout_keep_alive=30)
    DrainingServer(config, engine).run()
