"""Tokenizers behind one small interface: ``encode``, ``decode``, ``eos_token_id``, ``vocab_size``.

- ByteTokenizer: the embedded default's; ids 0..255 are the UTF-8 bytes, then a few special tokens.
- HFTokenizer: a checkpoint's own tokenizer (``tokenizer.json`` through the ``tokenizers`` library, or
  transformers' AutoTokenizer for checkpoints that only ship ``tokenizer_config.json`` + a vocab file).
"""
from __future__ import annotations

import json
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as token ids, behind a BOS token; ids past the specials are unused by text."""

    specials = ("<bos>", "<eos>", "<pad>")

    def __init__(self, vocab_size: int = 512):
        if vocab_size < 256 + len(self.specials):
            raise ValueError(f"vocab_size must be >= {256 + len(self.specials)}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return [self.bos_token_id, *text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data, parts = bytearray(), []
        for i in ids:
            i = int(i)
            if i < 256:
                data.append(i)
                continue
            if skip_special_tokens:
                continue
            # flush the bytes so far: a special token never splits a character in two
            parts.append(data.decode("utf-8", errors="replace"))
            data = bytearray()
            parts.append(self.specials[i - 256] if i < 256 + len(self.specials) else f"<unused{i}>")
        parts.append(data.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a checkpoint directory."""

    def __init__(self, path: str | Path, eos_token_id: int | None = None):
        path = Path(path)
        special = _read_json(path / "tokenizer_config.json")
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            self._encode = lambda text: self._tok.encode(text).ids
            self._decode = lambda ids, skip: self._tok.decode(ids, skip_special_tokens=skip)
            self.vocab_size = self._tok.get_vocab_size()
            eos = _token_text(special.get("eos_token"))
            tokenizer_eos = self._tok.token_to_id(eos) if eos is not None else None
        elif special:
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise ValueError(f"{path} has no tokenizer.json; reading its tokenizer_config.json needs "
                                 "the transformers package") from e
            self._tok = AutoTokenizer.from_pretrained(str(path))
            self._encode = lambda text: self._tok.encode(text)
            self._decode = lambda ids, skip: self._tok.decode(ids, skip_special_tokens=skip)
            self.vocab_size = len(self._tok)
            tokenizer_eos = self._tok.eos_token_id
        else:
            raise ValueError(f"no tokenizer.json or tokenizer_config.json in {path}")
        # the tokenizer's own EOS if it names one, else the model config's (the first, if it lists several)
        self.eos_token_id = tokenizer_eos if tokenizer_eos is not None else eos_token_id

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return list(self._encode(text))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._decode([int(i) for i in ids], skip_special_tokens)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(token) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token
