"""Loading a model: the one entry ``load``, and the checkpoint reader behind it.

``load`` takes None (the embedded tiny model), a ModelConfig (random weights of that shape) or a Hugging Face
checkpoint directory: ``config.json``, ``*.safetensors`` (one file, or shards listed by
``model.safetensors.index.json``), optionally ``generation_config.json`` and tokenizer files.

A checkpoint is outside input: everything wrong with one raises CheckpointError, whose message starts with the
path of the file at fault and names the key or tensor.

Tensor parallelism (``tp``): a rank loads only its shard. From a checkpoint each tensor's slice is read into its
slot (the file's tensor is still checked against the whole model's shape); the tiny model and a ModelConfig
build the full seeded weights (the same on every rank) and keep the slices.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePath

import torch
from safetensors import SafetensorError, safe_open

from . import parallel
from .config import CheckpointError, ModelConfig, read_json_object
from .llama import LlamaForCausalLM
from .parallel import Shard, TensorParallel
from .tiny import TINY_CONFIG, random_model, tiny_model
from .tokenizer import HFTokenizer


def load(source=None, *, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
         seed: int = 0, tp: TensorParallel | None = None):
    """``(model in eval mode, tokenizer or None, ModelConfig)`` for ``source``:

    - None: the embedded tiny model (always the same weights) with its byte tokenizer;
    - a ModelConfig: random weights of that shape drawn on ``device`` under ``seed``, no tokenizer;
    - a str or os.PathLike: a checkpoint directory (CheckpointError if it cannot be loaded).

    ``dtype`` is torch.float16, torch.bfloat16 or torch.float32, or its name. ``tp``: load this rank's shard.
    """
    dtype = _model_dtype(dtype)
    device = _device(device)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if source is None or isinstance(source, ModelConfig):
        full = tiny_model(dtype=dtype, device=device) if source is None else random_model(
            source, dtype=dtype, device=device, seed=seed)
        return full if tp is None or tp.size == 1 else (_shard_of(full[0], tp), *full[1:])
    if isinstance(source, (str, os.PathLike)):
        return load_model(source, dtype=dtype, device=device, tp=tp)
    raise TypeError(f"model must be a checkpoint directory (str or os.PathLike), a ModelConfig or None, "
                    f"got {type(source).__name__}")


def read_model_config(source) -> ModelConfig:
    """The ModelConfig ``load(source)`` would return, without loading any weight."""
    if source is None:
        return ModelConfig(**TINY_CONFIG)
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        return _read_config(_checkpoint_dir(source))
    raise TypeError(f"model must be a checkpoint directory (str or os.PathLike), a ModelConfig or None, "
                    f"got {type(source).__name__}")


def load_model(path, *, dtype: torch.dtype | str = torch.bfloat16, device: torch.device | str = "cpu",
               tp: TensorParallel | None = None):
    """``(model, tokenizer, config)`` from a checkpoint directory; tokenizer is None if it ships none."""
    dtype, device = _model_dtype(dtype), _device(device)
    path = _checkpoint_dir(path)
    config = _read_config(path)
    has_tokenizer = (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()
    eos = config.eos_token_ids[0] if config.eos_token_ids else None
    # before the weights: a broken tokenizer fails in a second, not after minutes of loading
    tokenizer = HFTokenizer(path, eos_token_id=eos) if has_tokenizer else None

    model = _empty_model(config, dtype, device, tp)
    _load_weights(model, path)
    return model.eval(), tokenizer, config


def _checkpoint_dir(path) -> Path:
    if os.fspath(path) == "":
        raise ValueError("model must name a checkpoint directory, got an empty path")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    return path


def _empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, tp) -> LlamaForCausalLM:
    with torch.device("meta"):  # no memory or init time spent on weights about to be overwritten
        model = LlamaForCausalLM(config, tp)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # materialising from meta gives every parameter its own storage
    model.model.rotary_emb.reset_parameters()  # buffers are not in the checkpoint; RoPE stays float32
    parallel.zero_padding_(model)
    return model


def _shard_of(full: LlamaForCausalLM, tp: TensorParallel) -> LlamaForCausalLM:
    """This rank's shard of a whole model, in eval mode (its slices copied, the whole model left to be freed)."""
    weight = full.model.embed_tokens.weight
    model = _empty_model(full.config, weight.dtype, weight.device, tp)
    whole = full.hf_weight_slots()
    with torch.no_grad():
        for name, (param, rows, *split) in model.hf_weight_slots().items():
            source_param, source_rows = whole[name]
            tensor = source_param[source_rows]
            param[rows].copy_(split[0].take(tensor) if split else tensor)
    return model.eval()


def _read_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: no config.json in the checkpoint directory")
    try:
        config = ModelConfig.from_hf_config(read_json_object(file))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from e
    file = path / "generation_config.json"
    if file.exists():  # generation_config's EOS list (e.g. chat end tokens) is what generation stops on
        generation = read_json_object(file)
        if "eos_token_id" in generation:
            try:  # replace() checks the new value as the constructor does
                config = dataclasses.replace(config, eos_token_id=generation["eos_token_id"])
            except ValueError as e:
                raise CheckpointError(f"{file}: {e}") from e
    return config


def _load_weights(model: LlamaForCausalLM, path: Path) -> None:
    """Copy every checkpoint tensor into its rows of the model, checking each as it arrives."""
    slots, filled = model.hf_weight_slots(), {}
    model_type = model.config.model_type
    for file in _weight_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and name not in slots):
                        continue  # old checkpoints store RoPE's buffer; tied models may store lm_head anyway
                    if name not in slots:
                        raise CheckpointError(f"{file}: unexpected tensor {name!r} for {model_type}")
                    if name in filled:
                        raise CheckpointError(f"{file}: tensor {name!r} is also in {filled[name]}")
                    slot = slots[name]
                    if len(slot) == 2:
                        _copy_tensor(file, name, f.get_tensor(name), *slot)
                    else:  # this rank's part only, read without the rest of the tensor
                        _copy_shard(file, name, f.get_slice(name), *slot)
                    filled[name] = file
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
    missing = sorted(set(slots) - set(filled))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensors: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))


def _copy_shard(file: Path, name: str, stored, param: torch.nn.Parameter, rows: slice, shard: Shard) -> None:
    """``_copy_tensor`` of this rank's ``shard`` of a stored tensor (a safetensors slice), after checking the whole
    tensor's shape against the whole model's."""
    expected = shard.full_shape(param[rows].shape)
    if list(stored.get_shape()) != expected:
        raise CheckpointError(f"{file}: tensor {name!r} has shape {list(stored.get_shape())}, expected {expected}")
    tensor = stored[tuple([slice(None)] * shard.dim + [slice(shard.start, shard.stop)])]
    _copy_tensor(file, name, tensor, param, rows)


def _copy_tensor(file: Path, name: str, tensor: torch.Tensor, param: torch.nn.Parameter, rows: slice) -> None:
    target = param[rows]
    if not tensor.dtype.is_floating_point:  # integer or bool weights are quantised or not weights at all
        raise CheckpointError(f"{file}: tensor {name!r} has dtype {tensor.dtype}, which cannot be cast to "
                              f"{param.dtype}")
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(f"{file}: tensor {name!r} has shape {list(tensor.shape)}, "
                              f"expected {list(target.shape)}")
    with torch.no_grad():
        target.copy_(tensor)
    # checked after the cast, where the model will read it: catches NaN/Inf stored in the file and finite
    # values beyond the range of a narrower dtype alike
    if not torch.isfinite(target).all():
        if not torch.isfinite(tensor.float()).all():
            raise CheckpointError(f"{file}: tensor {name!r} holds NaN or Inf values")
        raise CheckpointError(f"{file}: tensor {name!r} has values up to {tensor.float().abs().max().item():.4g}, "
                              f"beyond the range of {param.dtype}")


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file, "
                                  f"got {weight_map!r:.80}")
        for name, shard in weight_map.items():
            if not _is_relative_file_name(shard):
                raise CheckpointError(f"{index}: shard {shard!r} of tensor {name!r} is not a file name inside "
                                      f"the checkpoint directory")
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (path / s).is_file()]
        if absent:
            raise CheckpointError(f"{index}: names shards missing from {path}: {', '.join(absent)}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights in the checkpoint directory")
    return files


def _is_relative_file_name(shard) -> bool:
    """A path that stays inside the directory it is joined to, judged by its text alone: a shard may be a
    symlink to elsewhere (the Hugging Face cache links each file to a blob), but the index may not point there."""
    if not isinstance(shard, str) or not shard:
        return False
    parts = PurePath(shard).parts
    return not PurePath(shard).is_absolute() and ".." not in parts and "\x00" not in shard and parts != ()


def _model_dtype(dtype) -> torch.dtype:
    name = dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32 (or its name), got {name!r}")
    return dtype


def _device(device) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device or its name, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must name a torch device ('cpu', 'cuda', 'cuda:1', ...), got {device!r}") from e
