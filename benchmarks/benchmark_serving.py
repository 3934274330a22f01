"""Online serving: W3 sent over HTTP at several Poisson request rates, and as a burst.

    python benchmarks/benchmark_serving.py --launch-server                       # GPU: Qwen2.5-0.5B shape
    python benchmarks/benchmark_serving.py --launch-server --scheduling continuous,static --rates 8,32,inf
    python benchmarks/benchmark_serving.py --launch-server --model ~/models/Qwen2.5-0.5B-Instruct
    python benchmarks/benchmark_serving.py --base-url http://127.0.0.1:8000      # a server already running
    python benchmarks/benchmark_serving.py --tiny --launch-server                # CPU: tiny model, short stream

The requests are W3 (benchmarks/workloads.py: ShareGPT-like lognormal lengths, means ~220 prompt and ~190
output tokens, clipped to 2048), the first --num-requests of them, sent as token ids with the ``ignore_eos``
body field so each generates exactly its output length. ``request_stream`` adds the send times: Poisson
arrivals (exponential gaps, seeded) at each rate; "inf" sends everything at t=0.

Measured at the client, per streamed request: TTFT (send to first chunk), TPOT ((last chunk - first chunk) /
(output tokens - 1)) and the inter-token latencies (gaps between chunks; the server sends one chunk per step
that gave the request tokens). Per rate: throughput (completed requests and output tokens over the time from
the first send to the last answer) and mean/p50/p99 of each latency. JSON (card, command, date, server flags)
and a PNG of throughput and latency vs rate go to benchmarks/results/serving_<card>[_<shape>][_tiny].{json,png}.

With --launch-server and no --model the server runs random weights of --model-shape (``--load-format dummy``);
``--scheduling static,continuous`` runs the same stream against a server of each kind. Without
--launch-server, --scheduling only labels the results with what the running server was started with.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from common import DEFAULT_SHAPE, MODEL_SHAPES, RESULTS, model_shape, result_tag, run_info, summary, write_json
from workloads import make_workload

SERVER_FLAGS = ("device", "dtype", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks",
                "gpu_memory_utilization", "block_size")


# --- the request stream ---------------------------------------------------------------------------------------

@dataclass
class TimedRequest:
    send_time: float  # seconds after the start
    prompt_token_ids: list[int]
    output_len: int


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Send times in seconds from the start: exponential gaps at ``rate`` requests/s; all 0 for rate inf."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 (inf: a burst), got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(num_requests):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def request_stream(num_requests: int, rate: float, *, tiny: bool = False, seed: int = 0,
                   max_model_len: int | None = None) -> list[TimedRequest]:
    """The first ``num_requests`` of W3 (``tiny``: its CPU-sized version), sent at Poisson times at ``rate``.

    max_model_len: a request's prompt and then its output shrink to fit it (W3 itself fits 2048).
    """
    workload = make_workload("W3", tiny=tiny)
    if not 1 <= num_requests <= workload.num_requests:
        raise ValueError(f"num_requests must be in [1, {workload.num_requests}], got {num_requests}")
    requests = []
    for t, prompt, output_len in zip(poisson_arrivals(num_requests, rate, seed), workload.prompts,
                                     workload.output_lens):
        if max_model_len is not None:
            prompt = prompt[:max_model_len - 1]
            output_len = min(output_len, max_model_len - len(prompt))
        requests.append(TimedRequest(t, prompt, output_len))
    return requests


# --- sending ----------------------------------------------------------------------------------------------------

@dataclass
class Result:
    ok: bool
    send: float
    output_tokens: int = 0
    chunk_times: list[float] | None = None
    error: str = ""


async def send_one(http: httpx.AsyncClient, model: str, req: TimedRequest, start: float,
                   temperature: float) -> Result:
    await asyncio.sleep(max(0.0, start + req.send_time - time.perf_counter()))
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "temperature": temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    send, chunks, tokens = time.perf_counter(), [], 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return Result(False, send, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Result(False, send, error=data["error"]["message"])
                if data.get("choices"):
                    chunks.append(time.perf_counter())
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return Result(False, send, error=f"{type(e).__name__}: {e}")
    if tokens != req.output_len:
        return Result(False, send, error=f"{tokens} tokens instead of {req.output_len}")
    return Result(True, send, tokens, chunks)


def summarize(results: list[Result], start: float) -> dict:
    done = [r for r in results if r.ok]
    end = max((r.chunk_times[-1] for r in done if r.chunk_times), default=start)
    duration = max(end - start, 1e-9)
    output_tokens = sum(r.output_tokens for r in done)
    return {"completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
            "requests_per_s": len(done) / duration, "output_tok_per_s": output_tokens / duration,
            "output_tokens": output_tokens,
            "ttft_s": summary(r.chunk_times[0] - r.send for r in done if r.chunk_times),
            "tpot_s": summary((r.chunk_times[-1] - r.chunk_times[0]) / (r.output_tokens - 1)
                              for r in done if r.output_tokens > 1),
            "itl_s": summary(b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])),
            "errors": sorted({r.error for r in results if not r.ok})[:5]}


def server_counter(url: str, name: str) -> float | None:
    try:
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith(f"pagedattention_{name} "):
                return float(line.split()[-1])
    except httpx.HTTPError:
        pass
    return None


async def run_stream(url: str, model: str, requests: list[TimedRequest], temperature: float) -> dict:
    preemptions = server_counter(url, "num_preemptions_total")
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None), limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(send_one(http, model, r, start, temperature) for r in requests))
    row = summarize(results, start)
    after = server_counter(url, "num_preemptions_total")
    row["preemptions"] = None if preemptions is None or after is None else int(after - preemptions)
    return row


def bench_server(args, url: str, scheduling: str) -> tuple[str, list[dict]]:
    """The served model's name and one row per rate."""
    served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    model, max_model_len = served["id"], served.get("max_model_len")
    warmup = request_stream(4, math.inf, tiny=args.tiny, max_model_len=max_model_len)
    asyncio.run(run_stream(url, model, warmup, args.temperature))  # CUDA graphs, allocator, connections
    rows = []
    for rate in args.rates:
        requests = request_stream(args.num_requests, rate, tiny=args.tiny, seed=args.seed,
                                  max_model_len=max_model_len)
        row = {"scheduling": scheduling, "rate": "inf" if math.isinf(rate) else rate,
               **asyncio.run(run_stream(url, model, requests, args.temperature))}
        rows.append(row)
        print(f"{scheduling:>10} rate {row['rate']!s:>5}: {row['requests_per_s']:.2f} req/s, "
              f"{row['output_tok_per_s']:.0f} output tok/s, {row['failed']} failed", flush=True)
    return model, rows


# --- a server of our own ---------------------------------------------------------------------------------------

def launch_server(args, scheduling: str, shape_dir: Path | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pagedattention.serve", "--host", "127.0.0.1", "--port", str(port),
           "--scheduling", scheduling, "--no-access-log", "--log-level", "warning",
           "--max-queue-len", str(args.num_requests + 16)]
    if shape_dir is not None:  # random weights of a named shape
        cmd += ["--model", str(shape_dir), "--load-format", "dummy"]
    elif args.model is not None:
        cmd += ["--model", args.model]
    for flag in SERVER_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    cmd += ["--enable-prefix-caching"] if args.enable_prefix_caching else []
    cmd += ["--enforce-eager"] if args.enforce_eager else []
    proc = subprocess.Popen(cmd)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 900
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start: {' '.join(cmd)}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def write_shape(name: str, root: Path) -> Path:
    """A directory whose config.json is the named shape, for ``--load-format dummy``."""
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(model_shape(name).to_dict()))
    return path


# --- report --------------------------------------------------------------------------------------------------------

def print_table(rows: list[dict]) -> None:
    fmt = lambda p: "-" if p is None else f"{p['mean'] * 1e3:.0f}/{p['p50'] * 1e3:.0f}/{p['p99'] * 1e3:.0f}"  # noqa
    print(f"\n{'scheduling':<11} {'rate':>5} {'req/s':>7} {'out tok/s':>9} {'TTFT ms mean/p50/p99':>22} "
          f"{'TPOT ms mean/p50/p99':>21} {'ITL ms mean/p50/p99':>20} {'failed':>6} {'preempt':>7}")
    for r in rows:
        print(f"{r['scheduling']:<11} {r['rate']!s:>5} {r['requests_per_s']:>7.2f} {r['output_tok_per_s']:>9.0f} "
              f"{fmt(r['ttft_s']):>22} {fmt(r['tpot_s']):>21} {fmt(r['itl_s']):>20} {r['failed']:>6} "
              f"{'-' if r['preemptions'] is None else r['preemptions']:>7}")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["rate"] for r in report["results"]}, key=lambda r: math.inf if r == "inf" else r)
    xs = {rate: i for i, rate in enumerate(rates)}  # evenly spaced, the burst last
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = [("output_tok_per_s", "output tokens/s", None), ("ttft_s", "TTFT (s)", 1),
              ("tpot_s", "TPOT (ms)", 1e3), ("itl_s", "inter-token latency (ms)", 1e3)]
    for ax, (key, label, unit) in zip(axes, panels):
        for scheduling in dict.fromkeys(r["scheduling"] for r in report["results"]):
            rows = [r for r in report["results"] if r["scheduling"] == scheduling and r.get(key) is not None]
            x = [xs[r["rate"]] for r in rows]
            if unit is None:
                ax.plot(x, [r[key] for r in rows], "o-", label=scheduling)
                continue
            line, = ax.plot(x, [r[key]["p50"] * unit for r in rows], "o-", label=f"{scheduling} p50")
            ax.plot(x, [r[key]["p99"] * unit for r in rows], "s--", color=line.get_color(), alpha=0.6,
                    label=f"{scheduling} p99")
        ax.set_xticks(range(len(rates)), [("burst" if r == "inf" else f"{r:g}") for r in rates])
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"serving W3 ({report['num_requests']} requests), {report['card']}, {report['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="a running server (without --launch-server)")
    parser.add_argument("--launch-server", action="store_true", help="start `python -m pagedattention.serve` per run")
    parser.add_argument("--scheduling", default="continuous",
                        help="continuous, static or both comma-separated (several need --launch-server)")
    parser.add_argument("--rates", default=None, help="requests/s, comma-separated; inf = a burst at t=0 "
                                                      "(default: 4,16,32,64,inf; --tiny: 10,40,inf)")
    parser.add_argument("--num-requests", type=int, default=None, help="the first N of W3 (default: 256; --tiny: 48)")
    parser.add_argument("--seed", type=int, default=0, help="of the arrival times")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--tiny", action="store_true",
                        help="W3's CPU-sized version; launches the embedded tiny model on the CPU, --max-num-seqs 8")
    parser.add_argument("--out", type=Path, default=RESULTS)
    server = parser.add_argument_group("server flags (with --launch-server)")
    server.add_argument("--model", default=None, help="checkpoint directory (default: random weights of --model-shape)")
    server.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default=DEFAULT_SHAPE)
    for flag in SERVER_FLAGS:
        server.add_argument(f"--{flag.replace('_', '-')}", default=None,
                            type=str if flag in ("device", "dtype") else
                            float if flag == "gpu_memory_utilization" else int)
    server.add_argument("--enable-prefix-caching", action="store_true")
    server.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:  # a batch cap below the burst, so static and continuous batching differ
        args.device = args.device or "cpu"
        args.max_num_seqs = args.max_num_seqs or 8
    args.num_requests = args.num_requests or (48 if args.tiny else 256)
    args.rates = [float(r) for r in (args.rates or ("10,40,inf" if args.tiny else "4,16,32,64,inf")).split(",")]
    schedulings = [s.strip() for s in args.scheduling.split(",")]
    if any(s not in ("continuous", "static") for s in schedulings):
        parser.error(f"--scheduling takes continuous and/or static, got {args.scheduling!r}")
    if len(schedulings) > 1 and not args.launch_server:
        parser.error("several --scheduling values need --launch-server (one server per value)")
    shape = None if args.tiny or args.model else args.model_shape

    rows, model = [], None
    with tempfile.TemporaryDirectory() as tmp:
        shape_dir = write_shape(shape, Path(tmp)) if args.launch_server and shape else None
        for scheduling in schedulings:
            proc, url = (launch_server(args, scheduling, shape_dir) if args.launch_server
                         else (None, args.base_url.rstrip("/")))
            try:
                model, new_rows = bench_server(args, url, scheduling)
                rows += new_rows
            finally:
                if proc is not None:
                    stop_server(proc)
    device = args.device if args.device not in (None, "auto") else ("cuda" if _cuda_available() else "cpu")
    stream = request_stream(args.num_requests, math.inf, tiny=args.tiny)
    report = {
        **run_info(device), "model": model, "workload": "W3" + (" (tiny)" if args.tiny else ""),
        "num_requests": args.num_requests,
        "mean_prompt_len": statistics.fmean(len(r.prompt_token_ids) for r in stream),
        "mean_output_len": statistics.fmean(r.output_len for r in stream),
        "temperature": args.temperature, "launched_server": args.launch_server,
        "server_flags": {f: getattr(args, f) for f in SERVER_FLAGS if getattr(args, f) is not None},
        "results": rows,
    }
    path = write_json(args.out / f"serving_{result_tag(report['card'], args.tiny, shape)}.json", report)
    print_table(rows)
    print(f"\nW3: {args.num_requests} requests, mean prompt {report['mean_prompt_len']:.0f} / output "
          f"{report['mean_output_len']:.0f} tokens; wrote {path}")
    try:
        plot(report, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    except ImportError as e:
        print(f"no plot ({e})")
    return 0


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
