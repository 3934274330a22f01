"""Models with random weights: the embedded tiny default, and any shape for benchmarks.

The tiny default is a Llama with seeded random weights and a byte tokenizer. It needs nothing downloaded, so
the engine, its tests and its examples run on a fresh machine. Its weights are drawn with std 0.2 (not the
usual 0.02): at 0.02 a model this small repeats its last input token, which would hide a wrong RoPE, head
mapping or cache from any test that compares outputs.

``random_model`` gives a real shape (say Qwen2.5-0.5B's) the usual std 0.02: benchmarks measure speed and
memory, not text.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .llama import LlamaForCausalLM
from .tokenizer import ByteTokenizer

TINY_CONFIG = dict(
    model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, max_position_embeddings=4096, bos_token_id=256, eos_token_id=257,
)


def random_init_(model: LlamaForCausalLM, seed: int = 0, std: float = 0.2) -> LlamaForCausalLM:
    """Fill every weight from a seeded normal (norm scales near 1, biases small); same values on any device."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                values = 1.0 + 0.1 * values
            elif name.endswith("bias"):
                values = 0.1 * values
            else:
                values = std * values
            param.copy_(values)
    return model


def tiny_model(dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    """``(model, tokenizer, config)`` of the embedded default, in eval mode."""
    config = ModelConfig(**TINY_CONFIG)
    model = random_init_(LlamaForCausalLM(config), seed)
    model = model.to(device=device, dtype=dtype)
    model.model.rotary_emb.reset_parameters()  # RoPE frequencies stay float32 whatever the dtype
    return model.eval(), ByteTokenizer(config.vocab_size), config


def random_model(config: ModelConfig, *, dtype: torch.dtype, device, seed: int):
    """``(model, None, config)``: random weights of ``config``'s shape, in eval mode, without a tokenizer.

    Linear weights are N(0, 0.02); the rest keep torch's default init. The model is built on ``device`` (seconds,
    not minutes, for 0.5B parameters) under ``seed`` without touching the global RNG, so the same seed on the same
    device gives the same weights.
    """
    device = torch.device(device)
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), device:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.02)
    model = model.to(dtype)
    model.model.rotary_emb.reset_parameters()  # RoPE frequencies stay float32
    return model.eval(), None, config
