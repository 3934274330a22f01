"""Turning a scheduled step into tensors and running the model: KV cache sizing, prefill, CUDA-graph decode.

Host work per step is a few numpy operations over the batch: slots are computed from the block tables
(slot = block_table[pos // block_size] * block_size + pos % block_size), decode inputs are written into
pinned buffers and copied once into the static buffers the captured graphs read.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from pagedattention.memory.paged_attention_manager import PagedAttentionManager
from pagedattention.models.attention import AttentionMetadata

from .config import EngineConfig
from .scheduler import Scheduler, cdiv
from .sequence import Sequence

CPU_NUM_KV_BLOCKS = 512
PREFILL_GRAPH_TOKENS = (128, 256, 512, 1024, 2048, 4096)
PREFILL_GRAPH_SEQS = (1, 2, 4, 8)


def load_model(config: EngineConfig):
    """(model, tokenizer or None, ModelConfig) for ``config.model``: a checkpoint directory, None for the
    embedded tiny model, or a ModelConfig for random weights of that shape (benchmarks; no tokenizer)."""
    from pagedattention import models

    if isinstance(config.model, models.ModelConfig):
        cuda_devices = [config.device] if config.device.type == "cuda" else []
        # initialised where it runs (seconds, not minutes, for 0.5B), seeded without touching the global RNG
        with torch.random.fork_rng(devices=cuda_devices), torch.device(config.device):
            torch.manual_seed(config.seed)
            model = models.LlamaForCausalLM(config.model)
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    torch.nn.init.normal_(module.weight, std=0.02)
        model = model.to(config.dtype)
        model.model.rotary_emb.reset_parameters()  # RoPE frequencies stay float32
        return model.eval(), None, config.model
    path = config.model
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if path is not None and not isinstance(path, str):
        raise TypeError(f"model must be a checkpoint directory (str or path), a ModelConfig or None, "
                        f"got {type(path).__name__}")
    model, tokenizer, model_config = models.load(path, dtype=config.dtype, device=config.device)
    return model.eval(), tokenizer, model_config


def prefill_graph_buckets(max_num_batched_tokens: int, max_num_seqs: int) -> list[tuple[int, int]]:
    """(tokens, sequences) of the captured prefill graphs, smallest first. Steps beyond the largest (big
    batches of prompts) run eagerly: their GPU time hides their launches, and a graph's attention grid, sized
    for its bound on every sequence's length, would grow with tokens x sequences."""
    tokens = [t for t in PREFILL_GRAPH_TOKENS if t <= max_num_batched_tokens]
    seqs = [s for s in PREFILL_GRAPH_SEQS if s <= max_num_seqs]
    return [(t, s) for t in tokens for s in seqs if s <= t]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes, bs = [], 1
    while bs < max_num_seqs:
        sizes.append(bs)
        bs *= 2
    return sizes + [max_num_seqs]


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.device
        self.backend = config.attention_backend
        self.model, self.tokenizer, self.model_config = load_model(config)
        mc = self.model_config
        self.block_size = config.block_size
        if config.max_model_len is not None and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's "
                             f"max_position_embeddings={mc.max_position_embeddings}")
        max_model_len = config.max_model_len or mc.max_position_embeddings
        self.bytes_per_block = (2 * mc.num_hidden_layers * self.block_size * mc.num_key_value_heads
                                * mc.head_dim * torch.empty((), dtype=config.dtype).element_size())
        num_blocks = config.num_kv_blocks or self._measure_num_blocks(max_model_len)
        # Unless asked for, no longer than the cache holds (a longer request could never finish).
        self.max_model_len = config.max_model_len or min(max_model_len, num_blocks * self.block_size)
        self.max_blocks_per_seq = cdiv(self.max_model_len, self.block_size)
        self.manager = PagedAttentionManager(num_blocks, self.block_size, mc.num_hidden_layers,
                                             mc.num_key_value_heads, mc.head_dim, config.dtype, self.device)
        self.model.bind_kv_cache(self.manager.key_caches, self.manager.value_caches)
        # the torch reference ops loop over sequences on the host, so only the kernels can be captured
        self.use_graphs = self.device.type == "cuda" and self.backend == "numba" and not config.enforce_eager
        if self.use_graphs:
            self._capture_decode_graphs()
            self._capture_prefill_graphs()

    # --- KV cache sizing ---------------------------------------------------------------------------

    @torch.inference_mode()
    def _measure_num_blocks(self, max_model_len: int) -> int:
        """CUDA: after a warm-up prefill of ``max_num_batched_tokens`` tokens (the activation peak), give
        KV blocks ``gpu_memory_utilization`` of what is left: free device memory plus what torch holds
        beyond that peak. CPU: a fixed size."""
        if self.device.type != "cuda":
            return CPU_NUM_KV_BLOCKS
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._warmup_prefill(max_model_len)
        torch.cuda.synchronize(self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        available = free + stats["reserved_bytes.all.current"] - stats["allocated_bytes.all.peak"]
        num_blocks = int(available * self.config.gpu_memory_utilization) // self.bytes_per_block
        if num_blocks < 1:
            raise RuntimeError(f"no GPU memory left for the KV cache ({available / 2**30:.2f} GiB available "
                               f"after the weights and a {self.config.max_num_batched_tokens}-token warm-up); "
                               "lower max_num_batched_tokens or use a smaller model")
        return num_blocks

    def _warmup_prefill(self, max_model_len: int) -> None:
        """One prefill step at the token budget, on a throw-away cache just big enough for it."""
        mc, bs = self.model_config, self.block_size
        num_tokens = self.config.max_num_batched_tokens
        seq_len = min(max_model_len, num_tokens)
        num_seqs = max(1, min(num_tokens // seq_len, self.config.max_num_seqs))
        blocks_per_seq = cdiv(seq_len, bs)
        shape = (num_seqs * blocks_per_seq, bs, mc.num_key_value_heads, mc.head_dim)
        caches = [[torch.empty(shape, dtype=self.config.dtype, device=self.device)
                   for _ in range(mc.num_hidden_layers)] for _ in range(2)]
        self.model.bind_kv_cache(*caches)
        n = num_seqs * seq_len
        positions = torch.arange(seq_len, device=self.device).repeat(num_seqs)
        block_tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32,
                                    device=self.device).view(num_seqs, blocks_per_seq)
        slots = (block_tables.long() * bs).repeat_interleave(bs, dim=1)[:, :seq_len] + positions.view(num_seqs, -1) % bs
        attn = AttentionMetadata(
            is_prefill=True, slot_mapping=slots.reshape(-1), block_tables=block_tables,
            context_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.arange(0, n + 1, seq_len, dtype=torch.int32, device=self.device),
            max_q_len=seq_len, max_context_len=seq_len, backend=self.backend)
        input_ids = torch.randint(0, mc.vocab_size, (n,), device=self.device)
        hidden = self.model(input_ids, positions, attn)
        # the sampler's peak: logits (and a sort) for a full decode batch
        logits = self.model.compute_logits(hidden[:min(n, self.config.max_num_seqs)])
        logits.sort(dim=-1)
        # release the throw-away cache (the model must hold some cache: one block per layer)
        del caches, hidden, logits
        placeholder = torch.empty((1, *shape[1:]), dtype=self.config.dtype, device=self.device)
        self.model.bind_kv_cache([placeholder] * mc.num_hidden_layers, [placeholder] * mc.num_hidden_layers)

    # --- a step ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Run one scheduled step; returns float32 logits of the sequences that sample (batch order)."""
        if is_prefill:
            arrays = self._prefill_arrays(seqs)
            bucket = self._stage_prefill(arrays) if self.use_graphs else None
            if bucket is not None:
                self.prefill_graphs[bucket].replay()
                hidden = self.prefill_output
            else:
                hidden = self.model(*self._prepare_prefill(arrays))
            return self.model.compute_logits(hidden[arrays["sample_rows"]])
        if self.use_graphs and len(seqs) <= self.graph_sizes[-1]:
            return self.model.compute_logits(self._replay_decode(seqs))
        input_ids, positions, attn = self._prepare_decode(seqs)
        return self.model.compute_logits(self.model(input_ids, positions, attn))

    def _slots(self, block_tables: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        bs = self.block_size
        return block_tables[rows, positions // bs].astype(np.int64) * bs + positions % bs

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """Through (cached) page-locked memory on CUDA: a copy from pageable memory would wait for the GPU
        to finish the work queued before it."""
        t = torch.from_numpy(array)
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _prefill_arrays(self, seqs: list[Sequence]) -> dict:
        """numpy inputs of a prefill step: tokens packed sequence after sequence (``cu_seqlens_q``)."""
        starts = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)
        q_lens = np.array([s.num_scheduled_tokens for s in seqs], dtype=np.int64)
        ends = starts + q_lens
        cu_seqlens = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu_seqlens[1:])
        input_ids = np.concatenate([np.asarray(s.token_ids[a:b], dtype=np.int64)
                                    for s, a, b in zip(seqs, starts.tolist(), ends.tolist())])
        # positions: start_i, start_i + 1, ... for each sequence, packed
        rows = np.repeat(np.arange(len(seqs)), q_lens)
        positions = np.arange(len(input_ids), dtype=np.int64) - np.repeat(cu_seqlens[:-1], q_lens) + starts[rows]
        block_tables = self.manager.block_tables_array([s.seq_id for s in seqs])
        return {"input_ids": input_ids, "positions": positions, "slot_mapping": self._slots(block_tables, rows, positions),
                "cu_seqlens_q": cu_seqlens, "context_lens": ends.astype(np.int32), "block_tables": block_tables,
                "max_q_len": int(q_lens.max()), "max_context_len": int(ends.max()),
                "sample_rows": [int(cu_seqlens[i + 1]) - 1 for i, s in enumerate(seqs) if Scheduler.samples(s)]}

    def _prepare_prefill(self, a: dict):
        attn = AttentionMetadata(
            is_prefill=True, slot_mapping=self._to_device(a["slot_mapping"]),
            block_tables=self._to_device(a["block_tables"]), context_lens=self._to_device(a["context_lens"]),
            cu_seqlens_q=self._to_device(a["cu_seqlens_q"]), max_q_len=a["max_q_len"],
            max_context_len=a["max_context_len"], backend=self.backend)
        return self._to_device(a["input_ids"]), self._to_device(a["positions"]), attn

    def _decode_arrays(self, seqs: list[Sequence], block_tables, input_ids, positions, context_lens, slots):
        """Fill decode inputs for ``seqs`` into rows 0..n-1 of the given numpy arrays (block tables filled)."""
        n = len(seqs)
        input_ids[:n] = [s.token_ids[-1] for s in seqs]
        positions[:n] = [len(s.token_ids) - 1 for s in seqs]
        context_lens[:n] = positions[:n] + 1
        slots[:n] = self._slots(block_tables, np.arange(n), positions[:n])

    def _prepare_decode(self, seqs: list[Sequence]):
        n = len(seqs)
        input_ids, positions, slots = (np.empty(n, dtype=np.int64) for _ in range(3))
        context_lens = np.empty(n, dtype=np.int32)
        block_tables = self.manager.block_tables_array([s.seq_id for s in seqs])
        self._decode_arrays(seqs, block_tables, input_ids, positions, context_lens, slots)
        attn = AttentionMetadata(
            is_prefill=False, slot_mapping=self._to_device(slots), block_tables=self._to_device(block_tables),
            context_lens=self._to_device(context_lens), max_context_len=int(context_lens.max()),
            backend=self.backend)
        return self._to_device(input_ids), self._to_device(positions), attn

    # --- CUDA graphs for decode ----------------------------------------------------------------------

    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        """One graph per batch-size bucket, all reading the same static buffers (views of their first rows).

        The attention kernel is told ``max_context_len = max_model_len``, so one capture serves every
        context length; the real lengths arrive through ``context_lens`` at replay.
        """
        self._allocate_decode_buffers()
        self.graphs = self._capture({bs: self._graph_body(bs) for bs in self.graph_sizes})

    def _capture(self, bodies: dict) -> dict:
        """One CUDA graph per body (key -> graph), largest (last) first, so the others reuse its memory pool.
        Each body runs once outside capture first: its kernels compile and the allocator settles."""
        graphs, pool = {}, None
        for key, run in reversed(bodies.items()):
            run()
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                run()
            pool = graph.pool() if pool is None else pool
            graphs[key] = graph
        torch.cuda.synchronize(self.device)
        return graphs

    def _graph_body(self, bs: int):
        s = self.static
        attn = AttentionMetadata(
            is_prefill=False, slot_mapping=s["slot_mapping"][:bs], block_tables=s["block_tables"][:bs],
            context_lens=s["context_lens"][:bs], max_context_len=self.max_model_len, backend=self.backend)

        def run():
            self.graph_output[:bs] = self.model(s["input_ids"][:bs], s["positions"][:bs], attn)
        return run

    def _allocate_decode_buffers(self) -> None:
        """The static inputs the graphs read (rows 0..bucket-1) and the host buffers they are staged from."""
        max_bs, width = self.config.max_num_seqs, self.max_blocks_per_seq
        self.graph_sizes = graph_batch_sizes(max_bs)
        pinned = self.device.type == "cuda"  # page-locked, so the copies are true async DMA
        self.host = {
            "input_ids": torch.zeros(max_bs, dtype=torch.int64, pin_memory=pinned),
            "positions": torch.zeros(max_bs, dtype=torch.int64, pin_memory=pinned),
            "slot_mapping": torch.full((max_bs,), -1, dtype=torch.int64, pin_memory=pinned),
            "context_lens": torch.ones(max_bs, dtype=torch.int32, pin_memory=pinned),
            "block_tables": torch.zeros(max_bs, width, dtype=torch.int32, pin_memory=pinned),
        }
        self.host_np = {name: t.numpy() for name, t in self.host.items()}
        self.static = {name: t.to(self.device, copy=True) for name, t in self.host.items()}
        self.graph_output = torch.empty(max_bs, self.model_config.hidden_size,
                                        dtype=self.config.dtype, device=self.device)

    def _stage_decode(self, seqs: list[Sequence]) -> int:
        """Write this step's decode inputs into the static buffers; returns the bucket (graph batch size).

        Block tables travel packed: ``width`` = this batch's longest table, rows of ``width`` entries at the
        start of the host buffer, copied into the first ``width`` columns of the static ``[max_num_seqs,
        max_blocks_per_seq]`` table (a few KB instead of the whole max_model_len-wide table every step). The
        columns beyond are stale but never read: every context fits in ``width`` blocks.
        """
        n = len(seqs)
        bs = next(size for size in self.graph_sizes if size >= n)
        h = self.host_np
        width = cdiv(max(len(s.token_ids) for s in seqs), self.block_size)
        tables = h["block_tables"].reshape(-1)[:bs * width].reshape(bs, width)
        self.manager.block_tables_array([s.seq_id for s in seqs], tables)
        self._decode_arrays(seqs, tables, h["input_ids"], h["positions"], h["context_lens"], h["slot_mapping"])
        # padding rows: attend to one (never written) slot, store nothing
        h["input_ids"][n:bs] = 0
        h["positions"][n:bs] = 0
        h["context_lens"][n:bs] = 1
        h["slot_mapping"][n:bs] = -1
        tables[n:bs] = 0
        for name, host in self.host.items():
            if name == "block_tables":
                self.static[name][:bs, :width].copy_(host.view(-1)[:bs * width].view(bs, width), non_blocking=True)
            else:
                self.static[name][:bs].copy_(host[:bs], non_blocking=True)
        return bs

    def _replay_decode(self, seqs: list[Sequence]) -> torch.Tensor:
        self.graphs[self._stage_decode(seqs)].replay()
        return self.graph_output[:len(seqs)]

    # --- CUDA graphs for small prefill steps -----------------------------------------------------------

    @torch.inference_mode()
    def _capture_prefill_graphs(self) -> None:
        """A prefill step of a few hundred tokens (continuous batching admits a request whenever one
        finishes) is launch-bound like decode: its few hundred launches cost more host time than the GPU needs for
        them. One graph per (tokens, sequences) bucket; a step is padded up to its bucket. Padding tokens
        belong to no sequence (``cu_seqlens_q`` ends before them: attention never writes their rows, and
        their slot is -1), padding sequences have no tokens, so neither touches the real ones."""
        self._allocate_prefill_buffers()
        self.prefill_graphs = self._capture({bucket: self._prefill_graph_body(*bucket)
                                             for bucket in self.prefill_buckets})

    def _allocate_prefill_buffers(self) -> None:
        self.prefill_buckets = prefill_graph_buckets(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        max_tokens = max((t for t, _ in self.prefill_buckets), default=0)
        max_seqs = max((s for _, s in self.prefill_buckets), default=0)
        pinned = self.device.type == "cuda"
        self.prefill_host = {
            "input_ids": torch.zeros(max_tokens, dtype=torch.int64, pin_memory=pinned),
            "positions": torch.zeros(max_tokens, dtype=torch.int64, pin_memory=pinned),
            "slot_mapping": torch.full((max_tokens,), -1, dtype=torch.int64, pin_memory=pinned),
            "cu_seqlens_q": torch.zeros(max_seqs + 1, dtype=torch.int32, pin_memory=pinned),
            "context_lens": torch.ones(max_seqs, dtype=torch.int32, pin_memory=pinned),
            "block_tables": torch.zeros(max_seqs, self.max_blocks_per_seq, dtype=torch.int32, pin_memory=pinned),
        }
        self.prefill_host_np = {name: t.numpy() for name, t in self.prefill_host.items()}
        self.prefill_static = {name: t.to(self.device, copy=True) for name, t in self.prefill_host.items()}
        self.prefill_output = torch.empty(max_tokens, self.model_config.hidden_size,
                                          dtype=self.config.dtype, device=self.device)

    def _prefill_graph_body(self, num_tokens: int, num_seqs: int):
        p = self.prefill_static
        attn = AttentionMetadata(
            is_prefill=True, slot_mapping=p["slot_mapping"][:num_tokens], block_tables=p["block_tables"][:num_seqs],
            context_lens=p["context_lens"][:num_seqs], cu_seqlens_q=p["cu_seqlens_q"][:num_seqs + 1],
            max_q_len=num_tokens, max_context_len=self.max_model_len, backend=self.backend)

        def run():
            self.prefill_output[:num_tokens] = self.model(p["input_ids"][:num_tokens], p["positions"][:num_tokens], attn)
        return run

    def _stage_prefill(self, a: dict) -> tuple[int, int] | None:
        """Write a prefill step's inputs (from ``_prefill_arrays``) into the static buffers of the smallest
        bucket that holds it, padded; returns the bucket, or None when the step is too big for every graph."""
        n, m = len(a["input_ids"]), len(a["context_lens"])
        bucket = next(((t, s) for t, s in self.prefill_buckets if t >= n and s >= m), None)
        if bucket is None:
            return None
        t, s = bucket
        h = self.prefill_host_np
        for name, pad in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1)):
            h[name][:n] = a[name]
            h[name][n:t] = pad
        h["cu_seqlens_q"][:m + 1] = a["cu_seqlens_q"]
        h["cu_seqlens_q"][m + 1:s + 1] = n
        h["context_lens"][:m] = a["context_lens"]
        h["context_lens"][m:s] = 1
        width = a["block_tables"].shape[1]  # packed rows of this step's width, as for decode
        tables = h["block_tables"].reshape(-1)[:s * width].reshape(s, width)
        tables[:m] = a["block_tables"]
        tables[m:] = 0
        for name, rows in (("input_ids", t), ("positions", t), ("slot_mapping", t), ("cu_seqlens_q", s + 1),
                           ("context_lens", s)):
            self.prefill_static[name][:rows].copy_(self.prefill_host[name][:rows], non_blocking=True)
        self.prefill_static["block_tables"][:s, :width].copy_(
            self.prefill_host["block_tables"].view(-1)[:s * width].view(s, width), non_blocking=True)
        return bucket

    @torch.inference_mode()
    def decode_eager(self, seqs: list[Sequence]) -> torch.Tensor:
        """The decode step without graphs (for checking that a replay recomputes the same logits)."""
        input_ids, positions, attn = self._prepare_decode(seqs)
        return self.model.compute_logits(self.model(input_ids, positions, attn))
