"""Attention kernels over the paged KV cache: Numba CUDA kernels and their torch references.

- ``paged_attention`` (decode.py): one new token per sequence; ``version="v1"`` (two-pass) or ``"v2"`` (one-pass,
  online softmax, split-KV).
- ``paged_prefill_attention`` (paged_prefill.py): causal multi-token attention over the cache (prefill, chunks,
  prefix-cache hits).
- ``write_kv`` / ``copy_blocks`` (cache_ops.py): store a step's new K/V; copy-on-write of whole blocks.
- ``rope_write_kv`` / ``add_rms_norm_`` / ``silu_and_mul`` (layer_ops.py): the model's small per-layer ops, fused
  (RoPE with the cache write, residual add with RMSNorm, SwiGLU's activation with its product).
- ``reference_*`` (reference.py): the plain-torch definitions the kernels are tested against.

The Numba kernels load lazily: importing this package needs neither a GPU nor numba.
"""
from .reference import (
    reference_copy_blocks,
    reference_paged_attention,
    reference_paged_prefill_attention,
    reference_write_kv,
)

_LAZY = {
    "paged_attention": "decode",
    "write_kv": "cache_ops",
    "copy_blocks": "cache_ops",
    "paged_prefill_attention": "paged_prefill",
    "rope_write_kv": "layer_ops",
    "add_rms_norm_": "layer_ops",
    "silu_and_mul": "layer_ops",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["paged_attention", "paged_prefill_attention", "write_kv", "copy_blocks", "rope_write_kv", "add_rms_norm_",
           "silu_and_mul",
           "reference_copy_blocks", "reference_paged_attention", "reference_paged_prefill_attention",
           "reference_write_kv"]
