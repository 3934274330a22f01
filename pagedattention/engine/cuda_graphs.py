"""Captured model steps: one CUDA graph per (tokens, sequences) bucket, replayed with a step padded up to it.

A small step is launch-bound: a decode step of the 0.5B shape is a few hundred kernel launches, whose host
time exceeds the GPU time they need. A graph replays them in one call. All graphs read the same static
buffers (their first rows) and share one memory pool; each step's inputs are staged into page-locked host
buffers and copied in with one asynchronous copy per input.

Buckets: decode steps (one token per sequence) at batch sizes 1, 2, 4, 8, 16, then every 16 up to max_num_seqs
(a step runs padded up to its bucket, and above 16 rows the GEMMs, the LM head and the sampler cost about their
rows: powers of two would waste up to half of a step's work); prefill steps of <= 4,096 tokens and <= 8
sequences at (tokens, sequences) in PREFILL_TOKENS x PREFILL_SEQS; mixed steps at decode batch sizes 1, 2, 4,
..., max_num_seqs with a prompt part from MIXED_PROMPTS. Bigger steps run eagerly: their GPU time hides
their launches, and a graph's attention grid, sized for its bound on every sequence's length, would grow with
tokens x sequences.

Layout of a bucket's rows (tokens and sequences alike): its ``num_decode`` decode rows first, then the
prompt part. A step's decode rows go to the top, its prompt rows right after the bucket's decode rows.

Padding: padding tokens belong to no sequence (``cu_seqlens_q`` ends before them, their slot is -1: nothing is
stored) and padding sequences have no tokens (prompt part) or attend to one never-written slot (decode part),
so neither touches the real ones. Attention is told ``max_context_len = max_model_len``: one capture serves
every context length; the real lengths arrive through ``context_lens`` at replay.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pagedattention.models.attention import AttentionMetadata

PREFILL_TOKENS = (128, 256, 512, 1024, 2048, 4096)
PREFILL_SEQS = (1, 2, 4, 8)
MIXED_PROMPTS = ((256, 2), (512, 4), (1024, 4), (2048, 8))  # a mixed step's prompt part: (tokens, sequences)


class Bucket(NamedTuple):
    num_tokens: int
    num_seqs: int
    is_prefill: bool  # it has a prompt part
    num_decode: int   # decode rows (all of a decode bucket's)


DECODE_STEP = 16  # decode buckets above this many rows are this many rows apart


def batch_sizes(max_num_seqs: int, step: int | None = None) -> list[int]:
    """1, 2, 4, ... doubling up to ``step`` (all the way with None), then every ``step`` rows; max_num_seqs last."""
    sizes, bs = [], 1
    while bs < max_num_seqs:
        sizes.append(bs)
        bs = bs * 2 if step is None or bs < step else bs + step
    return sizes + [max_num_seqs]


def graph_buckets(max_num_seqs: int, max_num_batched_tokens: int) -> list[Bucket]:
    """Every captured bucket: decode ones, prefill ones, then mixed ones, each smallest first."""
    decode = [Bucket(bs, bs, False, bs) for bs in batch_sizes(max_num_seqs, DECODE_STEP)]
    sizes = batch_sizes(max_num_seqs)
    prefill = [Bucket(t, s, True, 0) for t in PREFILL_TOKENS if t <= max_num_batched_tokens
               for s in PREFILL_SEQS if s <= max_num_seqs and s <= t]
    mixed = sorted(Bucket(bs + t, bs + s, True, bs) for bs in sizes for t, s in MIXED_PROMPTS
                   if bs + t <= max_num_batched_tokens)  # (sequences may exceed max_num_seqs: padding)
    return decode + prefill + mixed


class CudaGraphs:
    def __init__(self, model, config):
        self.model = model
        self.device = config.device
        self.max_model_len = config.max_model_len
        self.buckets = graph_buckets(config.max_num_seqs, config.max_num_batched_tokens)
        self.decode_buckets = [b for b in self.buckets if not b.is_prefill]
        self.prefill_buckets = [b for b in self.buckets if b.is_prefill and not b.num_decode]
        self.mixed_buckets = [b for b in self.buckets if b.is_prefill and b.num_decode]
        max_tokens = max(b.num_tokens for b in self.buckets)
        max_seqs = max(b.num_seqs for b in self.buckets)
        width = -(-config.max_model_len // config.block_size)
        pinned = self.device.type == "cuda"  # page-locked, so the copies are true async DMA
        self.host = {
            "input_ids": torch.zeros(max_tokens, dtype=torch.int64, pin_memory=pinned),
            "positions": torch.zeros(max_tokens, dtype=torch.int64, pin_memory=pinned),
            "slot_mapping": torch.full((max_tokens,), -1, dtype=torch.int64, pin_memory=pinned),
            "cu_seqlens_q": torch.zeros(max_seqs + 1, dtype=torch.int32, pin_memory=pinned),
            "context_lens": torch.ones(max_seqs, dtype=torch.int32, pin_memory=pinned),
            "block_tables": torch.zeros(max_seqs, width, dtype=torch.int32, pin_memory=pinned),
        }
        self.host_np = {name: t.numpy() for name, t in self.host.items()}
        self.static = {name: t.to(self.device, copy=True) for name, t in self.host.items()}
        self.output = torch.empty(max_tokens, model.config.hidden_size, dtype=config.dtype, device=self.device)
        # A decode graph ends with the LM head (every decode row samples), into these rows: one cuBLAS launch less
        # per step on the host. Not under tensor parallelism, whose LM head gathers the vocabulary's shards.
        self.logits = None
        if model.tp.size == 1:
            max_decode = max(b.num_seqs for b in self.decode_buckets)
            self.logits = torch.empty(max_decode, model.lm_head.out_features, dtype=config.dtype, device=self.device)
        self.graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        # recorded after each step's copies out of the host buffers, which the next step rewrites
        self.copied = torch.cuda.Event() if self.device.type == "cuda" else None

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per bucket, largest first, so the others reuse its memory pool. Each body runs once
        outside capture first: its kernels compile and the allocator settles."""
        pool = None
        for bucket in sorted(self.buckets, key=lambda b: (b.num_tokens, b.num_seqs), reverse=True):
            run = self.body(bucket)
            run()
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                run()
            pool = graph.pool() if pool is None else pool
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.device)

    def body(self, bucket: Bucket):
        """What a bucket's graph runs: the model over the first rows of the static buffers."""
        t, s, is_prefill, d = bucket
        b = self.static
        attn = AttentionMetadata(
            is_prefill=is_prefill, slot_mapping=b["slot_mapping"][:t], block_tables=b["block_tables"][:s],
            context_lens=b["context_lens"][:s], cu_seqlens_q=b["cu_seqlens_q"][:s - d + 1] if is_prefill else None,
            max_q_len=t - d if is_prefill else 1, max_context_len=self.max_model_len, num_decode_tokens=d)

        def run():
            self.output[:t] = self.model(b["input_ids"][:t], b["positions"][:t], attn)
            if self.logits is not None and not is_prefill:
                torch.mm(self.output[:t], self.model.lm_head.weight.t(), out=self.logits[:t])
        return run

    def bucket(self, x) -> Bucket | None:
        """The smallest bucket that holds step ``x`` (StepInputs), or None."""
        d = x.num_decode
        if not x.is_prefill:
            return next((b for b in self.decode_buckets if b.num_seqs >= d), None)
        buckets = self.mixed_buckets if d else self.prefill_buckets
        n, m = x.num_tokens - d, x.num_seqs - d  # the prompt part
        return next((b for b in buckets if b.num_decode >= d and b.num_tokens - b.num_decode >= n
                     and b.num_seqs - b.num_decode >= m), None)

    @staticmethod
    def output_rows(bucket: Bucket, x, rows):
        """Where step ``x``'s token rows ``rows`` lie in the output of ``bucket``'s graph."""
        shift = bucket.num_decode - x.num_decode
        return rows + shift * (rows >= x.num_decode) if shift and x.is_prefill else rows

    def replay(self, bucket: Bucket, x) -> torch.Tensor:
        """Run step ``x`` through its bucket's graph; returns the hidden states of the bucket's rows (``x``'s
        token rows at ``output_rows``; a decode graph's logits are in ``logits``, if it has them)."""
        self.stage(bucket, x)
        self.graphs[bucket].replay()
        return self.output[:bucket.num_tokens]

    def stage(self, bucket: Bucket, x) -> None:
        """Write step ``x`` into the static buffers, padded up to ``bucket``: its decode rows at the top, padding
        to the bucket's decode rows, its prompt rows, padding to the bucket's size.

        Block tables travel packed: ``width`` = this step's widest table, rows of ``width`` entries at the start
        of the host buffer, copied into the first ``width`` columns of the static ``[max_seqs, max_blocks]`` table
        (a few KB instead of the whole max_model_len-wide table every step). The columns beyond are stale but
        never read: every context fits in ``width`` blocks.
        """
        t, s, is_prefill, d = bucket
        n, m, xd = x.num_tokens, x.num_seqs, x.num_decode
        h = self.host_np
        if self.copied is not None:  # the last step's copies may still be queued (overlapped steps): let them read
            self.copied.synchronize()  # (an event never recorded is complete)

        def place(buf, values, end, pad):
            """``values`` (x's decode rows, then its prompt rows) into ``buf[:end]`` in the bucket's layout."""
            buf[:xd] = values[:xd]
            buf[xd:d] = pad
            buf[d:d + len(values) - xd] = values[xd:]
            buf[d + len(values) - xd:end] = pad

        for name, pad in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1)):
            place(h[name], getattr(x, name), t, pad)
        place(h["context_lens"], x.context_lens, s, 1)
        width = x.block_tables.shape[1]
        place(h["block_tables"].reshape(-1)[:s * width].reshape(s, width), x.block_tables, s, 0)
        copies = [("input_ids", t), ("positions", t), ("slot_mapping", t), ("context_lens", s)]
        if is_prefill:
            cu = h["cu_seqlens_q"]
            cu[:m - xd + 1] = x.prompt_cu_seqlens_q
            cu[m - xd + 1:s - d + 1] = n - xd
            copies.append(("cu_seqlens_q", s - d + 1))
        for name, rows in copies:
            self.static[name][:rows].copy_(self.host[name][:rows], non_blocking=True)
        self.static["block_tables"][:s, :width].copy_(
            self.host["block_tables"].view(-1)[:s * width].view(s, width), non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if x.input_ids_device is not None:  # an overlapped step: its decode tokens come from the last, on the device
            self.static["input_ids"][:xd].copy_(x.input_ids_device)
