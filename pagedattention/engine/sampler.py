"""Choosing the next token of every sequence in a step, vectorised over the batch.

With the Numba backend, a batch whose rows use no top-k/top-p, penalties or top-N logprobs is sampled by one
kernel in one launch over the logits (kernels/sampling.py: greedy argmax or an inverse-CDF draw at one uniform
per row, with the chosen token's log-probability from a log-sum-exp of the same pass). Otherwise, in torch:
greedy rows take the argmax. The other rows divide by their temperature, keep their top-k / top-p tokens, and
sample with the exponential-race trick: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i, and
lets a seeded request draw its E from its own ``torch.Generator`` while the rest of the batch shares one draw.
Presence and frequency penalties come first, on the rows that set them, and apply to greedy rows too.

The log-probabilities reported (of the chosen token, and the top-N with ``SamplingParams.logprobs``) are
those of the model's distribution: log_softmax of the logits after min_tokens masking, before penalties,
temperature, top-k and top-p.

A row whose logits hold NaN or +inf (or are all -inf) has no distribution to draw from. log_softmax
already reduces each row, so such a row's chosen log-probability is NaN or inf: the check costs no extra
pass over the logits and rides on the one device->host copy of the step, and ``SamplingError`` names
the requests of the bad rows.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from operator import attrgetter

import numpy as np
import torch

from .sequence import Sequence

# SamplingParams fields read at C speed (map) in the per-row passes
_PLAIN, _SEED, _MIN_TOKENS, _TEMPERATURE = map(attrgetter, ("plain", "seed", "min_tokens", "temperature"))
_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.float64: np.float64}


@dataclass
class SamplerOutput:
    """One step's choice, one entry per row of the logits (per sequence, in order).

    token_ids: the chosen token of each row. logprobs: its log-probability under the model's distribution.
    top_logprobs: None for rows whose ``SamplingParams.logprobs`` is None; otherwise {token id: logprob} for
    the row's top ``logprobs`` tokens (most likely first) and the chosen token (last, if not among them).
    """
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None]


@dataclass
class PendingSample:
    """A step's sampling, queued on the device: ``tokens`` (int64, on the device) now, the host's copy at
    ``result()``."""
    tokens: torch.Tensor         # the token ids, on the device (int64, or float32 from the one-pass kernel)
    host: torch.Tensor           # the packed copy (tokens, logprobs, top-N) on the host, maybe not arrived yet
    event: object                # CUDA event after the copy, or None
    seqs: list
    params: list
    top_rows: list[int] | None   # the rows with top-N logprobs; None: no row asked for logprobs at all
    width: int | None = None     # where the logprobs start in ``host`` (None: after the rows' tokens; a graph's
                                 # sampler fills rows for its whole bucket)

    def result(self) -> SamplerOutput:
        """Wait for the copy; raises SamplingError when rows' logits were not finite."""
        if self.event is not None:
            self.event.synchronize()
        n, seqs, params = len(self.seqs), self.seqs, self.params
        width = n if self.width is None else self.width
        host = self.host.numpy()  # numpy: a few hundred rows cost µs there, tens of µs as torch ops
        chosen = host[width:width + n]
        finite = np.isfinite(chosen)
        bad = [] if finite.all() else np.flatnonzero(~finite).tolist()
        ids = np.where(finite, host[:n], -1) if bad else host[:n]  # a bad row's id may be NaN
        token_ids = ids.astype(np.int64).tolist()
        chosen_logprobs = chosen.tolist()
        top_logprobs = [None] * n if self.top_rows is None else \
            Sampler._top_logprobs(params, token_ids, chosen_logprobs, self.top_rows, self.host[2 * n:])
        for row in bad:
            token_ids[row], chosen_logprobs[row], top_logprobs[row] = -1, math.nan, None
        output = SamplerOutput(token_ids, chosen_logprobs, top_logprobs)
        if bad:
            raise SamplingError(list(dict.fromkeys(seqs[row].request_id for row in bad)), bad, output)
        return output


class SamplingError(RuntimeError):
    """Some rows' logits were not finite (NaN or +inf, or every token -inf): no token was drawn for them.

    ``request_ids``: the ``request_id`` of each bad row's sequence, first occurrence order, no repeats.
    ``rows``: the indices of the bad rows. ``output``: the whole step's SamplerOutput, whose bad rows hold
    token id -1, logprob NaN and top_logprobs None; the other rows are valid, so a caller can finish the
    bad requests with an error and carry on with the rest.
    """

    def __init__(self, request_ids: list[str], rows: list[int], output: SamplerOutput):
        self.request_ids = request_ids
        self.rows = rows
        self.output = output
        super().__init__(f"the model produced non-finite logits (NaN or inf) for request(s) "
                         f"{', '.join(map(repr, request_ids))}: no token can be sampled for them")


@dataclass
class _RowParams:
    """A step's rows' SamplingParams (in row order) and what sampling reads of them."""
    params: list
    vocab: int
    one_pass: bool                # every row for the one-pass kernel (no top-k/top-p, penalties or logprobs)
    min_tokens: bool              # some row has min_tokens (its EOS and stop tokens may need masking)
    seeded: list[tuple[int, int]]  # (row, seed) of the seeded rows
    temperature_bits: np.ndarray  # int64, as ``sample_tokens`` reads them


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, use_kernel: bool = False):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # the one-pass kernel (kernels/sampling.py) for rows with no top-k/top-p, penalties or top-N logprobs
        self.use_kernel = use_kernel
        self._step_keys = random.Random(seed)
        self._last_rows: _RowParams | None = None
        # (logits, kernel params [3, rows] int64 numpy) -> the one-pass kernel's draw in a captured graph
        # (``CudaGraphs.sample``: float32 [2, width >= rows] on the device, its copy on the host, the event after the
        # copy) or None; set by the engine when it has graphs
        self.sample_in_graph = None

    @classmethod
    def from_config(cls, config) -> "Sampler":
        """The engine's sampler: seeded with its seed; the Numba backend samples with the one-pass kernel."""
        return cls(config.device, seed=config.seed, use_kernel=config.attention_backend == "numba")

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> SamplerOutput:
        """``logits`` [len(seqs), vocab] (float32, or the model's bfloat16/float16: the one-pass kernel reads them
        as they are, torch works on a float32 copy) -> one token per row. min_tokens masks the logits in place
        (calling again on the same logits gives the same masks); penalties work on a copy.

        Raises SamplingError when rows' logits are not finite.
        """
        return self.launch(logits, seqs, eos_token_ids).result()

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int],
               num_pending_rows: int = 0) -> "PendingSample":
        """Queue the sampling of one token per row on the device; ``result()`` waits for it. The tokens stay on
        the device too (``PendingSample.tokens``), so the next step can read them before the host has.
        ``num_pending_rows``: the first rows' sequences each sampled one token they do not hold yet (an overlapped
        step; it counts for seeded noise)."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits must be [len(seqs)={len(seqs)}, vocab], got {list(logits.shape)}")
        params = [s.sampling_params for s in seqs]
        rows = self._rows_of(params, logits.shape[1])
        if rows.min_tokens:
            self._mask_stop_tokens(logits, seqs, params, eos_token_ids)
        width = host = event = None
        if self.use_kernel and rows.one_pass:  # [2, width]: already packed; maybe copied back already
            drawn, host, event = self._sample_in_one_pass(logits, seqs, rows, num_pending_rows)
            tokens, top_rows, packed, width = drawn[0, :len(seqs)], None, drawn.view(-1), drawn.shape[1]
        else:
            logits = logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            if any(p.has_penalties for p in params):
                logits = self._apply_penalties(logits, seqs, params)
            temperatures = [p.temperature for p in params]
            if not any(temperatures):  # every row greedy
                tokens = logits.argmax(dim=-1)
            else:
                tokens = self._sample(logits, params, temperatures, seqs)
            chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
            # one device->host copy per step: token ids (< 2**53) and float32 logprobs are exact in float64
            parts = [tokens.to(torch.float64), chosen.to(torch.float64)]
            top_rows = [row for row, p in enumerate(params) if p.logprobs]
            num_top = max((params[row].logprobs for row in top_rows), default=0)
            if num_top:
                wanted = logprobs if len(top_rows) == len(seqs) else \
                    logprobs[self.to_device(top_rows, torch.int64, logprobs.device)]
                top_values, top_ids = wanted.topk(min(num_top, logprobs.shape[1]), dim=-1)
                parts += [top_values.to(torch.float64).flatten(), top_ids.to(torch.float64).flatten()]
            packed = torch.cat(parts)
        if host is None:  # not copied back by a sampler graph
            host = packed
            if packed.is_cuda:  # into page-locked memory, asynchronously: the host goes on until result()
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                host.copy_(packed, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
        return PendingSample(tokens, host, event, seqs, params, top_rows, width)

    def _rows_of(self, params: list, vocab: int) -> "_RowParams":
        """What sampling needs to know of the rows' parameters; kept while the rows carry the same ones in the same
        order (most decode steps: the per-row passes then run once per batch, not once per step)."""
        from pagedattention.kernels.sampling import temperature_bits  # numba.cuda: on first use

        rows = self._last_rows
        if rows is not None and rows.vocab == vocab and rows.params == params:
            return rows
        one_pass = all(map(_PLAIN, params)) or all(
            p.plain or (p.logprobs is None and not p.has_penalties and p.top_p == 1.0 and p.top_k >= vocab)
            for p in params)
        self._last_rows = rows = _RowParams(
            params, vocab, one_pass, min_tokens=any(map(_MIN_TOKENS, params)),
            seeded=[(row, seed) for row, seed in enumerate(map(_SEED, params)) if seed is not None],
            temperature_bits=np.array(temperature_bits(list(map(_TEMPERATURE, params))), dtype=np.int64))
        return rows

    def _sample_in_one_pass(self, logits: torch.Tensor, seqs: list[Sequence], row_params: "_RowParams",
                            num_pending_rows: int):
        """Greedy or an inverse-CDF draw in one kernel: float32 [2, width >= rows], the token ids then the
        log-probabilities, and (None, None) or, replayed from a captured graph where ``sample_in_graph`` takes the
        logits, its copy on the host and the event after it. Keys of the rows' uniforms: a seeded request's seed +
        completion index, counted by its generated tokens (independent of the batch); the other rows share a fresh
        key per step."""
        from pagedattention.kernels.sampling import sample_tokens  # numba.cuda: on first use

        n = len(seqs)
        rows = np.empty((3, n), dtype=np.int64)  # keys, counters, temperature bits: one copy to the device
        rows[0] = self._step_keys.getrandbits(62)
        rows[1] = np.arange(n)
        for row, seed in row_params.seeded:
            seq = seqs[row]
            rows[0, row] = (seed + seq.index) % (1 << 63)
            rows[1, row] = seq.num_output_tokens + (row < num_pending_rows)
        rows[2] = row_params.temperature_bits
        in_graph = None if self.sample_in_graph is None else self.sample_in_graph(logits, rows)
        if in_graph is not None:
            return in_graph
        return sample_tokens(logits.contiguous(), self.to_device(rows, torch.int64, logits.device)), None, None

    @torch.inference_mode()
    def beam_candidates(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's ``k`` most likely next tokens (all of them if the vocabulary is smaller), best first:
        (log-probabilities float32 [rows, k], token ids int64 [rows, k]), on the host, in one copy."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        values, token_ids = torch.topk(torch.log_softmax(logits.float(), dim=-1), min(k, logits.shape[-1]), dim=-1)
        host = torch.stack((values.to(torch.float64), token_ids.to(torch.float64))).cpu()
        return host[0].float(), host[1].long()

    @staticmethod
    def _top_logprobs(params, token_ids: list[int], chosen: list[float], top_rows: list[int],
                      packed: torch.Tensor) -> list[dict[int, float] | None]:
        """The {token id: logprob} of each row that asked for them; ``packed`` holds the top values of
        ``top_rows`` then their token ids, ``width`` per row."""
        out: list[dict[int, float] | None] = [None if p.logprobs is None else {} for p in params]
        if out.count(None) == len(out):  # no row asked (the usual step)
            return out
        width = packed.numel() // (2 * len(top_rows)) if top_rows else 0
        values, ids = packed[:width * len(top_rows)].tolist(), packed[width * len(top_rows):].long().tolist()
        for i, row in enumerate(top_rows):
            start = i * width
            n = min(params[row].logprobs, width)
            out[row] = dict(zip(ids[start:start + n], values[start:start + n]))
        for row, top in enumerate(out):
            if top is not None:
                top.setdefault(token_ids[row], chosen[row])
        return out

    @staticmethod
    def _mask_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], params, eos_token_ids: set[int]) -> None:
        """min_tokens: a request may not end (EOS or a stop token) before it has this many tokens."""
        for row, (seq, p) in enumerate(zip(seqs, params)):
            if p.min_tokens and len(seq.token_ids) - seq.num_prompt_tokens < p.min_tokens:
                banned = set(p.stop_token_ids)
                if not p.ignore_eos:
                    banned |= eos_token_ids
                banned = [t for t in banned if t < logits.shape[1]]
                if banned:
                    logits[row, banned] = float("-inf")

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence], params) -> torch.Tensor:
        """logits[t] - presence * (count[t] > 0) - frequency * count[t] over each row's generated tokens, on
        the rows that set a penalty only (a new tensor)."""
        rows = [row for row, p in enumerate(params) if p.has_penalties]
        outputs = [seqs[row].output_token_ids for row in rows]
        vocab, device = logits.shape[1], logits.device
        # the row (in ``rows``) of each generated token and the tokens themselves go over in one copy
        lengths = [len(o) for o in outputs]
        if not any(lengths):  # nothing generated yet: nothing to penalise
            return logits
        owner = itertools.chain.from_iterable(itertools.repeat(i, n) for i, n in enumerate(lengths))
        flat = self.to_device([*owner, *itertools.chain.from_iterable(outputs)], torch.int64, device)
        owner, tokens = flat[:sum(lengths)], flat[sum(lengths):]
        penalties = self.to_device([[params[r].presence_penalty for r in rows],
                                     [params[r].frequency_penalty for r in rows]], logits.dtype, device)
        # one spare column catches any id past the vocabulary instead of failing on it
        counts = torch.zeros(len(rows), vocab + 1, dtype=logits.dtype, device=device)
        counts.index_put_((owner, tokens.clamp(max=vocab)), torch.ones_like(tokens, dtype=logits.dtype),
                          accumulate=True)
        counts = counts[:, :vocab]
        penalty = penalties[0].unsqueeze(1) * (counts > 0) + penalties[1].unsqueeze(1) * counts
        if len(rows) == len(seqs):
            return logits - penalty
        return logits.index_add(0, self.to_device(rows, torch.int64, device), penalty, alpha=-1)

    def _sample(self, logits: torch.Tensor, params, temperatures: list[float], seqs: list[Sequence]) -> torch.Tensor:
        vocab = logits.shape[1]
        temperature = self.to_device(temperatures, logits.dtype, logits.device)  # greedy rows (0) divide by 1
        greedy = temperature == 0
        scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(1)
        if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
            top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
            scaled = self._apply_top_k_top_p(scaled, top_k, [p.top_p for p in params])
        probs = torch.softmax(scaled, dim=-1)
        sampled = (probs / self._exponential_race(probs, seqs)).argmax(dim=-1)
        if 0 not in temperatures:  # no greedy row: skip a full-vocabulary argmax
            return sampled
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def _exponential_race(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """E ~ Exp(1) per token: seeded requests from their own stream, the rest from the sampler's.
        A draw of exactly 0 would make 0 / 0 = NaN for a filtered-out token, and argmax takes NaN as the
        largest: the floor keeps a token of probability 0 at 0."""
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                race[row].exponential_(generator=seq.generator)
        return race.clamp_(min=torch.finfo(race.dtype).tiny)

    @staticmethod
    def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Per-row parameters as a tensor on the logits' device. From pinned memory the copy is asynchronous:
        a copy from pageable memory would first wait for the forward pass, instead of queueing behind it."""
        numpy_dtype = _NUMPY_DTYPES.get(dtype)  # numpy reads nested lists of numbers ~3x faster than torch
        if numpy_dtype is None:
            t = torch.tensor(values, dtype=dtype)
        else:
            t = torch.from_numpy(np.array(values, numpy_dtype))
        if device.type == "cuda":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    def _apply_top_k_top_p(self, scaled: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        """Set every logit outside a row's top-k and top-p set to -inf (one sort for the whole batch)."""
        n, vocab = scaled.shape
        k = self.to_device(top_k, torch.int64, scaled.device)
        p = self.to_device(top_p, scaled.dtype, scaled.device)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=scaled.device).expand(n, vocab)
        drop = rank >= k.unsqueeze(1)
        # top-p: drop a token when the tokens ranked above it already reach p (the first always stays)
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_above >= p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
