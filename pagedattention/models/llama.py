"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over the paged KV cache.

Tokens arrive flattened: ``input_ids`` and ``positions`` are ``[num_tokens]``, packing every sequence of the
step (AttentionMetadata says which tokens belong to which sequence and where their K/V live). There is no
batch dimension and no padding; only attention looks across tokens, and it does so through the cache.

Module names follow Hugging Face checkpoints (``model.layers.N.self_attn...``) except two fused projections,
each one matmul instead of several:
    qkv_proj     = [q_proj; k_proj; v_proj]   (rows stacked in that order, biases too)
    gate_up_proj = [gate_proj; up_proj]
``hf_weight_slots()`` tells the loader which rows of which parameter each checkpoint tensor fills.

Tensor parallelism (``tp``, parallel.py): each rank builds the same modules over its share of the heads, the MLP
features and the vocabulary; at ``tp.size == 1`` they are plain ``nn.Linear`` / ``nn.Embedding``.

A decode step is launch-bound, so the small ops between the matmuls are fused (``BackendOps``): RoPE with the
KV-cache write, each residual add with the RMSNorm after it (the residual stream travels beside the layer
outputs, as in vLLM), SwiGLU's activation with its product.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import parallel
from .attention import AttentionMetadata, BackendOps, PagedAttention, backend_ops
from .config import ModelConfig
from .parallel import TensorParallel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # one fused kernel on CUDA (accumulates in float32); HF's seven small ops give the same up to rounding
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """float32 ``[head_dim // 2]``: RoPE's rotation speed of each pair of dims, after ``rope_scaling``."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":  # positions are compressed by `factor`
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        # Llama 3.1: slow (long-wavelength) dims are slowed by `factor`, fast dims kept, the band between
        # interpolated; wavelengths are measured against the original training context
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {scaling['rope_type']!r}")


class RotaryEmbedding(nn.Module):
    """cos/sin of each token's position, computed on the fly (no table sized by the longest context)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_parameters(self):
        """Recompute ``inv_freq`` in float32 (after the model was materialised or cast to a low dtype)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)

    def forward(self, positions):
        """float32 cos and sin ``[num_tokens, head_dim // 2]`` of each token's angles: dims i and i + head_dim/2
        rotate together by angle ``position * inv_freq[i]`` (HF's "rotate_half" layout)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()


class Attention(nn.Module):
    """Over this rank's heads: ``num_heads`` and ``num_kv_heads`` are the model's divided by ``tp.size``."""

    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.num_heads = config.num_attention_heads // tp.size
        self.num_kv_heads = config.num_key_value_heads // tp.size
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.qkv_proj = parallel.column_parallel_linear(config.hidden_size, (q_size, kv_size, kv_size),
                                                        config.attention_bias, tp)
        self.o_proj = parallel.row_parallel_linear(q_size, config.hidden_size, config.o_proj_bias, tp)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, attn: AttentionMetadata):
        n = x.shape[0]
        # strided views of the fused projection: the kernels read each head's row where it lies
        linear = self.attn.ops.linear
        q, k, v = linear(self.qkv_proj, x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(q, k, v, cos, sin, attn)  # RoPE, the cache write and attention
        return linear(self.o_proj, out.reshape(n, self.q_size))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = parallel.column_parallel_linear(config.hidden_size, (size, size), False, tp)
        self.down_proj = parallel.row_parallel_linear(size, config.hidden_size, False, tp)

    def forward(self, x, ops: BackendOps):
        return ops.linear(self.down_proj, ops.silu_and_mul(ops.linear(self.gate_up_proj, x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, x, residual, cos, sin, attn: AttentionMetadata, ops: BackendOps):
        """``x``: the previous layer's output, not yet added to ``residual`` (the running sum of every layer's
        output; None before the first layer, whose x is the embedding). Returns this layer's (x, residual).
        Each residual add is fused with the RMSNorm after it."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = ops.add_rms_norm_(x, residual, self.input_layernorm.weight, self.input_layernorm.eps)
        x = self.self_attn(x, cos, sin, attn)
        x, residual = ops.add_rms_norm_(x, residual, self.post_attention_layernorm.weight,
                                        self.post_attention_layernorm.eps)
        return self.mlp(x, ops), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = parallel.vocab_parallel_embedding(config.vocab_size, config.hidden_size, tp)
        self.rotary_emb = RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ops = backend_ops("torch")

    def forward(self, input_ids, positions, attn: AttentionMetadata):
        x, residual = self.embed_tokens(input_ids), None
        cos, sin = self.rotary_emb(positions)
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, attn, self.ops)
        return self.ops.add_rms_norm_(x, residual, self.norm.weight, self.norm.eps)[0]


class LlamaForCausalLM(nn.Module):
    # checkpoint projection -> (fused module here, which of its row shards)
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None):
        """``tp``: this rank's shard of the model under tensor parallelism (None: the whole model)."""
        super().__init__()
        tp = tp or parallel.SINGLE
        parallel.check_divisible(config, tp.size)
        self.config = config
        self.tp = tp
        self.model = LlamaModel(config, tp)
        self.lm_head = parallel.parallel_lm_head(config.hidden_size, config.vocab_size, tp)
        self.tie_weights()

    def tie_weights(self):
        """Share embed_tokens' matrix with lm_head when the config ties them (again after ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def bind_backend(self, backend: str) -> BackendOps:
        """Compute attention and the fused per-layer ops with ``backend`` ("torch" or "numba") from now on;
        returns its ops. The default is "torch"."""
        ops = backend_ops(backend)
        self.model.ops = ops
        for layer in self.model.layers:
            layer.self_attn.attn.ops = ops
        return ops

    def bind_kv_cache(self, key_caches: list[torch.Tensor], value_caches: list[torch.Tensor]):
        """Give layer i the cache tensors ``key_caches[i]``, ``value_caches[i]``
        (each ``[num_blocks, block_size, num_kv_heads, head_dim]``, the model's dtype and device; this rank's
        KV heads under tensor parallelism)."""
        layers = self.model.layers
        num_kv_heads, head_dim = layers[0].self_attn.num_kv_heads, self.config.head_dim
        if len(key_caches) != len(layers) or len(value_caches) != len(layers):
            raise ValueError(f"need one key and one value cache per layer ({len(layers)}), got "
                             f"{len(key_caches)} and {len(value_caches)}")
        weight = self.model.embed_tokens.weight
        for i, (k, v) in enumerate(zip(key_caches, value_caches)):
            for name, cache in (("key_caches", k), ("value_caches", v)):
                if cache.dim() != 4 or tuple(cache.shape[2:]) != (num_kv_heads, head_dim):
                    raise ValueError(f"{name}[{i}] must be [num_blocks, block_size, {num_kv_heads}, "
                                     f"{head_dim}], got {list(cache.shape)}")
                if cache.dtype != weight.dtype or cache.device != weight.device:
                    raise ValueError(f"{name}[{i}] must be {weight.dtype} on {weight.device}, got "
                                     f"{cache.dtype} on {cache.device}")
            if k.shape != v.shape:
                raise ValueError(f"key_caches[{i}] and value_caches[{i}] differ in shape: "
                                 f"{list(k.shape)} vs {list(v.shape)}")
        for layer, k, v in zip(layers, key_caches, value_caches):
            layer.self_attn.attn.key_cache, layer.self_attn.attn.value_cache = k, v

    def forward(self, input_ids, positions, attn: AttentionMetadata):
        """``input_ids``, ``positions`` ``[num_tokens]`` -> final hidden states ``[num_tokens, hidden_size]``."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids and positions must be 1-D of equal length, got "
                             f"{list(input_ids.shape)} and {list(positions.shape)}")
        return self.model(input_ids, positions, attn)

    def compute_logits(self, hidden):
        """``[n, hidden_size]`` -> ``[n, vocab_size]`` in the model's dtype (sample only the rows you need; the
        sampler reads bfloat16/float16 as it is). Under tensor parallelism on rank 0; the other ranks get
        ``[n, 0]``."""
        return self.lm_head(hidden)

    def hf_weight_slots(self) -> dict[str, tuple]:
        """Each Hugging Face checkpoint tensor name -> (the parameter it fills, the rows it fills) or, for a tensor
        split by tensor parallelism, (parameter, rows, the ``parallel.Shard`` of the checkpoint tensor to load)."""
        slots = {}
        for name, param in self.named_parameters():  # a tied lm_head is not listed (it is embed_tokens)
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name)
            sizes = getattr(module, "shard_sizes", None)
            if sizes is None:
                split = parallel.checkpoint_slot(module, leaf)
                slots[name] = (param, slice(None)) if split is None else (param, *split)
                continue
            fused = module_name.rpartition(".")[2]
            for part, (target, shard) in self.packed_modules.items():
                if target == fused:
                    start = sum(sizes[:shard])
                    hf_name = f"{module_name.rpartition('.')[0]}.{part}.{leaf}"
                    rows, split = slice(start, start + sizes[shard]), parallel.column_shard(module, sizes[shard])
                    slots[hf_name] = (param, rows) if split is None else (param, rows, split)
        return slots
