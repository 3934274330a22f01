"""The request sets of the throughput benchmarks, and the peers' figures on them.

    from workloads import make_workload
    w = make_workload("W3")                 # Workload: prompts (token ids), output_lens, description
    params = w.sampling_params(temperature=0.6)

Every set is drawn from ``random.Random(0)``, EOS is ignored (each request makes exactly its output length) and
every request arrives at t=0. Prompts are random token ids: speed does not depend on them.

- W1: 256 requests, prompt length U[128, 512] (ids U[100, 150000)), 256 new tokens each.
- W2 (nano-vllm's benchmark): 256 requests, prompt length U[100, 1024] (ids U[0, 10000]), output length
  U[100, 1024] per request.
- W3 (ShareGPT-like): 2,048 requests; prompt length ~ lognormal(mu 4.894, sigma 1.0) (mean 220, median 133),
  output length ~ lognormal(mu 4.927, sigma 0.8) (mean 190, median 138), the means of ShareGPT conversations
  as vLLM's benchmarks sample them (about 220 prompt / 190 output tokens). Lengths are rounded, at least 4;
  the output is clipped to 2,044 and the prompt to 2,048 minus the output, so a request fits max_model_len
  2048. Ids U[0, 10000]; for each request its two lengths are drawn first, all ids after.
``tiny=True`` shrinks every set ~16x (counts and lengths) for CPU runs of the embedded model (vocab 512).
Ids at or above a model's vocabulary (W1 for Llama-3.2's 128,256) wrap around (``vocab_size``).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pagedattention import SamplingParams

NAMES = ("W1", "W2", "W3")
W3_PROMPT = (math.log(220) - 1.0 ** 2 / 2, 1.0)  # (mu, sigma) of the lognormal: mean 220
W3_OUTPUT = (math.log(190) - 0.8 ** 2 / 2, 0.8)  # mean 190
W3_MAX_LEN = 2048
W3_MIN_LEN = 4


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    description: str

    def sampling_params(self, temperature: float) -> list[SamplingParams]:
        # final_only: the engine builds each request's output once, when it ends (no per-step cost)
        return [SamplingParams(temperature=temperature, max_tokens=m, ignore_eos=True, output_kind="final_only")
                for m in self.output_lens]

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(name: str, *, tiny: bool = False, vocab_size: int | None = None) -> Workload:
    """The request set ``name`` (W1, W2 or W3); see the module's docstring."""
    makers = {"W1": _w1, "W2": _w2, "W3": _w3}
    if name not in makers:
        raise ValueError(f"workload must be one of {', '.join(NAMES)}, got {name!r}")
    prompts, outputs, description = makers[name](random.Random(0), tiny)
    if vocab_size is not None and max(max(p) for p in prompts) >= vocab_size:
        prompts = [[t % vocab_size for t in p] for p in prompts]
        description += f"; ids taken modulo the vocabulary ({vocab_size})"
    return Workload(name, prompts, outputs, description)


def _w1(rng: random.Random, tiny: bool):
    scale, n = (16, 32) if tiny else (1, 256)
    id_range = (100, 500) if tiny else (100, 149_999)
    prompts = [[rng.randint(*id_range) for _ in range(rng.randint(128 // scale, 512 // scale))] for _ in range(n)]
    return prompts, [256 // scale] * n, (f"{n} requests, prompts U[{128 // scale}, {512 // scale}] (ids "
                                         f"U[{id_range[0]}, {id_range[1]}]), {256 // scale} output tokens each")


def _w2(rng: random.Random, tiny: bool):
    """nano-vllm's bench.py: the prompts first, then the output lengths."""
    scale, n = (16, 32) if tiny else (1, 256)
    top = 500 if tiny else 10_000
    prompts = [[rng.randint(0, top) for _ in range(rng.randint(100 // scale, 1024 // scale))] for _ in range(n)]
    outputs = [rng.randint(100 // scale, 1024 // scale) for _ in range(n)]
    return prompts, outputs, (f"{n} requests, prompts U[{100 // scale}, {1024 // scale}] (ids U[0, {top}]), "
                              f"output lengths U[{100 // scale}, {1024 // scale}]")


def _w3(rng: random.Random, tiny: bool):
    scale, n = (16, 2048 // 16) if tiny else (1, 2048)
    top, limit, shortest = (500 if tiny else 10_000), W3_MAX_LEN // scale, (1 if tiny else W3_MIN_LEN)
    lengths = []
    for _ in range(n):
        prompt, output = rng.lognormvariate(*W3_PROMPT) / scale, rng.lognormvariate(*W3_OUTPUT) / scale
        output = min(max(round(output), shortest), limit - shortest)
        lengths.append((min(max(round(prompt), shortest), limit - output), output))
    prompts = [[rng.randint(0, top) for _ in range(p)] for p, _ in lengths]
    return prompts, [o for _, o in lengths], (
        f"{n} requests (ShareGPT-like), prompt lengths lognormal(mu {W3_PROMPT[0]:.3f}, sigma {W3_PROMPT[1]}), "
        f"output lengths lognormal(mu {W3_OUTPUT[0]:.3f}, sigma {W3_OUTPUT[1]})" + (", lengths / 16" if tiny else "")
        + f", clipped to [{shortest}, {limit}] with prompt + output <= {limit} (ids U[0, {top}])")


@dataclass(frozen=True)
class Peer:
    workload: str
    shape: str          # the model shape (benchmarks/common.py MODEL_SHAPES)
    card: str
    engine: str
    output_tok_per_s: float


# From the notes' workloads page: one run each, random weights, bf16.
H100 = "NVIDIA H100 80GB HBM3"
PEERS = [
    Peer("W1", "qwen2.5-0.5b", H100, "HF generate, static batches of 64, sdpa (transformers 5.17)", 2088),
    Peer("W1", "qwen2.5-0.5b", H100, "HF generate, static batches of 128 (transformers 5.17)", 3476),
    Peer("W1", "qwen2.5-0.5b", H100, "HF continuous batching, paged|sdpa, defaults", 1310),
    Peer("W1", "qwen2.5-0.5b", H100, "HF continuous batching, CUDA graphs, 8192 tokens", 2087),
    Peer("W2", "qwen2.5-0.5b", H100, "HF generate, static batches of 256", 1222),
    Peer("W2", "qwen2.5-0.5b", H100, "HF continuous batching, paged|sdpa", 784),
    Peer("W2", "qwen2.5-0.5b", H100, "HF continuous batching, CUDA graphs", 1258),
    Peer("W1", "qwen2.5-0.5b", "NVIDIA H200", "HF generate, static batches of 128 (transformers 5.17)", 2692),
    Peer("W1", "qwen2.5-0.5b", "NVIDIA H200", "HF continuous batching (transformers 5.17)", 1995),
    Peer("W2", "qwen2.5-0.5b", "NVIDIA H200", "HF generate, static batches of 256 (transformers 5.17)", 1396),
    Peer("W2", "qwen2.5-0.5b", "NVIDIA H200", "HF continuous batching (transformers 5.17)", 1214),
    Peer("W2", "qwen3-0.6b", "RTX 4070 laptop", "nano-vllm (published)", 1434),
    Peer("W2", "qwen3-0.6b", "RTX 4070 laptop", "vLLM (published by nano-vllm)", 1362),
]


def peers(workload: str, shape: str) -> list[Peer]:
    return [p for p in PEERS if p.workload == workload and p.shape == shape]
