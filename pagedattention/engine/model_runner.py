"""A step's tensors in, logits out.

``prepare`` turns a scheduled batch into ``StepInputs`` (numpy, on the host): the tokens the model reads, their
positions and cache slots, the block tables and lengths attention reads, and which rows are turned into logits.
A token's slot is ``block_table[pos // block_size] * block_size + pos % block_size``. ``execute`` runs the model
on them: it replays a captured CUDA graph when one fits the step (cuda_graphs.py), else runs eagerly, and
returns the logits (in the model's dtype) of the rows that sample, in batch order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedattention.models.attention import AttentionMetadata

from .config import EngineConfig
from .cuda_graphs import CudaGraphs
from .scheduler import ScheduledBatch


@dataclass
class StepInputs:
    """One step's model inputs. Tokens are packed sequence after sequence (``cu_seqlens_q``): first the
    ``num_decode`` decoding sequences' one token each (all of a decode step's), then the prompt tokens."""
    is_prefill: bool           # any prompt tokens
    input_ids: np.ndarray      # int64 [num_tokens]
    positions: np.ndarray      # int64 [num_tokens]
    slot_mapping: np.ndarray   # int64 [num_tokens]: cache slot each token's K/V is written to
    block_tables: np.ndarray   # int32 [num_seqs, width]: width = blocks of this step's longest sequence
    context_lens: np.ndarray   # int32 [num_seqs]: tokens in the cache after this step's writes
    cu_seqlens_q: np.ndarray   # int32 [num_seqs + 1]
    logit_rows: np.ndarray     # int64: the token rows whose logits are computed (each sampling sequence's last)
    max_q_len: int             # the longest prompt part (1 in a decode step)
    max_context_len: int
    num_decode: int            # the decoding sequences, first in line
    input_ids_device: torch.Tensor | None = None  # overlapped steps: the decoding tokens, on the device (int64/fp32)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def prompt_cu_seqlens_q(self) -> np.ndarray:
        """Where each prompt part starts among the prompt tokens (int32 [num_seqs - num_decode + 1])."""
        return self.cu_seqlens_q[self.num_decode:] - self.num_decode


class ModelRunner:
    def __init__(self, config: EngineConfig, model, manager):
        self.config = config
        self.device = config.device
        self.model = model
        self.manager = manager
        self.block_size = manager.block_size
        # the torch reference ops loop over sequences on the host, so only the kernels can be captured
        use_graphs = self.device.type == "cuda" and config.attention_backend == "numba" and not config.enforce_eager
        self.graphs = CudaGraphs(model, config) if use_graphs else None
        if self.graphs is not None:
            self.graphs.capture()

    @property
    def mixed_prompt_limit(self) -> tuple[int, int] | None:
        """(tokens, sequences): the largest prompt part of a mixed step that replays a graph (None: no graphs)."""
        if self.graphs is None or not self.graphs.mixed_buckets:
            return None
        return max((b.num_tokens - b.num_decode, b.num_seqs - b.num_decode) for b in self.graphs.mixed_buckets)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, eager: bool = False) -> torch.Tensor:
        return self.execute(self.prepare(batch), eager=eager)

    # --- host: a batch into arrays ------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch, pending_tokens: torch.Tensor | None = None) -> StepInputs:
        """``pending_tokens``: a step overlapped with the one before it; each decoding sequence's input token was
        sampled by that step and is still on the device, one past ``seq.token_ids`` ([batch.num_decode]: int64,
        or the one-pass sampling kernel's float32 ids, converted where they are copied)."""
        seqs, d = batch.seqs, batch.num_decode
        block_tables = self.manager.block_tables_array([s.seq_id for s in seqs])
        decoding = seqs[:d]
        if pending_tokens is None:
            input_ids = np.fromiter((s.token_ids[-1] for s in decoding), dtype=np.int64, count=d)
            positions = np.fromiter((len(s.token_ids) - 1 for s in decoding), dtype=np.int64, count=d)
        else:
            input_ids = np.zeros(d, dtype=np.int64)  # placeholders: the device copy replaces them
            positions = np.fromiter((len(s.token_ids) for s in decoding), dtype=np.int64, count=d)
        rows = np.arange(d)
        context_lens = (positions + 1).astype(np.int32)
        if not batch.is_prefill:
            return StepInputs(False, input_ids, positions, self._slots(block_tables, rows, positions), block_tables,
                              context_lens, np.arange(d + 1, dtype=np.int32), rows, 1, int(context_lens.max()), d,
                              pending_tokens)
        prompts = seqs[d:]
        starts = np.array([s.num_computed_tokens for s in prompts], dtype=np.int64)
        q_lens = np.array([s.num_scheduled_tokens for s in prompts], dtype=np.int64)
        ends = starts + q_lens
        cu_seqlens = np.zeros(len(prompts) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu_seqlens[1:])
        prompt_ids = [np.asarray(s.token_ids[a:b], dtype=np.int64)
                      for s, a, b in zip(prompts, starts.tolist(), ends.tolist())]
        # positions: start_i, start_i + 1, ... for each sequence, packed
        prompt_rows = np.repeat(np.arange(len(prompts)), q_lens)
        prompt_positions = np.arange(int(cu_seqlens[-1]), dtype=np.int64) - np.repeat(cu_seqlens[:-1], q_lens) \
            + starts[prompt_rows]
        positions = np.concatenate([positions, prompt_positions])
        rows = np.concatenate([rows, d + prompt_rows])
        cu_seqlens = np.concatenate([np.arange(d, dtype=np.int32), d + cu_seqlens])
        logit_rows = cu_seqlens[1:][np.array(batch.logit_mask, dtype=bool)].astype(np.int64) - 1
        return StepInputs(True, np.concatenate([input_ids, *prompt_ids]), positions,
                          self._slots(block_tables, rows, positions), block_tables,
                          np.concatenate([context_lens, ends.astype(np.int32)]), cu_seqlens, logit_rows,
                          int(q_lens.max()), int(ends.max(initial=context_lens.max(initial=0))), d, pending_tokens)

    def _slots(self, block_tables: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        bs = self.block_size
        return block_tables[rows, positions // bs].astype(np.int64) * bs + positions % bs

    # --- device: arrays into logits -----------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, x: StepInputs, eager: bool = False) -> torch.Tensor:
        """Logits ``[len(x.logit_rows), vocab]`` in the model's dtype."""
        bucket = None if eager or self.graphs is None else self.graphs.bucket(x)
        rows = x.logit_rows
        if bucket is not None:
            hidden = self.graphs.replay(bucket, x)
            if not x.is_prefill and self.graphs.logits is not None:
                return self.graphs.logits[:x.num_seqs]  # the decode graph ran the LM head too
            rows = self.graphs.output_rows(bucket, x, rows)
        else:
            hidden = self.model(*self._to_device(x))
        if not x.is_prefill:  # every decode row samples, in order
            return self.model.compute_logits(hidden[:x.num_seqs])
        return self.model.compute_logits(hidden.index_select(0, self._tensor(rows)))

    def _to_device(self, x: StepInputs):
        to = self._tensor
        attn = AttentionMetadata(
            is_prefill=x.is_prefill, slot_mapping=to(x.slot_mapping), block_tables=to(x.block_tables),
            context_lens=to(x.context_lens), cu_seqlens_q=to(x.prompt_cu_seqlens_q) if x.is_prefill else None,
            max_q_len=x.max_q_len, max_context_len=x.max_context_len, num_decode_tokens=x.num_decode)
        if x.input_ids_device is not None and not x.is_prefill:  # an overlapped decode step: all on the device
            return x.input_ids_device.long(), to(x.positions), attn
        input_ids = to(x.input_ids)
        if x.input_ids_device is not None:  # an overlapped mixed step: its decode tokens are on the device
            input_ids[:x.num_decode].copy_(x.input_ids_device)
        return input_ids, to(x.positions), attn

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """Through (cached) page-locked memory on CUDA: a copy from pageable memory would wait for the GPU
        to finish the work queued before it."""
        t = torch.from_numpy(array)
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)
