"""A checkpoint's chat template (from its tokenizer config), rendered by transformers' ``apply_chat_template``.

Models without one (the embedded tiny model among them) get no ``ChatTemplate``: the server then answers
/v1/chat/completions with a 400 rather than guessing a format the model was never trained on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .protocol import bad_request


class ChatTemplate:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a transformers tokenizer whose chat_template is set

    @classmethod
    def load(cls, model) -> "ChatTemplate | None":
        """The template of checkpoint directory ``model``; None if it names none (or ``model`` is no directory)."""
        if not isinstance(model, (str, os.PathLike)) or not Path(model).is_dir():
            return None
        path = Path(model)
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        if not config.get("chat_template") and not (path / "chat_template.jinja").is_file() \
                and not (path / "chat_template.json").is_file():
            return None
        from transformers import AutoTokenizer  # only checkpoints with a template need transformers

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(tokenizer) if getattr(tokenizer, "chat_template", None) else None

    def render(self, messages: list[dict]) -> list[int]:
        """The prompt token ids of ``messages`` (OpenAI's shape), ending where the assistant's answer starts."""
        messages = [_text_only(i, m) for i, m in enumerate(messages)]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError, or raise_exception() inside the template
            raise bad_request(f"the chat template rejected the messages: {e}", param="messages") from None
        # the template writes the special tokens (BOS...) itself
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _text_only(i: int, message: dict) -> dict:
    """Content given as a list of parts becomes their text; other part types (images...) are refused."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content: only text parts are supported, got {part.get('type')!r}",
                                  param="messages")
            texts.append(part["text"])
        message = {**message, "content": "".join(texts)}
    return message
