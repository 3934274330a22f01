"""ModelConfig: the shape of a Llama-family decoder, read from a Hugging Face ``config.json``.

One decoder serves every supported family; the families differ only in a few switches:

    llama / mistral : plain q/k/v projections (bias if ``attention_bias``), RoPE, SwiGLU, RMSNorm
    qwen2           : q/k/v always carry a bias, o_proj never does
    qwen3           : RMSNorm over each q and k head before RoPE (``qk_norm``), explicit ``head_dim``

A ``config.json`` is outside input: ``from_hf_config`` refuses what the decoder cannot run and ``ModelConfig``
refuses degenerate values, each with a ValueError naming the key; the loader prefixes the file's path
(``CheckpointError``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE variants that are a fixed change of the inverse frequencies (see llama.rope_inv_freq). "dynamic" NTK
# rescales with the running sequence length and "yarn"/"longrope" also rescale attention; none are implemented.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded. The message starts with the file's path."""


def read_json_object(file: Path) -> dict:
    """A checkpoint's JSON file that must hold one object (config.json, tokenizer_config.json, ...)."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_token_id(name: str, value) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # None = plain RoPE; else {"rope_type": "linear" | "llama3", ...}
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False        # bias on q/k/v projections
    o_proj_bias: bool = False           # bias on the attention output projection
    qk_norm: bool = False               # Qwen3: RMSNorm over each q/k head before RoPE
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not _is_real(self.rope_theta) or not math.isfinite(self.rope_theta) or self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be a finite number > 0, got {self.rope_theta!r}")
        # 0 is allowed (no epsilon); a negative one can make the RMS of a small vector imaginary
        if not _is_real(self.rms_norm_eps) or not math.isfinite(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise ValueError(f"rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps!r}")
        for name in ("tie_word_embeddings", "attention_bias", "o_proj_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.bos_token_id is not None:
            _check_token_id("bos_token_id", self.bos_token_id)
        # a string would otherwise read as a list of one-character "ids" in eos_token_ids
        if isinstance(self.eos_token_id, (list, tuple)):
            for token_id in self.eos_token_id:
                _check_token_id("eos_token_id", token_id)
        elif self.eos_token_id is not None:
            _check_token_id("eos_token_id", self.eos_token_id)
        if self.rope_scaling is not None:
            self._check_rope_scaling()

    def _check_rope_scaling(self):
        if not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be a dict or None, got {self.rope_scaling!r}")
        rope_type = self.rope_scaling.get("rope_type")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                       "original_max_position_embeddings")}.get(rope_type, ())
        missing = [key for key in required if key not in self.rope_scaling]
        if missing:
            raise ValueError(f"rope_scaling of type {rope_type!r} needs {', '.join(missing)}")
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            value = self.rope_scaling.get(key, 1.0)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"rope_scaling {key} must be a finite number > 0, got {value!r}")
        if rope_type == "llama3":
            low, high = self.rope_scaling["low_freq_factor"], self.rope_scaling["high_freq_factor"]
            if high <= low:  # llama3 interpolates between the two: equal ones divide by zero
                raise ValueError(f"rope_scaling high_freq_factor ({high}) must exceed low_freq_factor ({low})")
            old_len = self.rope_scaling["original_max_position_embeddings"]
            if not _is_int(old_len) or old_len < 1:
                raise ValueError(f"rope_scaling original_max_position_embeddings must be a positive int, "
                                 f"got {old_len!r}")

    @property
    def eos_token_ids(self) -> list[int]:
        """All end-of-sequence ids (a config may give one or several)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        """Read a ``config.json`` dict (transformers 4.x or 5.x spelling); refuse what this decoder cannot run."""
        if not isinstance(hf, dict):
            raise ValueError(f"config must be a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = hf.get("architectures")
            arch = ", ".join(map(str, arch)) if isinstance(arch, list) and arch else "unknown architecture"
            raise ValueError(f"unsupported model_type {model_type!r} ({arch}); supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        missing = [key for key in REQUIRED_HF_KEYS if hf.get(key) is None]
        if missing:
            raise ValueError(f"missing required key{'s' * (len(missing) > 1)} {', '.join(missing)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        if hf.get("mlp_bias"):
            raise ValueError("unsupported mlp_bias=True")
        layer_types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or not isinstance(layer_types, list) or any(
                t != "full_attention" for t in layer_types):
            raise ValueError("unsupported sliding-window attention layers")
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        head_dim = hf.get("head_dim")
        if head_dim is None and _is_int(heads) and _is_int(hidden) and heads > 0 and hidden > 0:
            if hidden % heads:  # (otherwise ModelConfig names the bad one)
                raise ValueError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
                                 "and no head_dim is given")
            head_dim = hidden // heads
        kv_heads = hf.get("num_key_value_heads")
        max_positions = hf.get("max_position_embeddings", 4096)
        window = hf.get("sliding_window") if model_type == "mistral" else None
        if window:  # windowed attention equals full attention on sequences no longer than the window
            if not _is_int(window) or window < 1:
                raise ValueError(f"sliding_window must be a positive int or null, got {window!r}")
            if _is_int(max_positions):
                max_positions = min(max_positions, window)
        rope_theta, rope_scaling = _rope_from_hf(hf)
        attention_bias = hf.get("attention_bias") or False
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=heads if kv_heads is None else kv_heads,
            head_dim=head_dim,
            rope_theta=float(rope_theta) if _is_real(rope_theta) else rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings") or False,
            attention_bias=True if model_type == "qwen2" else attention_bias,
            o_proj_bias=False if model_type == "qwen2" else attention_bias,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=max_positions,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either ``rope_theta`` + ``rope_scaling`` (4.x) or ``rope_parameters`` (5.x)."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{key} must be an object or null, got {params!r}")
    params = dict(params)
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("unsupported partial_rotary_factor != 1.0")
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}
