"""Loading a Hugging Face checkpoint directory: config.json, *.safetensors (one file or sharded), tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .llama import LlamaForCausalLM
from .tokenizer import HFTokenizer


def load_model(path, *, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """``(model, tokenizer, config)`` from a checkpoint directory; tokenizer is None if it ships none."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").exists():
        raise ValueError(f"no config.json in {path}")
    config = ModelConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    generation = path / "generation_config.json"
    if generation.exists():  # generation_config's EOS list (e.g. chat end tokens) is what generation stops on
        config.eos_token_id = json.loads(generation.read_text()).get("eos_token_id", config.eos_token_id)

    with torch.device("meta"):  # no memory or init time spent on weights about to be overwritten
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # materialising from meta gives every parameter its own storage
    model.model.rotary_emb.reset_parameters()  # buffers are not in the checkpoint; RoPE stays float32
    slots, filled = model.hf_weight_slots(), set()
    for file in _weight_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and name not in slots):
                    continue  # old checkpoints store RoPE's buffer; tied models may store lm_head anyway
                if name not in slots:
                    raise ValueError(f"{file.name}: unexpected tensor {name!r} for {config.model_type}")
                param, rows = slots[name]
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(param[rows].shape):
                    raise ValueError(f"{file.name}: tensor {name!r} has shape {list(tensor.shape)}, "
                                     f"expected {list(param[rows].shape)}")
                with torch.no_grad():
                    param[rows].copy_(tensor)
                filled.add(name)
    missing = sorted(set(slots) - filled)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    has_tokenizer = (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()
    eos = config.eos_token_ids[0] if config.eos_token_ids else None
    tokenizer = HFTokenizer(path, eos_token_id=eos) if has_tokenizer else None
    return model.eval(), tokenizer, config


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [s for s in shards if not (path / s).exists()]
        if absent:
            raise ValueError(f"{index.name} names shards missing from {path}: {', '.join(absent)}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path}")
    return files
