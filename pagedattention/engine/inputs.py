"""Checking what a caller hands the engine, all before anything is queued: prompts and sampling params."""
from __future__ import annotations

import numbers

from .sampling_params import SamplingParams


def is_token_id(t) -> bool:
    return type(t) is int or (isinstance(t, numbers.Integral) and not isinstance(t, bool))


def parse_prompts(prompts, tokenizer, vocab_size: int, max_model_len: int) -> list[tuple[str | None, list[int]]]:
    """``(text or None, token ids)`` per prompt. prompts: a string, a list of token ids, or a list of either."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(is_token_id(t) for t in prompts)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a str, a list of token ids, or a list of those; "
                        f"got {type(prompts).__name__}")
    return [parse_prompt(i, p, tokenizer, vocab_size, max_model_len) for i, p in enumerate(prompts)]


def parse_prompt(i: int, prompt, tokenizer, vocab_size: int, max_model_len: int) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
        if not prompt:  # a tokenizer may still emit BOS for it, but there is nothing to continue
            raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one character or token")
        if tokenizer is None:
            raise TypeError(f"prompts[{i}] is text but this model has no tokenizer; pass token ids")
        text, ids = prompt, list(tokenizer.encode(prompt))
    elif isinstance(prompt, (list, tuple)):
        bad = next((t for t in prompt if not is_token_id(t)), None)
        if bad is not None:
            raise TypeError(f"prompts[{i}] must hold int token ids, found {type(bad).__name__} {bad!r}")
        text, ids = None, [int(t) for t in prompt]
    else:
        raise TypeError(f"prompts[{i}] must be a str or a list of int token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompts[{i}] has token id {bad} outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompts[{i}] has {len(ids)} tokens; max_model_len={max_model_len} leaves no "
                         f"room for a generated token")
    return text, ids


def parse_sampling_params(sampling_params, n: int, max_num_seqs: int) -> list[SamplingParams]:
    """One SamplingParams per prompt from None (the defaults), one for all, or a list of n."""
    if sampling_params is None:
        params = [SamplingParams()] * n
    elif isinstance(sampling_params, SamplingParams):
        params = [sampling_params] * n
    elif isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != n:
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {n} prompts")
        for i, p in enumerate(sampling_params):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
        params = list(sampling_params)
    else:
        raise TypeError(f"sampling_params must be a SamplingParams, a list of them, or None; "
                        f"got {type(sampling_params).__name__}")
    for i, p in enumerate(params):
        if p.n > max_num_seqs:  # its n sequences could never run together
            raise ValueError(f"sampling_params.n={p.n} (prompts[{i}]) exceeds max_num_seqs={max_num_seqs}")
    return params
