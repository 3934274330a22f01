"""Tokenizers behind one small interface: ``encode``, ``decode``, ``eos_token_id``, ``vocab_size``.

- ByteTokenizer: the embedded default's; ids 0..255 are the UTF-8 bytes, then a few special tokens.
- HFTokenizer: a checkpoint's own tokenizer (``tokenizer.json`` through the ``tokenizers`` library, or
  transformers' AutoTokenizer for checkpoints that only ship ``tokenizer_config.json`` + a vocab file).
"""
from __future__ import annotations

from pathlib import Path

from .config import CheckpointError, read_json_object


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
        """Raises CheckpointError, naming the file, for a tokenizer that does not load."""
        path = Path(path)
        config_file, tokenizer_file = path / "tokenizer_config.json", path / "tokenizer.json"
        special = read_json_object(config_file) if config_file.exists() else {}
        if tokenizer_file.exists():
            from tokenizers import Tokenizer

            try:
                self._tok = Tokenizer.from_file(str(tokenizer_file))
            except Exception as e:  # the tokenizers library raises a bare Exception for any bad file
                raise CheckpointError(f"{tokenizer_file}: not a valid tokenizer ({e})") from e
            self._encode = lambda text: self._tok.encode(text).ids
            self._decode = lambda ids, skip: self._tok.decode(ids, skip_special_tokens=skip)
            self.vocab_size = self._tok.get_vocab_size()
            eos = _token_text(special.get("eos_token"))
            tokenizer_eos = self._tok.token_to_id(eos) if eos is not None else None
        elif config_file.exists():
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise CheckpointError(f"{config_file}: reading a tokenizer without tokenizer.json needs the "
                                      "transformers package") from e
            try:
                self._tok = AutoTokenizer.from_pretrained(str(path))
            except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... by file and class
                raise CheckpointError(f"{config_file}: transformers could not load the tokenizer "
                                      f"({type(e).__name__}: {e})") from e
            self._encode = lambda text: self._tok.encode(text)
            self._decode = lambda ids, skip: self._tok.decode(ids, skip_special_tokens=skip)
            self.vocab_size = len(self._tok)
            tokenizer_eos = self._tok.eos_token_id
        else:
            raise CheckpointError(f"{path}: no tokenizer.json or tokenizer_config.json")
        # the tokenizer's own EOS if it names one, else the model config's (the first, if it lists several)
        self.eos_token_id = tokenizer_eos if tokenizer_eos is not None else eos_token_id

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return list(self._encode(text))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._decode([int(i) for i in ids], skip_special_tokens)


def _token_text(token) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    text = token.get("content") if isinstance(token, dict) else token
    return text if isinstance(text, str) else None
