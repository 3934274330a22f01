"""Captured model steps: one CUDA graph per (tokens, sequences) bucket, replayed with a step padded up to it.

A small step is launch-bound: a decode step of the 0.5B shape is a few hundred kernel launches, whose host
time exceeds the GPU time they need. A graph replays them in one call. All graphs read the same static
buffers and share one memory pool; each step's inputs are staged into page-locked host memory and copied in
with two asynchronous copies (Staging, below).

Buckets: decode steps (one token per sequence) at batch sizes 1, 2, 4, 8, 16, then every 16 up to max_num_seqs
(a step runs padded up to its bucket, and above 16 rows the GEMMs, the LM head and the sampler cost about their
rows: powers of two would waste up to half of a step's work); prefill steps of <= 4,096 tokens and <= 8
sequences at (tokens, sequences) in PREFILL_TOKENS x PREFILL_SEQS; mixed steps at decode batch sizes 1, 2, 4,
..., max_num_seqs with a prompt part from MIXED_PROMPTS (each size takes up to 8 prompts: a padding sequence has no
tokens, so few prompts in a bucket of 8 cost only attention blocks that exit at once, while many short prompts
need not pad up to the largest size). Bigger steps run eagerly: their GPU time hides
their launches, and a graph's attention grid, sized for its bound on every sequence's length, would grow with
tokens x sequences.

Layout of a bucket's rows (tokens and sequences alike): its ``num_decode`` decode rows first, then the
prompt part. A step's decode rows go to the top, its prompt rows right after the bucket's decode rows.

Staging: a step's 1-D inputs travel in one copy. They share one page-locked buffer of int64 words (and its device
twin), each bucket's graph reading them at offsets of its own, packed for its sizes (t tokens, s sequences):

    int64:  [ input_ids (t) | positions (t) | slot_mapping (t) |
    int32:                                                      | context_lens (s) | cu_seqlens_q (s - d + 1) ]

(each on a 16-byte boundary), so a step copies only the words its bucket reads (~3t + s) and rewrites all of them
(values, then padding).
The block tables have their own buffer (their width changes with the step, below).

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
MIXED_PROMPTS = ((256, 8), (512, 8), (1024, 8), (1536, 8), (2048, 8))  # prompt part: (tokens, sequences)


class Bucket(NamedTuple):
    num_tokens: int
    num_seqs: int
    is_prefill: bool  # it has a prompt part
    num_decode: int   # decode rows (all of a decode bucket's)


# what a padding token or sequence stages (module docstring): token 0 at position 0 stored nowhere, length 1
PADDING = {"input_ids": 0, "positions": 0, "slot_mapping": -1, "context_lens": 1, "cu_seqlens_q": 0}

DECODE_STEP = 16  # decode buckets above this many rows are this many rows apart
WHOLE_TABLE_ROWS_BYTES = 1 << 18  # a bucket's block tables up to this size travel as whole rows, in one plain copy


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
        max_seqs = max(b.num_seqs for b in self.buckets)
        width = -(-config.max_model_len // config.block_size)
        pinned = self.device.type == "cuda"  # page-locked, so the copies are true async DMA
        layouts = {b: input_layout(b) for b in self.buckets}
        num_words = max(words for _, words in layouts.values())
        self.host_words = torch.zeros(num_words, dtype=torch.int64, pin_memory=pinned)
        self.static_words = self.host_words.to(self.device, copy=True)
        # each bucket's inputs: views into the device words (what its graph reads) and the host words (numpy)
        self.inputs = {b: views(self.static_words, layout) for b, (layout, _) in layouts.items()}
        self.host_inputs = {b: {name: t.numpy() for name, t in views(self.host_words, layout).items()}
                            for b, (layout, _) in layouts.items()}
        self.host_tables = torch.zeros(max_seqs, width, dtype=torch.int32, pin_memory=pinned)
        self.host_tables_np = self.host_tables.numpy()
        self.static_tables = self.host_tables.to(self.device, copy=True)
        # what a bucket's step copies (views made once: each slice costs the host a call): its words, and its
        # tables' whole rows when they are small enough to copy as they are (stale columns past a step's widest
        # table are never read), else None (the step's columns only, packed)
        self.copies = {b: (self.static_words[:words], self.host_words[:words],
                           (self.static_tables[:b.num_seqs], self.host_tables[:b.num_seqs])
                           if b.num_seqs * width * 4 <= WHOLE_TABLE_ROWS_BYTES else None)
                       for b, (_, words) in layouts.items()}
        max_tokens = max(b.num_tokens for b in self.buckets)
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
        # The one-pass sampler over a decode graph's logits, one small graph per decode bucket (``sample``). Its
        # params come in, and its draw goes out, through two sets of page-locked buffers in turn: the host fills
        # the next step's params while this step's copies may still wait behind this step's model, and reads a
        # step's draw before the step after the next one reuses its buffer.
        self.sampler_graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        if self.logits is not None:
            rows = self.logits.shape[0]
            self.static_params = torch.zeros(3 * rows, dtype=torch.int64, device=self.device)
            self.drawn = torch.empty(2 * rows, dtype=torch.float32, device=self.device)  # tokens, then logprobs
            host_params = [torch.zeros(3 * rows, dtype=torch.int64, pin_memory=pinned) for _ in range(2)]
            host_drawn = [torch.zeros(2 * rows, dtype=torch.float32, pin_memory=pinned) for _ in range(2)]
            self.turn_copied = [torch.cuda.Event() if pinned else None for _ in range(2)]  # after a turn's copies
            self._turn = 0
            self.sample_views = {  # (bucket, turn) -> params (numpy [3, w]), the copies' ends, the draw [2, w]
                (b, turn): (host_params[turn][:3 * w].numpy().reshape(3, w), self.static_params[:3 * w],
                            host_params[turn][:3 * w], self.drawn[:2 * w], host_drawn[turn][:2 * w],
                            self.drawn[:2 * w].view(2, w))
                for b in self.decode_buckets for w in (b.num_seqs,) for turn in range(2)}  # (views made once)

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per bucket, largest first, so the others reuse its memory pool. Each body runs once
        outside capture first: its kernels compile and the allocator settles."""
        pool = None
        for bucket in sorted(self.buckets, key=lambda b: (b.num_tokens, b.num_seqs), reverse=True):
            for name, value in PADDING.items():  # a step of padding only: the words hold another bucket's inputs
                self.inputs[bucket][name].fill_(value)
            run = self.body(bucket)
            run()
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                run()
            pool = graph.pool() if pool is None else pool
            self.graphs[bucket] = graph
        if self.logits is not None:
            for bucket in self.decode_buckets:
                run = self.sampler_body(bucket)
                run()  # compiles the kernel, sizes its arrival counters
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    run()
                self.sampler_graphs[bucket] = graph
        torch.cuda.synchronize(self.device)

    def body(self, bucket: Bucket):
        """What a bucket's graph runs: the model over the bucket's inputs in the static words and the first rows
        of the static block tables."""
        t, s, is_prefill, d = bucket
        b = self.inputs[bucket]
        attn = AttentionMetadata(
            is_prefill=is_prefill, slot_mapping=b["slot_mapping"], block_tables=self.static_tables[:s],
            context_lens=b["context_lens"], cu_seqlens_q=b["cu_seqlens_q"] if is_prefill else None,
            max_q_len=t - d if is_prefill else 1, max_context_len=self.max_model_len, num_decode_tokens=d)

        def run():
            self.output[:t] = self.model(b["input_ids"], b["positions"], attn)
            if self.logits is not None and not is_prefill:
                torch.mm(self.output[:t], self.model.lm_head.weight.t(), out=self.logits[:t])
        return run

    def sampler_body(self, bucket: Bucket):
        """What a decode bucket's sampler graph runs: the one-pass kernel over its rows of the decode graphs' logits,
        with the params in ``static_params``, into ``drawn`` (both laid out for the bucket's rows)."""
        from pagedattention.kernels.sampling import sample_tokens  # numba.cuda: on first use

        rows = bucket.num_seqs
        _, params, _, _, _, drawn = self.sample_views[bucket, 0]  # (both turns share the device buffers)
        params = params.view(3, rows)
        return lambda: sample_tokens(self.logits[:rows], params, out=drawn)

    def sample(self, logits: torch.Tensor, params):
        """The one-pass kernel's draw (``sample_tokens``) for ``logits``, the first rows of the decode graphs' logits,
        replayed from the decode bucket's sampler graph; ``params`` int64 [3, rows] (numpy). Returns the draw,
        float32 [2, bucket rows] on the device (the rows past ``rows`` are padding's, greedy), its copy on the host
        (float32 [2 * bucket rows], read once ``event`` has passed) and ``event``; or None when no graph takes
        ``logits``. On the host: two copies, a replay and an event, instead of the params' upload, the kernel's
        buffers, its launch and a fresh page-locked buffer and event for the copy back."""
        rows = logits.shape[0]
        if not self.sampler_graphs or logits.data_ptr() != self.logits.data_ptr() or not logits.is_contiguous() \
                or logits.shape[1:] != self.logits.shape[1:] or logits.dtype != self.logits.dtype:
            return None
        bucket = next((b for b in self.decode_buckets if b.num_seqs >= rows), None)
        if bucket is None:
            return None
        turn, copied = self._turn, self.turn_copied[self._turn]
        self._turn = 1 - turn
        if copied is not None:  # this turn's copies of two steps ago (long done: that step's tokens were read)
            copied.synchronize()
        staged, static_params, host_params, drawn, host_drawn, draw = self.sample_views[bucket, turn]
        staged[:, :rows] = params
        staged[:, rows:] = 0  # padding rows: greedy
        static_params.copy_(host_params, non_blocking=True)
        self.sampler_graphs[bucket].replay()
        host_drawn.copy_(drawn, non_blocking=True)
        if copied is not None:
            copied.record()
        return draw, host_drawn, copied

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
        to the bucket's decode rows, its prompt rows, padding to the bucket's size. Two copies: the bucket's words
        (module docstring) and the block tables.

        Block tables: ``width`` = this step's widest table. Where the bucket's rows of the static
        ``[max_seqs, max_blocks]`` table are small (``WHOLE_TABLE_ROWS_BYTES``), the step writes its ``width``
        columns into the host rows and copies the rows whole, one plain copy; else it packs rows of ``width``
        entries at the start of the host buffer and copies them into the first ``width`` columns (a strided copy:
        a few KB instead of a max_model_len-wide table every step). Either way the columns beyond are stale but
        never read: every context fits in ``width`` blocks.
        """
        t, s, is_prefill, d = bucket
        n, m, xd = x.num_tokens, x.num_seqs, x.num_decode
        h = self.host_inputs[bucket]
        if self.copied is not None:  # the last step's copies may still be queued (overlapped steps): let them read
            self.copied.synchronize()  # (an event never recorded is complete)

        def place(buf, values, end, pad):
            """``values`` (x's decode rows, then its prompt rows) into ``buf[:end]`` in the bucket's layout."""
            buf[:xd] = values[:xd]
            buf[xd:d] = pad
            buf[d:d + len(values) - xd] = values[xd:]
            buf[d + len(values) - xd:end] = pad

        for name in ("input_ids", "positions", "slot_mapping"):
            place(h[name], getattr(x, name), t, PADDING[name])
        place(h["context_lens"], x.context_lens, s, PADDING["context_lens"])
        if is_prefill:
            cu = h["cu_seqlens_q"]
            cu[:m - xd + 1] = x.prompt_cu_seqlens_q
            cu[m - xd + 1:] = n - xd
        width = x.block_tables.shape[1]
        static_words, host_words, whole_rows = self.copies[bucket]
        static_words.copy_(host_words, non_blocking=True)
        if whole_rows is not None:
            place(self.host_tables_np[:s, :width], x.block_tables, s, 0)  # padding rows: block 0, never written
            whole_rows[0].copy_(whole_rows[1], non_blocking=True)
        else:
            tables = self.host_tables.view(-1)[:s * width].view(s, width)
            place(tables.numpy(), x.block_tables, s, 0)
            self.static_tables[:s, :width].copy_(tables, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if x.input_ids_device is not None:  # an overlapped step: its decode tokens come from the last, on the device
            self.inputs[bucket]["input_ids"][:xd].copy_(x.input_ids_device)


def input_layout(bucket: Bucket) -> tuple[dict, int]:
    """Where ``bucket``'s 1-D inputs lie in the staging words (module docstring): {name: (dtype, start, length)},
    start and length in that dtype's elements; and the words the bucket uses. Each input starts on a 16-byte
    boundary, as a fresh tensor would."""
    t, s, _, d = bucket
    layout, end = {}, 0  # end in bytes
    for name, dtype, length in (("input_ids", torch.int64, t), ("positions", torch.int64, t),
                                ("slot_mapping", torch.int64, t), ("context_lens", torch.int32, s),
                                ("cu_seqlens_q", torch.int32, s - d + 1)):  # (a decode bucket's is unused)
        layout[name] = (dtype, end // dtype.itemsize, length)
        end += -(-length * dtype.itemsize // 16) * 16
    return layout, end // 8


def views(words: torch.Tensor, layout: dict) -> dict[str, torch.Tensor]:
    """The inputs ``layout`` places in ``words`` (int64), as tensors that share its memory."""
    by_dtype = {torch.int64: words, torch.int32: words.view(torch.int32)}
    return {name: by_dtype[dtype][start:start + length] for name, (dtype, start, length) in layout.items()}
