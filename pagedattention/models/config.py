"""ModelConfig: the shape of a Llama-family decoder, read from a Hugging Face ``config.json``.

One decoder serves every supported family; the families differ only in a few switches:

    llama / mistral : plain q/k/v projections (bias if ``attention_bias``), RoPE, SwiGLU, RMSNorm
    qwen2           : q/k/v always carry a bias, o_proj never does
    qwen3           : RMSNorm over each q and k head before RoPE (``qk_norm``), explicit ``head_dim``
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE variants that are a fixed change of the inverse frequencies (see llama.rope_inv_freq). "dynamic" NTK
# rescales with the running sequence length and "yarn"/"longrope" also rescale attention; none are implemented.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: "
                                 f"{', '.join(SUPPORTED_ROPE_TYPES)}")
            required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                           "original_max_position_embeddings")}.get(rope_type, ())
            missing = [key for key in required if key not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling of type {rope_type!r} needs {', '.join(missing)}")

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
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = ", ".join(hf.get("architectures") or []) or "unknown architecture"
            raise ValueError(f"unsupported model_type {model_type!r} ({arch}); supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        if hf.get("mlp_bias"):
            raise ValueError("unsupported mlp_bias=True")
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
            raise ValueError("unsupported sliding-window attention layers")
        heads = hf["num_attention_heads"]
        max_positions = hf.get("max_position_embeddings", 4096)
        if model_type == "mistral" and hf.get("sliding_window"):
            # windowed attention equals full attention on sequences no longer than the window
            max_positions = min(max_positions, hf["sliding_window"])
        rope_theta, rope_scaling = _rope_from_hf(hf)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            o_proj_bias=False if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=max_positions,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either ``rope_theta`` + ``rope_scaling`` (4.x) or ``rope_parameters`` (5.x)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("unsupported partial_rotary_factor != 1.0")
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}
