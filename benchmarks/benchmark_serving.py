"""Online serving: a request stream sent over HTTP at several Poisson request rates, and as a burst.

    python benchmarks/benchmark_serving.py --launch-server                       # GPU: W3 against a new server
    python benchmarks/benchmark_serving.py --launch-server --scheduling continuous,static --rates 2,8,inf
    python benchmarks/benchmark_serving.py --base-url http://127.0.0.1:8000      # a server already running
    python benchmarks/benchmark_serving.py --tiny --launch-server                # CPU: tiny model, short stream

W3 (``w3_requests``): prompt and output lengths drawn from seeded lognormals close to ShareGPT's (means ~220
prompt and ~190 output tokens, long tails clipped to 2048), prompts of random token ids, EOS ignored (the
``ignore_eos`` body field) so each request generates exactly its output length. Arrival times are Poisson
(exponential gaps) at each rate; "inf" sends everything at t=0.

Measured at the client, per streamed request: TTFT (send to first chunk), TPOT ((last chunk - first chunk) /
(output tokens - 1)) and the inter-token latencies (gaps between chunks; the server sends one chunk per step
that gave the request tokens). Per rate: throughput (completed requests and output tokens over the time from
the first send to the last answer) and mean/p50/p99 of each latency. JSON (device, command, date, server
flags) and a PNG of latency vs rate go to benchmarks/results/serving_<device>[_tiny].{json,png}.

``--scheduling static,continuous`` with ``--launch-server`` runs the same stream against a server of each
kind; without ``--launch-server`` it only labels the results with what the running server was started with.
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
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
SERVER_FLAGS = ("model", "device", "dtype", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                "num_kv_blocks", "gpu_memory_utilization", "block_size")


# --- the request stream ---------------------------------------------------------------------------------------

@dataclass
class ServingRequest:
    prompt_token_ids: list[int]
    output_len: int


def _clipped_lognormal_mu(mean: float, sigma: float, clip: float) -> float:
    """mu such that E[min(X, clip)] = mean for X ~ lognormal(mu, sigma) (bisection on the closed form)."""
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731

    def clipped_mean(mu):
        return (math.exp(mu + sigma ** 2 / 2) * phi((math.log(clip) - mu - sigma ** 2) / sigma)
                + clip * (1 - phi((math.log(clip) - mu) / sigma)))
    lo, hi = -10.0, math.log(clip) + 10
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if clipped_mean(mid) < mean else (lo, mid)
    return lo


def w3_requests(num_requests: int, seed: int = 0, mean_prompt_len: float = 220, mean_output_len: float = 190,
                max_len: int = 2048, scale: int = 1, token_id_range: tuple[int, int] = (10, 250),
                prompt_sigma: float = 1.0, output_sigma: float = 0.9) -> list[ServingRequest]:
    """W3: ShareGPT-like lengths from seeded lognormals (heavy right tail, clipped at ``max_len``).

    ``scale`` divides every length (and the clip) for small CPU runs. Token ids are uniform in
    ``token_id_range`` (inclusive), a range of ordinary tokens in every vocabulary this engine runs.
    """
    if num_requests < 1 or scale < 1:
        raise ValueError(f"num_requests and scale must be >= 1, got {num_requests}, {scale}")
    rng = random.Random(seed)
    clip = max_len / scale
    mu_prompt = _clipped_lognormal_mu(mean_prompt_len / scale, prompt_sigma, clip)
    mu_output = _clipped_lognormal_mu(mean_output_len / scale, output_sigma, clip)
    requests = []
    for _ in range(num_requests):
        prompt_len = max(1, min(int(clip), round(rng.lognormvariate(mu_prompt, prompt_sigma))))
        output_len = max(1, min(int(clip), round(rng.lognormvariate(mu_output, output_sigma))))
        requests.append(ServingRequest([rng.randint(*token_id_range) for _ in range(prompt_len)], output_len))
    return requests


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Send times in seconds from the start: exponential gaps at ``rate`` requests/s; all 0 for rate inf."""
    if math.isinf(rate):
        return [0.0] * num_requests
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(num_requests):
        times.append(t)
        t += rng.expovariate(rate)
    return times


# --- sending ----------------------------------------------------------------------------------------------------

@dataclass
class Result:
    ok: bool
    send: float
    output_tokens: int = 0
    chunk_times: list[float] | None = None
    error: str = ""


async def send_one(http: httpx.AsyncClient, model: str, req: ServingRequest, delay: float, start: float,
                   temperature: float) -> Result:
    await asyncio.sleep(max(0.0, start + delay - time.perf_counter()))
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


def percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]  # noqa: E731
    return {"mean": statistics.fmean(values), "p50": pick(50), "p99": pick(99)}


def summarize(results: list[Result], start: float) -> dict:
    done = [r for r in results if r.ok]
    end = max((r.chunk_times[-1] for r in done if r.chunk_times), default=start)
    duration = max(end - start, 1e-9)
    ttft = [r.chunk_times[0] - r.send for r in done if r.chunk_times]
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    output_tokens = sum(r.output_tokens for r in done)
    return {"completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
            "requests_per_s": len(done) / duration, "output_tok_per_s": output_tokens / duration,
            "output_tokens": output_tokens, "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
            "itl_s": percentiles(itl),
            "errors": sorted({r.error for r in results if not r.ok})[:5]}


def server_counter(http_url: str, name: str) -> float | None:
    try:
        for line in httpx.get(f"{http_url}/metrics", timeout=10).text.splitlines():
            if line.startswith(f"pagedattention_{name} "):
                return float(line.split()[-1])
    except httpx.HTTPError:
        pass
    return None


async def run_rate(url: str, model: str, requests: list[ServingRequest], rate: float, seed: int,
                   temperature: float) -> dict:
    arrivals = poisson_arrivals(len(requests), rate, seed)
    preemptions = server_counter(url, "num_preemptions_total")
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None), limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(send_one(http, model, r, t, start, temperature)
                                         for r, t in zip(requests, arrivals)))
    row = {"rate": "inf" if math.isinf(rate) else rate, **summarize(results, start)}
    after = server_counter(url, "num_preemptions_total")
    row["preemptions"] = None if preemptions is None or after is None else int(after - preemptions)
    return row


# --- a server of our own ---------------------------------------------------------------------------------------

def launch_server(args, scheduling: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pagedattention.serve", "--host", "127.0.0.1", "--port", str(port),
           "--scheduling", scheduling, "--no-access-log", "--log-level", "warning",
           "--max-queue-len", str(args.num_requests + 16)]
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


def device_name(args) -> str:
    if args.tiny or args.device == "cpu":
        return "cpu"
    try:
        import torch
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown"


def bench_server(args, url: str, scheduling: str, requests: list[ServingRequest]) -> tuple[str, list[dict]]:
    """The served model's name and one row per rate."""
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    model, max_model_len = models[0]["id"], models[0].get("max_model_len")
    if max_model_len:  # a request must fit: its output shrinks to what the server's context leaves
        requests = [ServingRequest(r.prompt_token_ids[:max_model_len - 1],
                                   min(r.output_len, max_model_len - min(len(r.prompt_token_ids), max_model_len - 1)))
                    for r in requests]
    asyncio.run(run_rate(url, model, w3_requests(4, seed=args.seed + 1, scale=args.scale), math.inf, 0,
                         args.temperature))  # warm-up
    rows = []
    for rate in args.rates:
        row = {"scheduling": scheduling, **asyncio.run(run_rate(url, model, requests, rate, args.seed,
                                                                args.temperature))}
        rows.append(row)
        print(f"{scheduling:>10} rate {row['rate']!s:>5}: {row['requests_per_s']:.2f} req/s, "
              f"{row['output_tok_per_s']:.0f} output tok/s, {row['failed']} failed", flush=True)
    return model, rows


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
    xs = {rate: i for i, rate in enumerate(rates)}  # evenly spaced, "burst" last
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
    fig.suptitle(f"serving W3 ({report['num_requests']} requests), {report['device']}, {report['model']}")
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
                                                      "(default: 1,2,4,8,16,inf; --tiny: 10,40,inf)")
    parser.add_argument("--num-requests", type=int, default=None, help="default: 200 (--tiny: 48)")
    parser.add_argument("--scale", type=int, default=None, help="divide W3's lengths by this (default 1, --tiny 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--tiny", action="store_true",
                        help="the embedded tiny model on the CPU, a short stream, --max-num-seqs 8")
    parser.add_argument("--out", type=Path, default=RESULTS)
    server = parser.add_argument_group("server flags (with --launch-server)")
    for flag in SERVER_FLAGS:
        server.add_argument(f"--{flag.replace('_', '-')}", default=None,
                            type=str if flag in ("model", "device", "dtype") else
                            float if flag == "gpu_memory_utilization" else int)
    server.add_argument("--enable-prefix-caching", action="store_true")
    server.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:  # a batch cap below the burst, so static and continuous batching differ
        args.model, args.device = None, "cpu"
        args.max_num_seqs = args.max_num_seqs or 8
    args.num_requests = args.num_requests or (48 if args.tiny else 200)
    args.scale = args.scale or (8 if args.tiny else 1)
    args.rates = [float(r) for r in (args.rates or ("10,40,inf" if args.tiny else "1,2,4,8,16,inf")).split(",")]
    schedulings = [s.strip() for s in args.scheduling.split(",")]
    if any(s not in ("continuous", "static") for s in schedulings):
        parser.error(f"--scheduling takes continuous and/or static, got {args.scheduling!r}")
    if len(schedulings) > 1 and not args.launch_server:
        parser.error("several --scheduling values need --launch-server (one server per value)")

    requests = w3_requests(args.num_requests, seed=args.seed, scale=args.scale)
    device = device_name(args)
    rows = []
    for scheduling in schedulings:
        proc, url = launch_server(args, scheduling) if args.launch_server else (None, args.base_url.rstrip("/"))
        try:
            model, new_rows = bench_server(args, url, scheduling, requests)
            rows += new_rows
        finally:
            if proc is not None:
                stop_server(proc)
    report = {
        "device": device, "model": model, "workload": "W3", "num_requests": args.num_requests, "scale": args.scale,
        "mean_prompt_len": statistics.fmean(len(r.prompt_token_ids) for r in requests),
        "mean_output_len": statistics.fmean(r.output_len for r in requests),
        "temperature": args.temperature, "launched_server": args.launch_server,
        "server_flags": {f: getattr(args, f) for f in SERVER_FLAGS if getattr(args, f) is not None},
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python " + " ".join(sys.argv), "results": rows,
    }
    tag = device.replace(" ", "_").replace("/", "_") + ("_tiny" if args.tiny else "")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serving_{tag}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows)
    print(f"\nW3: {args.num_requests} requests, mean prompt {report['mean_prompt_len']:.0f} / output "
          f"{report['mean_output_len']:.0f} tokens; wrote {path}")
    try:
        plot(report, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    except ImportError as e:
        print(f"no plot ({e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
