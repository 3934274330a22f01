"""Tensor parallelism (Megatron-style): the layers that split a weight across ranks, and the group they talk through.

Each of ``size`` ranks holds 1/size of every large matrix (and, engine-side, 1/size of the KV heads):

    column-parallel  qkv_proj, gate_up_proj  output rows split: rank r computes its own heads (q, k and v rows
                                             of heads r*h/size ...) and its slice of the MLP features; no talk
    row-parallel     o_proj, down_proj       input columns split: each rank's product is a partial sum of the
                                             output; one all-reduce adds them (the bias once, after it)
    vocab-parallel   embed_tokens            rank r holds the rows of token ids [r*per, (r+1)*per): it looks up
                                             the ids it owns, zeros for the others; an all-reduce fills them in
                     lm_head                 rank r computes the logits of its ids; rank 0 gathers them

After each all-reduce every rank holds the complete hidden states, so the norms, RoPE, per-head attention and
the residual stream run as on one device, over the local heads: two all-reduces per decoder layer.

The vocabulary is padded up to a multiple of ``size`` (per = ceil(vocab / size)); the padding rows are zero,
never looked up, and their logits are cut after the gather.

At ``size == 1`` the model is built from plain ``nn.Linear`` / ``nn.Embedding`` (the factories below return
them) and nothing here runs: no collective, no extra op.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class TensorParallel:
    """This rank's place in the group: ``rank`` of ``size``, and the torch process group the collectives go through
    (attached by the engine once every rank is up; layers only use it when they run)."""

    def __init__(self, rank: int = 0, size: int = 1, group=None):
        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, {size}), got {rank}")
        self.rank, self.size, self.group = rank, size, group

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        self.group.allreduce([x]).wait()
        return x

    def min(self, value: int, device) -> int:
        """The smallest of every rank's ``value``."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        opts = torch.distributed.AllreduceOptions()
        opts.reduceOp = torch.distributed.ReduceOp.MIN
        self.group.allreduce([t], opts).wait()
        return int(t.item())

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's ``x`` (all the same shape) joined along the last dim on rank 0; None on the others."""
        opts = torch.distributed.GatherOptions()
        opts.rootRank = 0
        if self.rank != 0:
            self.group.gather([], [x], opts).wait()
            return None
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.gather([parts], [x], opts).wait()
        return torch.cat(parts, dim=-1)


SINGLE = TensorParallel()


class Shard(NamedTuple):
    """The part of a checkpoint tensor one rank loads: entries ``[start, stop)`` along ``dim``, of a tensor whose
    ``dim`` has ``full`` entries (what the loader checks the file against)."""
    dim: int
    start: int
    stop: int
    full: int

    def full_shape(self, local_shape) -> list[int]:
        shape = list(local_shape)
        shape[self.dim] = self.full
        return shape

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.narrow(self.dim, self.start, self.stop - self.start)


def check_divisible(config, size: int) -> None:
    """ValueError unless ``config`` (a ModelConfig) splits evenly over ``size`` ranks."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, name)
        if value % size:
            raise ValueError(f"tensor_parallel_size={size} must divide the model's {name} ({value})")


# --- column-parallel: a (fused) projection whose output rows are split --------------------------------------------

def column_parallel_linear(in_features: int, part_sizes: tuple[int, ...], bias: bool, tp: TensorParallel) -> nn.Linear:
    """``nn.Linear`` holding this rank's rows of each part (q, k, v or gate, up), parts stacked: part i contributes
    rows ``[rank * p_i / size, (rank + 1) * p_i / size)`` of its ``p_i``. ``shard_sizes``: the local part sizes."""
    local = tuple(p // tp.size for p in part_sizes)
    layer = nn.Linear(in_features, sum(local), bias=bias)
    layer.shard_sizes = local
    layer.tp = tp
    return layer


def column_shard(module: nn.Module, local_size: int) -> Shard | None:
    """The rows of a part of ``local_size`` local rows that this rank loads; None without tensor parallelism."""
    tp = getattr(module, "tp", SINGLE)
    if tp.size == 1:
        return None
    return Shard(0, tp.rank * local_size, (tp.rank + 1) * local_size, local_size * tp.size)


# --- row-parallel: input features split, one all-reduce -----------------------------------------------------------

class RowParallelLinear(nn.Linear):
    """``y = x W^T + b`` where x holds this rank's slice of the input features and W their columns."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__(in_features // tp.size, out_features, bias=bias)
        self.tp = tp

    def forward(self, x):
        y = self.tp.all_reduce_(F.linear(x, self.weight))
        return y if self.bias is None else y.add_(self.bias)

    def checkpoint_slot(self, leaf: str) -> tuple[slice, Shard] | None:
        if leaf != "weight":
            return None  # the bias is whole on every rank
        k, r = self.in_features, self.tp.rank
        return slice(None), Shard(1, r * k, (r + 1) * k, k * self.tp.size)


def row_parallel_linear(in_features: int, out_features: int, bias: bool, tp: TensorParallel) -> nn.Linear:
    if tp.size == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, tp)


# --- vocab-parallel: embedding and LM head --------------------------------------------------------------------

class _VocabRows:
    """Rank r's rows of a [vocab, hidden] matrix: ids ``[start, start + num_owned)``, padded to ``per`` rows."""

    def _own_rows(self, vocab_size: int, tp: TensorParallel) -> None:
        per = self.weight.shape[0]
        self.tp, self.vocab_size = tp, vocab_size
        self.start = tp.rank * per
        self.num_owned = max(0, min(per, vocab_size - self.start))

    def checkpoint_slot(self, leaf: str) -> tuple[slice, Shard]:
        return slice(0, self.num_owned), Shard(0, self.start, self.start + self.num_owned, self.vocab_size)

    def zero_padding_(self) -> None:
        with torch.no_grad():
            self.weight[self.num_owned:].zero_()


def _rows_per_rank(vocab_size: int, tp: TensorParallel) -> int:
    return -(-vocab_size // tp.size)


class VocabParallelEmbedding(_VocabRows, nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        nn.Embedding.__init__(self, _rows_per_rank(vocab_size, tp), hidden_size)
        self._own_rows(vocab_size, tp)

    def forward(self, input_ids):
        local = input_ids - self.start
        foreign = (local < 0) | (local >= self.num_owned)
        x = F.embedding(local.masked_fill(foreign, 0), self.weight).masked_fill_(foreign.unsqueeze(-1), 0)
        return self.tp.all_reduce_(x)


class ParallelLMHead(_VocabRows, nn.Linear):
    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallel):
        nn.Linear.__init__(self, hidden_size, _rows_per_rank(vocab_size, tp), bias=False)
        self._own_rows(vocab_size, tp)

    def forward(self, hidden):
        """Logits ``[n, vocab_size]`` on rank 0; ``[n, 0]`` on the others (their slice went to rank 0)."""
        local = F.linear(hidden, self.weight)
        if local.shape[0] == 0:  # every rank runs the same step: all of them skip the gather
            return local.new_empty((0, self.vocab_size if self.tp.rank == 0 else 0))
        full = self.tp.gather_last_dim(local)
        return local[:, :0] if full is None else full[:, :self.vocab_size]


def vocab_parallel_embedding(vocab_size: int, hidden_size: int, tp: TensorParallel) -> nn.Embedding:
    if tp.size == 1:
        return nn.Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size, tp)


def parallel_lm_head(hidden_size: int, vocab_size: int, tp: TensorParallel) -> nn.Linear:
    if tp.size == 1:
        return nn.Linear(hidden_size, vocab_size, bias=False)
    return ParallelLMHead(hidden_size, vocab_size, tp)


def checkpoint_slot(module: nn.Module, leaf: str) -> tuple[slice, Shard] | None:
    """(rows of the parameter, part of the checkpoint tensor) this rank loads for ``module.<leaf>``; None when it
    loads the whole tensor into the whole parameter."""
    slot = getattr(module, "checkpoint_slot", None)
    return None if slot is None else slot(leaf)


def zero_padding_(model: nn.Module) -> None:
    """Zero the vocabulary padding rows (a model materialised from meta holds garbage there)."""
    for module in model.modules():
        if isinstance(module, _VocabRows):
            module.zero_padding_()
