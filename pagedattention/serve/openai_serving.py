"""/v1/completions and /v1/chat/completions: requests into engine requests, outputs into OpenAI responses.

The engine's outputs are cumulative (all the text so far); a stream sends the difference. Text is sent only
once it can no longer change: a trailing U+FFFD may be the first bytes of a character whose last byte has
not been generated, and the last len(stop) - 1 characters may turn out to start a stop string that the
engine then cuts. So the concatenated chunks equal the non-streamed text exactly.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..engine.sampling_params import SamplingParams
from .async_engine import AsyncEngine, RequestStream, ServerBusy
from .chat_template import ChatTemplate
from .protocol import (SAMPLING_FIELDS, APIError, ChatCompletionRequest, CompletionRequest, bad_request,
                       chat_max_tokens, chat_sampling_kwargs, completion_sampling_kwargs, error_param, parse_body)

@dataclass
class _Choice:
    """What a stream has sent of one completion."""
    text: str = ""
    num_tokens: int = 0
    text_offset: int = 0
    finished: bool = False
    role_sent: bool = False


@dataclass
class _Call:
    """One HTTP request being answered."""
    chat: bool
    id: str
    n: int
    stop: list[str]
    logprobs: int | None
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_field(self) -> str:  # the body field an error about the prompt names
        return "messages" if self.chat else "prompt"


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, chat_template: ChatTemplate | None):
        self.engine = engine
        self.model_name = model_name
        self.chat_template = chat_template
        self.tokenizer = engine.llm.tokenizer
        self.max_model_len = engine.llm.max_model_len
        self._token_texts: dict[int, str] = {}

    # --- the two endpoints ---------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        req = parse_body(await request.body(), CompletionRequest)
        self._check_model(req.model)
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
            else [req.prompt]
        if not prompts or any(not p for p in prompts):
            raise bad_request("'prompt' must not be empty", param="prompt")
        params = self._sampling_params(completion_sampling_kwargs(req))
        call = _Call(chat=False, id=f"cmpl-{uuid.uuid4().hex}", n=req.n, stop=params.stop or [],
                     logprobs=req.logprobs, include_usage=bool(req.stream_options and req.stream_options.include_usage))
        return await self._answer(call, request, prompts, params, req.stream, arrival)

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        req = parse_body(await request.body(), ChatCompletionRequest)
        self._check_model(req.model)
        if self.chat_template is None:
            raise bad_request(f"the model {self.model_name!r} has no chat template (its tokenizer config names "
                              "none): use /v1/completions", param="messages")
        prompt_ids = self.chat_template.render([m.model_dump(exclude_none=True) for m in req.messages])
        max_tokens = chat_max_tokens(req)
        if max_tokens is None:  # OpenAI's default: up to the context length
            max_tokens = max(self.max_model_len - len(prompt_ids), 1)
        params = self._sampling_params(chat_sampling_kwargs(req, max_tokens))
        call = _Call(chat=True, id=f"chatcmpl-{uuid.uuid4().hex}", n=req.n, stop=params.stop or [],
                     logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                     include_usage=bool(req.stream_options and req.stream_options.include_usage))
        return await self._answer(call, request, [prompt_ids], params, req.stream, arrival)

    # --- shared ---------------------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves `{self.model_name}`)",
                           param="model", code="model_not_found")

    @staticmethod
    def _sampling_params(kwargs: dict) -> SamplingParams:
        try:
            return SamplingParams(**kwargs)
        except (TypeError, ValueError) as e:
            raise bad_request(str(e), param=error_param(str(e), SAMPLING_FIELDS)) from None

    async def _answer(self, call: _Call, request: Request, prompts: list, params, stream: bool,
                      arrival: float) -> Response:
        try:
            outputs = await self.engine.generate(prompts, params, arrival=arrival)
        except ServerBusy as e:
            raise APIError(503, str(e), type="service_unavailable_error", code="server_busy") from None
        except RuntimeError as e:  # the engine stopped
            raise APIError(500, str(e), type="internal_server_error") from None
        except (TypeError, ValueError) as e:  # the engine's prompt checks name "prompts[0]": say which it was
            index = getattr(e, "prompt_index", 0)
            message = str(e).replace("prompts[0]", f"prompt[{index}]" if len(prompts) > 1 else "prompt", 1)
            message = message.replace("sampling_params.", "")  # the body's fields are the params
            raise bad_request(message, param=call.prompt_field if message.startswith("prompt") else
                              error_param(message, SAMPLING_FIELDS)) from None
        if stream:
            return _EventStream(self._events(call, outputs), outputs)
        return await self._full_response(call, request, outputs)

    async def _full_response(self, call: _Call, request: Request, outputs: RequestStream) -> Response:
        async def collect():
            finals = {}
            async for i, out in outputs:
                if out.finished:
                    finals[i] = out
            return [finals[i] for i in sorted(finals)]

        collector = asyncio.ensure_future(collect())
        watcher = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not collector.done():  # the client left (or this handler was cancelled): stop its requests
                collector.cancel()
                outputs.close()
        if not collector.done() or collector.cancelled():
            return Response(status_code=499)
        try:
            finals = collector.result()
        except RuntimeError as e:  # the engine failed in a step of this request
            raise APIError(500, str(e), type="internal_server_error") from None
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                if c.finish_reason == "error":  # e.g. the request cannot fit in the KV cache even alone
                    raise bad_request(c.error or "the request failed", param=call.prompt_field)
                choices.append(self._choice(call, i * call.n + c.index, c, _Choice(), c.text, 0, c.finish_reason,
                                            chunk=False))
        body = self._envelope(call, choices, chunk=False)
        body["usage"] = _usage(finals)
        return JSONResponse(body)

    async def _events(self, call: _Call, outputs: RequestStream):
        states: dict[int, _Choice] = {}
        finals = {}
        try:
            async for i, out in outputs:
                choices = []
                for c in out.outputs:
                    if c.finish_reason == "error":  # the status line is sent: the error goes in the stream
                        yield _sse(bad_request(c.error or "the request failed", param=call.prompt_field).body())
                        yield "data: [DONE]\n\n"
                        return
                    index = i * call.n + c.index
                    state = states.setdefault(index, _Choice())
                    if state.finished:
                        continue
                    finished = c.finish_reason is not None
                    text = c.text if finished else _stable(c.text, call.stop)
                    delta = text[len(state.text):] if text.startswith(state.text) else ""
                    if not delta and len(c.token_ids) == state.num_tokens and not finished:
                        continue
                    choices.append(self._choice(call, index, c, state, delta, state.num_tokens,
                                                c.finish_reason if finished else None, chunk=True))
                    state.text += delta
                    state.num_tokens, state.finished = len(c.token_ids), finished
                if out.finished:
                    finals[i] = out
                if choices:
                    chunk = self._envelope(call, choices, chunk=True)
                    if call.include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
            if call.include_usage:
                chunk = self._envelope(call, [], chunk=True)
                chunk["usage"] = _usage([finals[i] for i in sorted(finals)])
                yield _sse(chunk)
            yield "data: [DONE]\n\n"
        except RuntimeError as e:  # the engine failed
            yield _sse(APIError(500, str(e), type="internal_server_error").body())
            yield "data: [DONE]\n\n"

    # --- response pieces ----------------------------------------------------------------------------

    def _choice(self, call: _Call, index: int, c, state: _Choice, text: str, first_token: int,
                finish_reason: str | None, chunk: bool) -> dict:
        """One entry of ``choices``: the text and tokens from ``first_token`` on of completion ``c``."""
        logprobs = None
        if call.logprobs is not None:
            new_ids = c.token_ids[first_token:]
            new_logprobs = (c.logprobs or [])[first_token:first_token + len(new_ids)]
            logprobs = (self._chat_logprobs(new_ids, new_logprobs, call.logprobs) if call.chat
                        else self._completion_logprobs(new_ids, new_logprobs, state))
        if not call.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if not chunk:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        delta = {"content": text} if text or not state.role_sent else {}
        if not state.role_sent:  # a chat stream names the role once, in each choice's first chunk
            delta, state.role_sent = {"role": "assistant", **delta}, True
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def _envelope(self, call: _Call, choices: list, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if call.chat else "text_completion"
        return {"id": call.id, "object": kind, "created": call.created, "model": self.model_name,
                "choices": choices}

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)
            self._token_texts[token_id] = text
        return text

    def _completion_logprobs(self, ids, logprobs, state: _Choice) -> dict:
        tokens = [self._token_text(t) for t in ids]
        offsets = []
        for token in tokens:
            offsets.append(state.text_offset)
            state.text_offset += len(token)
        return {"tokens": tokens,
                "token_logprobs": [lp.get(t) for t, lp in zip(ids, logprobs)],
                "top_logprobs": [self._top_by_text(lp) for lp in logprobs],
                "text_offset": offsets}

    def _top_by_text(self, logprobs: dict) -> dict:
        """{token text: logprob}; tokens that print alike (bytes of one character) keep the likeliest."""
        top = {}
        for token_id, logprob in _ranked(logprobs):
            top.setdefault(self._token_text(token_id), logprob)
        return top

    def _chat_logprobs(self, ids, logprobs, top_n: int) -> dict:
        def entry(token_id, logprob):
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(t, lp.get(t)), "top_logprobs": [entry(k, v) for k, v in _ranked(lp)[:top_n]]}
                            for t, lp in zip(ids, logprobs)]}


class _EventStream(StreamingResponse):
    """Server-sent events that abort their requests however the response ends: a client that leaves
    mid-stream (or before the first event) frees its KV blocks at once."""

    def __init__(self, events, outputs: RequestStream):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.outputs = outputs

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.outputs.close()


def _stable(text: str, stop: list[str]) -> str:
    """The part of an unfinished completion's text that later tokens cannot change (see the module doc)."""
    end = len(text) - (max(map(len, stop)) - 1 if stop else 0)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return text[:max(end, 0)]


def _ranked(logprobs: dict) -> list:
    return sorted(logprobs.items(), key=lambda kv: -kv[1])


def _usage(finals) -> dict:
    prompt = sum(len(out.prompt_token_ids) for out in finals)
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read by now, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
