"""The embedded default model: a tiny Llama with seeded random weights and a byte tokenizer.

It needs nothing downloaded, so the engine, its tests and its examples run on a fresh machine. Weights are
drawn with std 0.2 (not the usual 0.02): at 0.02 a model this small repeats its last input token, which would
hide a wrong RoPE, head mapping or cache from any test that compares outputs.
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
