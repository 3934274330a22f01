"""The OpenAI request bodies the server accepts, their mapping onto ``SamplingParams``, and the error shape.

Bodies are validated strictly (a string where a number belongs is a 400, not a coercion); fields OpenAI
defines that the engine cannot honour are refused by name rather than ignored, and unknown fields are
ignored as OpenAI's own server does. Extras beyond OpenAI's fields, as vLLM accepts them: ``top_k``,
``min_tokens``, ``ignore_eos``.
"""
from __future__ import annotations

import json
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered in OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_calls...: passed to the template
    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list | None = None


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """The request body as ``model``; malformed JSON and wrong fields are 400s naming what is wrong."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(part) for part in err["loc"]]
        # a union's errors name the member type tried ("prompt.str"); the field path is what the user wrote
        path = ".".join(p for p in loc if not p.startswith(("list[", "dict[")) and p not in ("str", "int"))
        what = "is required" if err["type"] == "missing" else f"is invalid: {err['msg']}"
        if err["type"] != "missing" and len(e.errors()) > 1 and len(loc) > 1 and loc[0] == "prompt":
            what = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        raise bad_request(f"'{path or loc[0]}' {what}", param=loc[0] if loc else None) from None


def sampling_kwargs(req: _Request, max_tokens: int | None, logprobs: int | None) -> dict:
    """The SamplingParams keywords of a request; unset fields keep the OpenAI defaults."""
    if req.logit_bias:
        raise bad_request("'logit_bias' is not supported", param="logit_bias")
    kwargs = dict(n=req.n, ignore_eos=req.ignore_eos, seed=req.seed)
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_tokens"):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop:
        if any(not s for s in stop):
            raise bad_request("'stop' strings must be non-empty", param="stop")
        kwargs["stop"] = list(stop)
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    return kwargs


def completion_sampling_kwargs(req: CompletionRequest) -> dict:
    if req.echo:
        raise bad_request("'echo' is not supported", param="echo")
    if req.suffix is not None:
        raise bad_request("'suffix' is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("'best_of' other than n is not supported", param="best_of")
    return sampling_kwargs(req, req.max_tokens, req.logprobs)


def chat_sampling_kwargs(req: ChatCompletionRequest, max_tokens: int) -> dict:
    if req.tools:
        raise bad_request("'tools' are not supported", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return sampling_kwargs(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    """max_completion_tokens (the newer name) wins over max_tokens; None: up to the model's length."""
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def error_param(message: str, fields: tuple[str, ...]) -> str | None:
    """The field an engine error message starts with ("temperature must be ..."), for the error's ``param``."""
    first = message.split(" ", 1)[0].split("=", 1)[0].rstrip(":")
    return first if first in fields else None


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "min_tokens", "stop", "seed", "n", "logprobs",
                   "presence_penalty", "frequency_penalty", "ignore_eos")
