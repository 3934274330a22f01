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
        self._mask_stop_tokens(logits, seqs, eos_token_ids)
        logprobs = torch.log_softmax(logits, dim=-1)
        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, params, seqs)
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        return tokens.tolist(), chosen.tolist()

    @staticmethod
    def _mask_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> None:
        """min_tokens: a request may not end (EOS or a stop token) before it has this many tokens."""
        for row, seq in enumerate(seqs):
            p = seq.sampling_params
            if seq.num_output_tokens < p.min_tokens:
                banned = set(p.stop_token_ids or ())
                if not p.ignore_eos:
                    banned |= eos_token_ids
                banned = [t for t in banned if t < logits.shape[1]]
                if banned:
                    logits[row, banned] = float("-inf")

    def _sample(self, logits: torch.Tensor, params, seqs: list[Sequence]) -> torch.Tensor:
        vocab = logits.shape[1]
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                                   dtype=logits.dtype, device=logits.device)
        scaled = logits / temperature.unsqueeze(1)
        top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_p = [p.top_p for p in params]
        if min(top_k) < vocab or min(top_p) < 1.0:
            scaled = self._apply_top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                race[row].exponential_(generator=seq.generator)
        sampled = (probs / race).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    @staticmethod
    def _apply_top_k_top_p(scaled: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        """Set every logit outside a row's top-k and top-p set to -inf (one sort for the whole batch)."""
        n, vocab = scaled.shape
        k = torch.tensor(top_k, device=scaled.device)
        p = torch.tensor(top_p, dtype=scaled.dtype, device=scaled.device)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=scaled.device).expand(n, vocab)
        drop = rank >= k.unsqueeze(1)
        # top-p: drop a token when the tokens ranked above it already reach p (the first always stays)
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_above >= p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
