"""Models: the Llama-family decoder over the paged KV cache, checkpoint loading, the embedded tiny default."""
from __future__ import annotations

import torch

from .attention import AttentionMetadata, PagedAttention
from .config import ModelConfig
from .llama import LlamaForCausalLM
from .loader import load_model
from .tiny import tiny_model
from .tokenizer import ByteTokenizer, HFTokenizer


def load(model: str | None = None, dtype: torch.dtype | str = torch.float32, device="cpu"):
    """``(model, tokenizer, config)``: the embedded tiny default for None, else a checkpoint directory.

    ``dtype`` is a floating torch dtype or its name ("bfloat16", "float16", "float32").
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype or its name, got {dtype!r}")
    if model is None:
        return tiny_model(dtype=dtype, device=device)
    return load_model(model, dtype=dtype, device=device)


__all__ = ["AttentionMetadata", "ByteTokenizer", "HFTokenizer", "LlamaForCausalLM", "ModelConfig",
           "PagedAttention", "load", "load_model", "tiny_model"]
