"""Attention kernels over the paged KV cache: Numba CUDA kernels and their torch references."""
from .reference import (
    reference_copy_blocks,
    reference_paged_attention,
    reference_paged_prefill_attention,
    reference_write_kv,
)
