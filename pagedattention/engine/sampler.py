"""Choosing the next token of every sequence in a step, vectorised over the batch.

Greedy rows take the argmax. The other rows divide by their temperature, keep their top-k / top-p
tokens, and sample with the exponential-race trick: argmax(p / E) with E ~ Exp(1) picks token i with
probability p_i, and lets a seeded request draw its E from its own ``torch.Generator`` while the rest of the
batch shares one draw. The log-probability reported is that of the chosen token under the model's
distribution before temperature, top-k and top-p (log_softmax of the logits, after min_tokens masking).
"""
from __future__ import annotations

import torch

from .sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 eos_token_ids: set[int]) -> tuple[list[int], list[float]]:
        """``logits`` float32 [len(seqs), vocab] -> (token id, logprob) per row."""
        params = [s.sampling_params for s in seqs]
        self._mask_stop_tokens(logits, seqs, params, eos_token_ids)
        logprobs = torch.log_softmax(logits, dim=-1)
        temperatures = [p.temperature for p in params]
        if not any(temperatures):  # every row greedy
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, params, temperatures, seqs)
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        # one device->host copy per step: token ids (< 2**53) and float32 logprobs are exact in float64
        both = torch.stack((tokens.to(torch.float64), chosen.to(torch.float64))).cpu()
        return both[0].long().tolist(), both[1].tolist()

    @staticmethod
    def _mask_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], params, eos_token_ids: set[int]) -> None:
        """min_tokens: a request may not end (EOS or a stop token) before it has this many tokens."""
        for row, (seq, p) in enumerate(zip(seqs, params)):
            if p.min_tokens and len(seq.token_ids) - seq.num_prompt_tokens < p.min_tokens:
                banned = set(p.stop_token_ids or ())
                if not p.ignore_eos:
                    banned |= eos_token_ids
                banned = [t for t in banned if t < logits.shape[1]]
                if banned:
                    logits[row, banned] = float("-inf")

    def _sample(self, logits: torch.Tensor, params, temperatures: list[float], seqs: list[Sequence]) -> torch.Tensor:
        vocab = logits.shape[1]
        temperature = self._to_device(temperatures, logits.dtype, logits.device)  # greedy rows (0) divide by 1
        greedy = temperature == 0
        scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(1)
        if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
            top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
            scaled = self._apply_top_k_top_p(scaled, top_k, [p.top_p for p in params])
        probs = torch.softmax(scaled, dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                race[row].exponential_(generator=seq.generator)
        sampled = (probs / race).argmax(dim=-1)
        if 0 not in temperatures:  # no greedy row: skip a full-vocabulary argmax
            return sampled
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    @staticmethod
    def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Per-row parameters as a tensor on the logits' device. From pinned memory the copy is asynchronous:
        a copy from pageable memory would first wait for the forward pass, instead of queueing behind it."""
        t = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    def _apply_top_k_top_p(self, scaled: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        """Set every logit outside a row's top-k and top-p set to -inf (one sort for the whole batch)."""
        n, vocab = scaled.shape
        k = self._to_device(top_k, torch.int64, scaled.device)
        p = self._to_device(top_p, scaled.dtype, scaled.device)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=scaled.device).expand(n, vocab)
        drop = rank >= k.unsqueeze(1)
        # top-p: drop a token when the tokens ranked above it already reach p (the first always stays)
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_above >= p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
