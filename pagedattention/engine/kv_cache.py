"""How many KV blocks the cache gets, decided before any of it is allocated.

CUDA: after a warm-up prefill of ``max_num_batched_tokens`` tokens (the activation peak), KV blocks get
``gpu_memory_utilization`` of what is left: free device memory plus what torch holds beyond that peak.
CPU: a fixed size. A size asked for (``num_kv_blocks``) is checked against the memory free first, so a typo
fails at once with the argument's name instead of after allocating gigabytes.
"""
from __future__ import annotations

import os

import torch

from pagedattention.models.attention import AttentionMetadata

from .config import EngineConfig

CPU_NUM_KV_BLOCKS = 512


def bytes_per_block(config: EngineConfig, model_config) -> int:
    """K and V of ``block_size`` tokens in every layer."""
    mc = model_config
    return (2 * mc.num_hidden_layers * config.block_size * mc.num_key_value_heads * mc.head_dim
            * torch.empty((), dtype=config.dtype).element_size())


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no check
        return 1 << 62


def num_kv_blocks(config: EngineConfig, model, model_config) -> int:
    per_block = bytes_per_block(config, model_config)
    if config.num_kv_blocks is not None:
        need, free = config.num_kv_blocks * per_block, free_memory(config.device)
        if need > free:
            raise ValueError(f"num_kv_blocks={config.num_kv_blocks} needs {need / 2**30:.2f} GiB of KV cache "
                             f"({per_block} bytes per block) but only {free / 2**30:.2f} GiB is free on "
                             f"{config.device}; ask for at most {free // per_block} blocks")
        return config.num_kv_blocks
    if config.device.type != "cuda":
        return CPU_NUM_KV_BLOCKS
    return _measure(config, model, model_config, per_block)


@torch.inference_mode()
def _measure(config: EngineConfig, model, model_config, per_block: int) -> int:
    device = config.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    _warmup_prefill(config, model, model_config)
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)
    available = free + stats["reserved_bytes.all.current"] - stats["allocated_bytes.all.peak"]
    num_blocks = int(available * config.gpu_memory_utilization) // per_block
    if num_blocks < 1:
        raise RuntimeError(f"no GPU memory left for the KV cache ({available / 2**30:.2f} GiB available "
                           f"after the weights and a {config.max_num_batched_tokens}-token warm-up); "
                           "lower max_num_batched_tokens or use a smaller model")
    return num_blocks


def _warmup_prefill(config: EngineConfig, model, mc) -> None:
    """One prefill step at the token budget, on a throw-away cache just big enough for it."""
    device, bs = config.device, config.block_size
    num_tokens = config.max_num_batched_tokens
    seq_len = min(config.max_model_len or mc.max_position_embeddings, num_tokens)
    num_seqs = max(1, min(num_tokens // seq_len, config.max_num_seqs))
    blocks_per_seq = -(-seq_len // bs)
    shape = (num_seqs * blocks_per_seq, bs, mc.num_key_value_heads, mc.head_dim)
    caches = [[torch.empty(shape, dtype=config.dtype, device=device) for _ in range(mc.num_hidden_layers)]
              for _ in range(2)]
    model.bind_kv_cache(*caches)
    n = num_seqs * seq_len
    positions = torch.arange(seq_len, device=device).repeat(num_seqs)
    block_tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32, device=device).view(num_seqs, -1)
    slots = (block_tables.long() * bs).repeat_interleave(bs, dim=1)[:, :seq_len] + positions.view(num_seqs, -1) % bs
    attn = AttentionMetadata(
        is_prefill=True, slot_mapping=slots.reshape(-1), block_tables=block_tables,
        context_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.arange(0, n + 1, seq_len, dtype=torch.int32, device=device),
        max_q_len=seq_len, max_context_len=seq_len)
    input_ids = torch.randint(0, mc.vocab_size, (n,), device=device)
    hidden = model(input_ids, positions, attn)
    # the sampler's peak: float32 logits (and a sort) for a full decode batch
    logits = model.compute_logits(hidden[:min(n, config.max_num_seqs)]).float()
    logits.sort(dim=-1)
    # release the throw-away cache (the model must hold some cache: one block per layer)
    del caches, hidden, logits
    placeholder = torch.empty((1, *shape[1:]), dtype=config.dtype, device=device)
    model.bind_kv_cache([placeholder] * mc.num_hidden_layers, [placeholder] * mc.num_hidden_layers)
