"""What the benchmarks share: model shapes, the card's name, timers, the measured ceilings, result files.

    from common import model_shape, card_name, copy_bandwidth, matmul_rate, run_info, write_json

Model shapes (random weights: speed does not depend on them) are ModelConfig factories, by name:
qwen2.5-0.5b (the shape of every W1/W2 figure in the notes), qwen3-0.6b, llama3.2-1b, 7b (Qwen2.5-7B: GQA 7
like the 0.5B, so its KV cache fits W2 at 256 sequences, which Llama-2-7B's 32 KV heads would not).

Ceilings are measured on the card they are used on: ``copy_bandwidth`` (bytes read + written per second by
back-to-back device copies of a 2 GiB buffer) and ``matmul_rate`` (FLOP/s of a bf16 GEMM shaped like a model's
projection over a prefill step's tokens). Model arithmetic (``weight_bytes``, ``kv_bytes_per_token``,
``prefill_flops``) counts what a step must read or compute, for the bounds in profile_step.py.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from pagedattention.models import ModelConfig

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SHAPE = "qwen2.5-0.5b"


# --- model shapes --------------------------------------------------------------------------------------

def qwen25_05b() -> ModelConfig:
    return ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768, eos_token_id=151643)


def qwen3_06b() -> ModelConfig:
    return ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960, eos_token_id=151645)


def llama32_1b() -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001)


def qwen25_7b() -> ModelConfig:
    return ModelConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attention_bias=True, max_position_embeddings=32768, eos_token_id=151643)


MODEL_SHAPES = {"qwen2.5-0.5b": (qwen25_05b, "Qwen2.5-0.5B shape"), "qwen3-0.6b": (qwen3_06b, "Qwen3-0.6B shape"),
                "llama3.2-1b": (llama32_1b, "Llama-3.2-1B shape"), "7b": (qwen25_7b, "Qwen2.5-7B shape")}


def model_shape(name: str) -> ModelConfig:
    if name not in MODEL_SHAPES:
        raise ValueError(f"model shape must be one of {', '.join(MODEL_SHAPES)}, got {name!r}")
    return MODEL_SHAPES[name][0]()


def model_description(name: str | None) -> str:
    """"tiny (embedded)" for None, else e.g. "Qwen2.5-0.5B shape, random weights"."""
    return "tiny (embedded)" if name is None else f"{MODEL_SHAPES[name][1]}, random weights"


# --- what a model moves and computes -------------------------------------------------------------------

def layer_linear_params(mc: ModelConfig) -> int:
    """Weights (and biases) of one decoder layer's four projections: qkv, o, gate_up, down."""
    q, kv, h, i = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim, mc.hidden_size, \
        mc.intermediate_size
    qkv = h * (q + 2 * kv) + ((q + 2 * kv) if mc.attention_bias else 0)
    o = q * h + (h if mc.o_proj_bias else 0)
    return qkv + o + h * 2 * i + i * h


def num_params(mc: ModelConfig) -> int:
    """Every parameter, a tied LM head counted once (what ``model.parameters()`` holds)."""
    norms = 2 * mc.hidden_size + (2 * mc.head_dim if mc.qk_norm else 0)
    embed = mc.vocab_size * mc.hidden_size
    return (embed + mc.num_hidden_layers * (layer_linear_params(mc) + norms) + mc.hidden_size
            + (0 if mc.tie_word_embeddings else embed))


def weight_bytes(mc: ModelConfig, dtype_bytes: int) -> int:
    """Bytes a decode step must read at least once: every parameter except an untied embedding table (a step
    reads one of its rows per sequence); a tied table is read whole as the LM head."""
    untied_embed = 0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size
    return (num_params(mc) - untied_embed) * dtype_bytes


def kv_bytes_per_token(mc: ModelConfig, dtype_bytes: int) -> int:
    return mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * dtype_bytes


def prefill_flops(mc: ModelConfig, prompt_len: int) -> float:
    """FLOPs of one prompt's prefill: the projections for every token, causal attention (QK^T and PV over
    the keys up to each token) and the LM head for the last token only."""
    q = mc.num_attention_heads * mc.head_dim
    projections = 2 * prompt_len * mc.num_hidden_layers * layer_linear_params(mc)
    attention = mc.num_hidden_layers * 4 * q * prompt_len * (prompt_len + 1) / 2
    return projections + attention + 2 * mc.hidden_size * mc.vocab_size


# --- the card --------------------------------------------------------------------------------------------

def card_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def result_tag(card: str, tiny: bool, shape: str | None = None) -> str:
    """File-name tag of a run: the card (``NVIDIA_H200``), then the model shape unless it is the default, then
    ``_tiny``. A CPU run is ``cpu_tiny``: it never shares a name with a GPU run."""
    tag = re.sub(r"[^A-Za-z0-9.-]+", "_", card).strip("_") or "unknown"
    if shape and shape != DEFAULT_SHAPE and not tiny:
        tag += f"_{shape}"
    return tag + ("_tiny" if tiny else "")


def cpu_threads(tiny: bool, asked: int | None = None) -> int:
    """The torch thread count for a CPU run, chosen once for the engine and the Hugging Face baselines alike:
    the engine's own rule (1 for the tiny model, whose 64-wide matmuls lose from splitting) unless asked."""
    return asked or (1 if tiny else torch.get_num_threads())


# --- timing ----------------------------------------------------------------------------------------------

def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def summary(values) -> dict | None:
    """mean / p50 / p99, or None for no values."""
    values = list(values)
    if not values:
        return None
    return {"mean": statistics.fmean(values), "p50": percentile(values, 50), "p99": percentile(values, 99)}


def time_ms(fn, device, reps: int = 10, warmup: int = 2) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn``: CUDA events on a GPU (the kernels' time, launch gaps
    included), wall time on a CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def copy_bandwidth(device, nbytes: int = 2 << 30, reps: int = 10) -> float:
    """The memory roofline, bytes read + written per second: median of device-to-device copies of ``nbytes``
    (torch's copy kernel on the SMs; far larger than L2)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device, reps))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def matmul_rate(device, m: int, k: int, n: int, dtype=torch.bfloat16, reps: int = 10) -> float:
    """FLOP/s of ``[m, k] @ [k, n]`` (median), e.g. a model's gate_up projection over a prefill step's tokens."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, generator=gen, device=device).to(dtype)
    b = torch.randn(k, n, generator=gen, device=device).to(dtype)
    ms = statistics.median(time_ms(lambda: a @ b, device, reps))
    return 2 * m * k * n / (ms * 1e-3)


# --- results ---------------------------------------------------------------------------------------------

def run_info(device) -> dict:
    """Who measured what: the card, the date, the command line and the versions that decide speed."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package):
        try:
            return version(package)
        except PackageNotFoundError:  # the torch backend needs neither numba package
            return None
    return {"card": card_name(device), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "numba": installed("numba"),
            "numba_cuda": installed("numba-cuda")}


def to_json_text(report: dict) -> str:
    """Indented JSON with every list of numbers on one line (the timelines would take a line per number)."""
    text = json.dumps(report, indent=2)
    return re.sub(r"\[\s+([-\d.,\s]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def write_json(path: Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json_text(report))
    return path
