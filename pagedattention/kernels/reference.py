"""Plain-torch attention over the paged KV cache: the tests' oracle and the CPU backend.

Cache layout (shared by every kernel in this package)::

    key_cache, value_cache : [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables[i, j]     : physical block holding tokens j*block_size .. (j+1)*block_size-1 of sequence i
    slot                   : block_id * block_size + offset  (the flat token index into the cache)

Each function gathers a sequence's tokens through its block table into contiguous K/V and calls
``scaled_dot_product_attention``, computing in float32 (or the input's dtype if wider).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_kv(key_cache, value_cache, block_table, context_len: int):
    """Contiguous ``[context_len, num_kv_heads, head_dim]`` K and V of one sequence."""
    block_size = key_cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = key_cache[blocks].reshape(-1, *key_cache.shape[2:])[:context_len]
    v = value_cache[blocks].reshape(-1, *value_cache.shape[2:])[:context_len]
    return k, v


def _attend(q, k, v, scale, causal_offset=None):
    """q [q_len, H, D], k/v [ctx, Hkv, D] -> [q_len, H, D]; GQA by repeating KV heads."""
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    qh = q.to(compute).transpose(0, 1)  # [H, q_len, D]
    kh = k.to(compute).repeat_interleave(group, dim=1).transpose(0, 1)
    vh = v.to(compute).repeat_interleave(group, dim=1).transpose(0, 1)
    mask = None
    if causal_offset is not None:
        # query row r sits at absolute position causal_offset + r and sees cache positions <= it
        q_pos = torch.arange(q.shape[0], device=q.device) + causal_offset
        mask = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).to(q.dtype)


def reference_paged_attention(query, key_cache, value_cache, block_tables, context_lens, *, scale=None):
    """Decode attention: ``query [num_seqs, num_heads, head_dim]``, one new token per sequence."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(query)
    lens = context_lens.tolist()
    for i, ctx in enumerate(lens):
        k, v = gather_kv(key_cache, value_cache, block_tables[i], ctx)
        out[i] = _attend(query[i : i + 1], k, v, scale)[0]
    return out


def reference_paged_prefill_attention(query, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens,
                                      *, scale=None):
    """Causal multi-token attention over the paged cache.

    ``query [total_q_tokens, num_heads, head_dim]`` packs the new tokens of every sequence
    (``cu_seqlens_q`` int32 ``[num_seqs + 1]``); sequence i's tokens are the last ``q_len_i`` of its
    ``context_lens[i]`` tokens, all of whose K/V are already in the cache.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(query)
    starts, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    for i, ctx in enumerate(lens):
        lo, hi = starts[i], starts[i + 1]
        k, v = gather_kv(key_cache, value_cache, block_tables[i], ctx)
        out[lo:hi] = _attend(query[lo:hi], k, v, scale, causal_offset=ctx - (hi - lo))
    return out


def reference_write_kv(key, value, key_cache, value_cache, slot_mapping):
    """Store ``key/value [num_tokens, num_kv_heads, head_dim]`` at their slots; slot -1 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[keep]
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[keep]


def reference_copy_blocks(key_caches, value_caches, src_to_dst):
    """Copy whole blocks in every layer: ``src_to_dst`` int64 ``[num_pairs, 2]``."""
    if len(src_to_dst) == 0:
        return
    src, dst = src_to_dst[:, 0].long(), src_to_dst[:, 1].long()
    for cache in list(key_caches) + list(value_caches):
        cache[dst] = cache[src]


def reference_rope_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping):
    """RoPE on ``query [n, H, D]`` and ``key [n, KH, D]`` (dim i with dim i + D/2; float32 ``cos``/``sin [n, D/2]``),
    rotated key and ``value`` stored at ``slot_mapping``; returns the rotated query (computed in float32)."""
    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos[:, None], sin[:, None]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    reference_write_kv(rotate(key), value, key_cache, value_cache, slot_mapping)
    return rotate(query)


def reference_add_rms_norm_(x, residual, weight, eps: float):
    """In place: ``residual += x``, then ``x = rms_norm(residual) * weight``; returns ``(x, residual)``."""
    residual.add_(x)
    x.copy_(torch.nn.functional.rms_norm(residual, (residual.shape[-1],), weight, eps))
    return x, residual


def reference_silu_and_mul(gate_up):
    """``gate_up [n, 2 * size]`` -> ``silu(gate) * up``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
