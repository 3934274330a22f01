"""The OpenAI-compatible server, as a client sees it: a real ``python -m pagedattention.serve`` process on
loopback, driven by the official ``openai`` client, serving the embedded tiny model on the CPU.

References are independent of the server: ``LLM.generate`` in this process with the same parameters
(the tiny model's weights are seeded, so both processes hold the same model) and the server's own
/metrics for its KV blocks. Prompts are fresh random text on every run (the seed is in failure messages).
"""
import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from pagedattention import LLM, SamplingParams  # noqa: E402

SEED = int.from_bytes(os.urandom(4), "little")
MAX_NUM_SEQS, MAX_QUEUE_LEN = 32, 4
WORDS = ("block", "table", "cache", "page", "token", "query", "key", "value", "head", "layer", "batch", "step")


def random_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> subprocess.Popen:
    """``python -m pagedattention.serve`` on a free loopback port, once /health answers; ``.url`` is its address."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pagedattention.serve", "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--no-access-log", "--log-level", "warning", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{proc.url}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{proc.stdout.read()}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server():
    proc = start_server("--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue-len", str(MAX_QUEUE_LEN))
    yield proc
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


@pytest.fixture
def rng():
    return random.Random(SEED ^ random.getrandbits(32))


def metrics(server) -> dict[str, float]:
    """/metrics parsed: sample name (with labels) -> value; checks every line is Prometheus text."""
    values = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) pagedattention_\w+ .+", line), line
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def wait_until_idle(server, timeout: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["pagedattention_kv_blocks_used"] == 0 and m["pagedattention_num_requests_running"] == 0 \
                and m["pagedattention_num_requests_in_flight"] == 0:
            return m
        assert time.monotonic() < deadline, f"blocks still held: {m}"
        time.sleep(0.05)


def stream_text(client, **kwargs):
    """The streamed completion's text per choice, finish reasons, and usage."""
    texts, reasons, usage = {}, {}, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


# --- answers equal the engine's ---------------------------------------------------------------------------

def test_stream_full_and_generate_agree_greedy(server, client, llm, rng):
    prompt = random_prompt(rng)
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, logprobs=2), use_tqdm=False)[0]
    full = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=24, logprobs=2)
    texts, reasons, usage = stream_text(client, model="tiny", prompt=prompt, temperature=0, max_tokens=24)
    ref_out = ref.outputs[0]
    assert full.choices[0].text == ref_out.text == texts[0], f"seed {SEED}, prompt {prompt!r}"
    assert full.choices[0].finish_reason == reasons[0] == ref_out.finish_reason
    assert full.usage.prompt_tokens == usage.prompt_tokens == len(ref.prompt_token_ids)
    assert full.usage.completion_tokens == usage.completion_tokens == len(ref_out.token_ids)
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chosen = [lp[t] for t, lp in zip(ref_out.token_ids, ref_out.logprobs)]
    assert full.choices[0].logprobs.token_logprobs == pytest.approx(chosen, rel=1e-4, abs=1e-4)
    for top, ref_top in zip(full.choices[0].logprobs.top_logprobs, ref_out.logprobs):
        expected = {}  # OpenAI keys them by token text: of tokens that print alike, the likeliest
        for token_id, logprob in sorted(ref_top.items(), key=lambda kv: -kv[1]):
            expected.setdefault(llm.tokenizer.decode([token_id], skip_special_tokens=False), logprob)
        assert top == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_stop_strings_cut_stream_and_full_alike(server, client, llm, rng):
    prompt = random_prompt(rng)
    greedy = dict(temperature=0, max_tokens=64)
    plain = llm.generate(prompt, SamplingParams(**greedy, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    # a stop string from the middle of the greedy answer (so the request must stop there), of 2 characters
    # where one is clean text: the stream must hold back a character that may start it
    candidates = [plain[i:i + k] for k in (2, 1) for i in range(3, len(plain) - k) if "\ufffd" not in plain[i:i + k]]
    if not candidates:
        pytest.skip(f"no clean stop string in {plain!r}")
    stop = rng.choice([c for c in candidates if len(c) == len(candidates[0])])
    ref = llm.generate(prompt, SamplingParams(**greedy, ignore_eos=True, stop=[stop]), use_tqdm=False)[0]
    extra = {"extra_body": {"ignore_eos": True}}
    full = client.completions.create(model="tiny", prompt=prompt, **greedy, stop=stop, **extra)
    texts, reasons, _ = stream_text(client, model="tiny", prompt=prompt, **greedy, stop=[stop, "\x00never"], **extra)
    assert full.choices[0].text == texts[0] == ref.outputs[0].text == plain[:plain.find(stop)], f"seed {SEED}"
    assert full.choices[0].finish_reason == reasons[0] == "stop"


def test_parallel_sampling_with_seed_and_penalties(server, client, llm, rng):
    prompt, seed = random_prompt(rng), rng.randrange(2 ** 31)
    kwargs = dict(temperature=0.9, top_p=0.95, max_tokens=12, n=3, seed=seed, presence_penalty=0.5,
                  frequency_penalty=0.3)
    ref = llm.generate(prompt, SamplingParams(**kwargs), use_tqdm=False)[0]
    full = client.completions.create(model="tiny", prompt=prompt, **kwargs)
    texts, _, usage = stream_text(client, model="tiny", prompt=prompt, **kwargs)
    expected = [c.text for c in ref.outputs]
    assert [c.text for c in sorted(full.choices, key=lambda c: c.index)] == expected, f"seed {SEED}"
    assert [texts[i] for i in range(3)] == expected
    assert usage.completion_tokens == sum(len(c.token_ids) for c in ref.outputs)


def test_several_prompts_in_one_request(server, client, llm, rng):
    prompts = [random_prompt(rng) for _ in range(3)]
    refs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    expected = [ref.outputs[0].text for ref in refs for _ in range(2)]  # choice index = prompt * n + completion
    full = client.completions.create(model="tiny", prompt=prompts, temperature=0, max_tokens=10, n=2)
    assert [c.text for c in sorted(full.choices, key=lambda c: c.index)] == expected, f"seed {SEED}"
    texts, _, usage = stream_text(client, model="tiny", prompt=prompts, temperature=0, max_tokens=10, n=2)
    assert [texts[i] for i in range(6)] == expected
    assert usage.prompt_tokens == sum(len(ref.prompt_token_ids) for ref in refs)


# --- many clients, joining, leaving ---------------------------------------------------------------------------

def test_32_concurrent_streams_complete(server, rng):
    prompts = [random_prompt(rng) for _ in range(32)]

    async def one(aclient, prompt):
        tokens, text = 0, ""
        stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                                  stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            text += "".join(c.text for c in chunk.choices)
        return tokens

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(aclient, p) for p in prompts))

    assert asyncio.run(main()) == [16] * 32
    m = wait_until_idle(server)
    assert m['pagedattention_request_success_total{finished_reason="length"}'] >= 32
    assert m["pagedattention_time_to_first_token_seconds_count"] >= 32


def test_request_joins_running_batch_and_disconnect_frees_blocks(server, client):
    """A short request sent while a long one streams finishes first (it joined the running batch);
    closing the long stream aborts it and every KV block comes back."""
    before = metrics(server)["pagedattention_generation_tokens_total"]
    long_stream = client.completions.create(model="tiny", prompt="a long answer", max_tokens=4000, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = iter(long_stream)
    for _ in range(3):
        next(chunks)
    assert metrics(server)["pagedattention_kv_blocks_used"] > 0
    short = client.completions.create(model="tiny", prompt="short", max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 4
    next(chunks)  # the long one is still running: it was not waiting for the short one's batch
    long_stream.close()
    m = wait_until_idle(server, timeout=120)
    assert m["pagedattention_request_aborted_total"] >= 1
    # the engine stopped it: far fewer than its 4000 tokens were generated
    assert m["pagedattention_generation_tokens_total"] - before < 2000


def test_non_streaming_client_that_leaves_frees_blocks(server):
    body = {"model": "tiny", "prompt": "never read", "max_tokens": 4000, "ignore_eos": True}
    before = metrics(server)["pagedattention_generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=1.0))
    m = wait_until_idle(server, timeout=120)
    assert m["pagedattention_generation_tokens_total"] - before < 2000


def test_full_queue_answers_503(server):
    """max_num_seqs + max_queue_len requests in flight: the next one gets 503, the others are unharmed."""
    limit = MAX_NUM_SEQS + MAX_QUEUE_LEN
    body = {"model": "tiny", "prompt": "hold", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=limit + 2)) as http:
        streams = []
        try:
            for _ in range(limit):
                stream = http.stream("POST", "/v1/completions", json=body)
                response = stream.__enter__()
                streams.append(stream)
                assert response.status_code == 200
            refused = http.post("/v1/completions", json={**body, "stream": False})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_busy"
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
    wait_until_idle(server)


def test_engine_failures_fail_their_requests_not_the_server(llm):
    """The engine loop in this process, over the real LLM: a step that raises fails the requests in it (their
    blocks freed) and the next request is served; a failure outside a step fails everything clearly."""
    from pagedattention.serve.async_engine import AsyncEngine

    params = SamplingParams(temperature=0, max_tokens=6)
    expected = llm.generate("fine", params, use_tqdm=False)[0].outputs[0].text

    async def drain(stream):
        return [out async for _, out in stream][-1]

    async def main():
        engine = AsyncEngine(llm)
        engine.start()
        llm.step = lambda: (_ for _ in ()).throw(RuntimeError("injected step failure"))
        try:
            stream = await engine.generate(["doomed", "doomed too"], params)
            with pytest.raises(RuntimeError, match="injected step failure"):
                await drain(stream)
        finally:
            del llm.step
        assert llm.manager.num_free_blocks == llm.manager.num_blocks and engine.num_in_flight == 0
        assert (await drain(await engine.generate(["fine"], params))).outputs[0].text == expected
        llm.stats = lambda: 1 / 0  # read after every step, outside it
        try:
            stream = await engine.generate(["never"], params)
            with pytest.raises(RuntimeError, match="engine stopped"):
                await drain(stream)
            with pytest.raises(RuntimeError, match="engine stopped"):
                await engine.generate(["after"], params)
        finally:
            del llm.stats
        await engine.stop()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert not llm.has_unfinished_requests() and llm.manager.num_free_blocks == llm.manager.num_blocks


# --- errors ---------------------------------------------------------------------------------------------------

BAD_BODIES = [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"model": "tiny"}', "prompt"),
    (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": "16"}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "n": True}).encode(), "n"),
    (json.dumps({"prompt": "x", "n": MAX_NUM_SEQS + 1}).encode(), "n"),
    (json.dumps({"prompt": "x", "top_p": 1.5}).encode(), "top_p"),
    (json.dumps({"prompt": "x", "logprobs": 99}).encode(), "logprobs"),
    (json.dumps({"prompt": "x", "presence_penalty": 3.0}).encode(), "presence_penalty"),
    (json.dumps({"prompt": "x", "stop": [1]}).encode(), "stop"),
    (json.dumps({"prompt": [1, "a"]}).encode(), "prompt"),
    (json.dumps({"prompt": [5, 99999]}).encode(), "prompt"),
    (json.dumps({"prompt": ""}).encode(), "prompt"),
    (json.dumps({"prompt": "x" * 5000}).encode(), "prompt"),
    (json.dumps({"prompt": "x", "stream": "yes"}).encode(), "stream"),
]


def test_bad_requests_get_400_and_disturb_no_one(server, client, llm, rng):
    prompt = random_prompt(rng)
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0].text
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        out=stream_text(client, model="tiny", prompt=prompt, temperature=0, max_tokens=40)))
    worker.start()
    for body, param in BAD_BODIES:
        r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                       timeout=10)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["message"] and error["param"] == param, (body, error)
    worker.join(60)
    assert result["out"][0][0] == ref, f"seed {SEED}"
    assert client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=40).choices[0].text == ref
    wait_until_idle(server)


def test_unknown_model_404_and_routes(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-nonexistent", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = httpx.get(f"{server.url}/v1/nowhere", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_chat_on_a_model_without_template_is_400(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in e.value.body["message"] and e.value.body["param"] == "messages"
    assert client.completions.create(model="tiny", prompt="still serving", max_tokens=2).usage.completion_tokens


# --- chat, on a checkpoint with a template ------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A random-weight Llama checkpoint whose tokenizer config has a chat template."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer

    path = tmp_path_factory.mktemp("chat-model")
    torch_seed = random.getrandbits(31)
    import torch
    torch.manual_seed(torch_seed)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                      max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 20, vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"])
    bpe.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": CHAT_TEMPLATE}))
    return path


def test_chat_completions_follow_the_template(chat_model, rng):
    messages = [{"role": "system", "content": random_prompt(rng)}, {"role": "user", "content": random_prompt(rng)}]
    rendered = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
    ref_llm = LLM(str(chat_model), device="cpu")
    ref = ref_llm.generate([ref_llm.tokenizer.encode(rendered)], SamplingParams(temperature=0, max_tokens=12,
                                                                                logprobs=2), use_tqdm=False)[0]
    proc = start_server("--model", str(chat_model))
    try:
        chat = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in chat.models.list().data] == [chat_model.name]
        full = chat.chat.completions.create(model=chat_model.name, messages=messages, temperature=0, max_tokens=12,
                                            logprobs=True, top_logprobs=2)
        streamed, roles, reason = "", [], None
        for chunk in chat.chat.completions.create(model=chat_model.name, messages=messages, temperature=0,
                                                  max_completion_tokens=12, stream=True):
            delta = chunk.choices[0].delta
            roles += [delta.role] if delta.role else []
            streamed += delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
    finally:
        stop_server(proc)
    out = ref.outputs[0]
    assert full.choices[0].message.role == "assistant" and roles == ["assistant"]
    assert full.choices[0].message.content == streamed == out.text, f"seed {SEED}"
    assert full.choices[0].finish_reason == reason == out.finish_reason
    assert full.usage.prompt_tokens == len(ref.prompt_token_ids)
    content = full.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([lp[t] for t, lp in zip(out.token_ids, out.logprobs)],
                                                         rel=1e-4, abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


# --- the serving benchmark against this server ---------------------------------------------------------------

def import_benchmark():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import benchmark_serving
    return benchmark_serving


def test_request_stream_is_w3_at_poisson_times():
    bench = import_benchmark()
    from workloads import make_workload

    w3, seed, rate = make_workload("W3"), random.getrandbits(31), random.uniform(5, 50)
    stream = bench.request_stream(2000, rate, seed=seed)
    assert [(r.prompt_token_ids, r.output_len) for r in stream] == list(zip(w3.prompts, w3.output_lens))[:2000]
    times = [r.send_time for r in stream]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # exponential gaps: mean 1 / rate and standard deviation equal to the mean
    assert times[0] == 0 and min(gaps) >= 0, f"seed {seed}"
    assert sum(gaps) / len(gaps) == pytest.approx(1 / rate, rel=0.1), f"seed {seed}"
    assert (sum(g * g for g in gaps) / len(gaps) - (sum(gaps) / len(gaps)) ** 2) ** 0.5 == pytest.approx(
        1 / rate, rel=0.15), f"seed {seed}"
    assert [r.send_time for r in bench.request_stream(10, math.inf)] == [0.0] * 10
    short = bench.request_stream(50, rate, max_model_len=64)
    assert all(len(r.prompt_token_ids) + r.output_len <= 64 and r.output_len >= 1 for r in short)


def test_serving_benchmark_runs_against_the_server(server, tmp_path):
    bench = import_benchmark()
    assert bench.main(["--base-url", server.url, "--tiny", "--num-requests", "6", "--rates", "50,inf",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "serving_cpu_tiny.json").read_text())
    assert [r["rate"] for r in report["results"]] == [50.0, "inf"]
    expected_tokens = sum(r.output_len for r in bench.request_stream(6, math.inf, tiny=True))
    for row in report["results"]:
        assert row["completed"] == 6 and row["failed"] == 0, row
        assert row["output_tokens"] == expected_tokens
        assert 0 < row["ttft_s"]["p50"] <= row["ttft_s"]["p99"]
    assert report["command"] and report["date"] and report["card"] == "cpu"
    assert (tmp_path / "serving_cpu_tiny.png").stat().st_size > 0


# --- shutdown (last: it stops the module's server) ----------------------------------------------------------------

def test_sigterm_drains_running_requests_then_exits(server, client):
    stream = client.completions.create(model="tiny", prompt="drain me", max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    server.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:  # a new request is refused: the socket is closed, or (until it is) a 503
        late = httpx.post(f"{server.url}/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=5)
        assert late.status_code == 503, late.text
    except httpx.TransportError:
        pass
    usage = None
    for chunk in chunks:  # the running request still completes
        usage = chunk.usage or usage
    assert usage.completion_tokens == 30
    # uvicorn re-raises the signal once drained, so the exit status says SIGTERM ended it
    assert server.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.stdout.read()
