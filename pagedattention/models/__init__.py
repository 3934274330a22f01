"""Models: the Llama-family decoder over the paged KV cache, loading (``load``), the embedded tiny default."""
from .attention import AttentionMetadata, PagedAttention
from .config import CheckpointError, ModelConfig
from .llama import LlamaForCausalLM
from .loader import load, load_model
from .tiny import random_model, tiny_model
from .tokenizer import ByteTokenizer, HFTokenizer

__all__ = ["AttentionMetadata", "ByteTokenizer", "CheckpointError", "HFTokenizer", "LlamaForCausalLM",
           "ModelConfig", "PagedAttention", "load", "load_model", "random_model", "tiny_model"]
