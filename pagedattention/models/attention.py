"""The model's one door to the paged KV cache: AttentionMetadata and the PagedAttention layer.

Every step the engine describes where this step's tokens live (AttentionMetadata); each layer then
1. rotates the new tokens' q and k (RoPE) and stores k and v at their cache slots (``rope_write_kv``), and
2. attends over the cache: ``paged_prefill_attention`` for packed multi-token queries (prompts, prompt
   chunks, recomputation) or ``paged_attention`` for one new token per sequence (decode). A mixed step
   (decode tokens first, then prompt tokens, ``num_decode_tokens``) runs each kernel on its part.
A decode step does both in one call (``rope_decode``), which the CUDA backend runs as one kernel where it can.
Because prefill reads K/V back from the cache, a chunk sees the earlier chunks and cached prefixes for free.

Backends: "torch" runs the plain-torch references (CPU, tests); "numba" runs the CUDA kernels (or the same
kernels in Numba's simulator on CPU). The decode path has no host syncs, so a CUDA graph can capture it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

BACKENDS = ("torch", "numba")


@dataclass
class AttentionMetadata:
    """Where a step's tokens live. The first ``num_decode_tokens`` tokens (all of them in a decode step) are one
    new token each of the first sequences; the rest, in a prefill or mixed step, are packed prompt tokens of the
    remaining sequences, ``cu_seqlens_q`` marking where each starts (counted from the first prompt token)."""
    is_prefill: bool                # any prompt tokens (a prefill or a mixed step)
    slot_mapping: torch.Tensor      # int64 [num_tokens]: cache slot of each input token (-1 = don't store)
    block_tables: torch.Tensor      # int32 [num_seqs, max_blocks]
    context_lens: torch.Tensor      # int32 [num_seqs]: tokens in the cache after this step's writes
    cu_seqlens_q: torch.Tensor | None = None  # int32 [num_prompt_seqs + 1], prefill and mixed steps only
    max_q_len: int = 1              # longest prompt part (host-side bound)
    max_context_len: int = 0        # host-side upper bound for the decode part (the graph's bound)
    num_decode_tokens: int = 0      # a mixed step's decode tokens (a decode step: every token; prefill: 0)


@dataclass(frozen=True)
class BackendOps:
    """What a backend computes for the model: the cache-side attention ops and the fused per-layer ops."""
    rope_write_kv: Callable      # (q, k, v, cos, sin, key_cache, value_cache, slot_mapping) -> rotated q
    # (q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, *, scale, max_q_len, out=None)
    prefill: Callable
    # (q, key_cache, value_cache, block_tables, context_lens, *, scale, max_context_len, out=None)
    decode: Callable
    # (q, k, v, cos, sin, key_cache, value_cache, slot_mapping, block_tables, context_lens, *, scale,
    #  max_context_len) -> attention output: rope_write_kv then decode, for a decode step
    rope_decode: Callable
    add_rms_norm_: Callable      # (x, residual, weight, eps) -> (x, residual), in place
    silu_and_mul: Callable       # (gate_up) -> silu(gate) * up
    copy_blocks: Callable        # (key_caches, value_caches, src_to_dst) -> None: copy-on-write of whole blocks
    linear: Callable             # (layer, x) -> layer(x) for a projection, by the fastest GEMM for x's rows


@functools.lru_cache(maxsize=None)
def backend_ops(backend: str) -> BackendOps:
    """The ops of a backend, with the kernel-only host bounds (``max_q_len``, ``max_context_len``) accepted by
    both."""
    if backend == "torch":
        from pagedattention.kernels import reference as ref

        def into(out, result):
            return result if out is None else out.copy_(result)

        def prefill(q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, *, scale, max_q_len,
                    out=None):
            return into(out, ref.reference_paged_prefill_attention(q, key_cache, value_cache, block_tables,
                                                                   cu_seqlens_q, context_lens, scale=scale))

        def decode(q, key_cache, value_cache, block_tables, context_lens, *, scale, max_context_len, out=None):
            return into(out, ref.reference_paged_attention(q, key_cache, value_cache, block_tables, context_lens,
                                                           scale=scale))

        def rope_decode(q, k, v, cos, sin, key_cache, value_cache, slot_mapping, block_tables, context_lens, *,
                        scale, max_context_len):
            q = ref.reference_rope_write_kv(q, k, v, cos, sin, key_cache, value_cache, slot_mapping)
            return ref.reference_paged_attention(q, key_cache, value_cache, block_tables, context_lens, scale=scale)

        return BackendOps(ref.reference_rope_write_kv, prefill, decode, rope_decode, ref.reference_add_rms_norm_,
                          ref.reference_silu_and_mul, ref.reference_copy_blocks, _call)
    if backend == "numba":
        # imported on first use: the kernels pull in numba.cuda, which the torch path never needs
        from pagedattention.kernels import copy_blocks, layer_ops, paged_attention, paged_prefill_attention
        from pagedattention.kernels import skinny_gemm
        from pagedattention.kernels.decode import rope_paged_attention

        def prefill(q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, *, scale, max_q_len,
                    out=None):
            return paged_prefill_attention(q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens,
                                           scale=scale, max_q_len=max_q_len or None, out=out)

        def decode(q, key_cache, value_cache, block_tables, context_lens, *, scale, max_context_len, out=None):
            return paged_attention(q, key_cache, value_cache, block_tables, context_lens, scale=scale,
                                   max_context_len=max_context_len or None, out=out)

        def rope_decode(q, k, v, cos, sin, key_cache, value_cache, slot_mapping, block_tables, context_lens, *,
                        scale, max_context_len):
            return rope_paged_attention(q, k, v, cos, sin, key_cache, value_cache, slot_mapping, block_tables,
                                        context_lens, scale=scale, max_context_len=max_context_len or None)

        def linear(layer, x):
            # a decode step's few rows: the tensor-core kernel where it was measured faster than cuBLAS
            weight = layer.weight
            if (skinny_gemm.serves(x.shape[0], *weight.shape) and type(layer) is nn.Linear and x.is_cuda
                    and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16)
                    and x.is_contiguous() and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0):
                return skinny_gemm.skinny_gemm(x, weight, layer.bias)
            return layer(x)

        return BackendOps(layer_ops.rope_write_kv, prefill, decode, rope_decode, layer_ops.add_rms_norm_,
                          layer_ops.silu_and_mul, copy_blocks, linear)
    raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")


def _call(layer, x):
    return layer(x)


class PagedAttention(nn.Module):
    """Attention of one layer over its slice of the paged cache (bound later by ``bind_kv_cache``), computed by
    the backend's ops (bound once by ``LlamaForCausalLM.bind_backend``)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.key_cache: torch.Tensor | None = None    # [num_blocks, block_size, num_kv_heads, head_dim]
        self.value_cache: torch.Tensor | None = None
        self.ops = backend_ops("torch")

    def forward(self, q, k, v, cos, sin, attn: AttentionMetadata):
        """q ``[num_tokens, num_heads, head_dim]``, k/v ``[num_tokens, num_kv_heads, head_dim]`` before RoPE (rows
        may be slices of the fused qkv projection), ``cos``/``sin`` float32 ``[num_tokens, head_dim / 2]`` -> the
        attention output like q."""
        if self.key_cache is None:
            raise RuntimeError("no KV cache bound: call model.bind_kv_cache(key_caches, value_caches) first")
        if attn.is_prefill and attn.cu_seqlens_q is None:
            raise ValueError("prefill AttentionMetadata needs cu_seqlens_q (int32 [num_seqs + 1])")
        ops, caches = self.ops, (self.key_cache, self.value_cache)
        if not attn.is_prefill:
            return ops.rope_decode(q, k, v, cos, sin, *caches, attn.slot_mapping, attn.block_tables,
                                   attn.context_lens, scale=self.scale, max_context_len=attn.max_context_len)
        q = ops.rope_write_kv(q, k, v, cos, sin, *caches, attn.slot_mapping)
        d = attn.num_decode_tokens
        if d == 0:
            return ops.prefill(q, *caches, attn.block_tables, attn.cu_seqlens_q, attn.context_lens,
                               scale=self.scale, max_q_len=attn.max_q_len)
        # a mixed step: each kernel writes its rows of one output
        out = torch.empty_like(q)
        ops.decode(q[:d], *caches, attn.block_tables[:d], attn.context_lens[:d], scale=self.scale,
                   max_context_len=attn.max_context_len, out=out[:d])
        ops.prefill(q[d:], *caches, attn.block_tables[d:], attn.cu_seqlens_q, attn.context_lens[d:],
                    scale=self.scale, max_q_len=attn.max_q_len, out=out[d:])
        return out
