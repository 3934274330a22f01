"""Checkpoint loading: config.json reading, safetensors (single and sharded), tokenizers, clear errors.

Every error a checkpoint can cause is a CheckpointError whose message starts with the path of the file at
fault; the broken checkpoints below are a good one saved by transformers, then edited.
"""
import json
import math
import random
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedattention.models import CheckpointError, HFTokenizer, ModelConfig, load, load_model

transformers = pytest.importorskip("transformers")

HF_CONFIG = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=256, eos_token_id=2)


def save_llama(path, **overrides):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_CONFIG, **overrides})).eval()
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def embeddings(model):
    return model.model.embed_tokens.weight


def raises_at(file, message):
    """A CheckpointError whose message starts with ``file``'s path and goes on to match ``message``."""
    return pytest.raises(CheckpointError, match="^" + re.escape(str(file)) + ": .*" + message)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved")
    save_llama(path)
    return path


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of a good checkpoint, for a test to break."""
    return shutil.copytree(saved, tmp_path / "ckpt")


# ---- config.json ----

def test_config_reads_transformers_4_and_5_spellings():
    common = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2)
    v4 = ModelConfig.from_hf_config({**common, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2}})
    v5 = ModelConfig.from_hf_config({**common, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5,
                                                                   "factor": 2}})
    assert v4 == v5
    assert (v4.rope_theta, v4.rope_scaling) == (5e5, {"rope_type": "linear", "factor": 2})
    assert (v4.num_key_value_heads, v4.head_dim) == (2, 4)  # defaults: MHA, hidden / heads


def test_config_family_switches():
    common = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    qwen2 = ModelConfig.from_hf_config({**common, "model_type": "qwen2"})
    qwen3 = ModelConfig.from_hf_config({**common, "model_type": "qwen3", "head_dim": 16, "attention_bias": True})
    mistral = ModelConfig.from_hf_config({**common, "model_type": "mistral", "max_position_embeddings": 32768,
                                          "sliding_window": 4096})
    assert (qwen2.attention_bias, qwen2.o_proj_bias, qwen2.qk_norm) == (True, False, False)
    assert (qwen3.attention_bias, qwen3.o_proj_bias, qwen3.qk_norm, qwen3.head_dim) == (True, True, True, 16)
    assert mistral.max_position_embeddings == 4096  # beyond the window, full attention would differ


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported model_type 'gpt2'.*GPT2LMHeadModel"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported rope_scaling type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"use_sliding_window": True}, "sliding-window"),
])
def test_config_rejects_what_it_cannot_run(change, message):
    hf = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=2)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**hf, **change})


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('"llama"', "expected a JSON object, got str"),
    ('{"model_type": "llama", ', "not readable JSON"),
    ("", "not readable JSON"),
])
def test_config_json_not_an_object(ckpt, text, message):
    (ckpt / "config.json").write_text(text)
    with raises_at(ckpt / "config.json", message):
        load_model(ckpt, dtype=torch.float32)


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_attention_heads", "num_hidden_layers"])
def test_config_json_missing_required_key(ckpt, key):
    data = json.loads((ckpt / "config.json").read_text())
    del data[key]
    (ckpt / "config.json").write_text(json.dumps(data))
    with raises_at(ckpt / "config.json", f"missing required key {key}"):
        load_model(ckpt, dtype=torch.float32)


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive int, got 0"),
    ({"num_attention_heads": -4}, "num_attention_heads must be a positive int, got -4"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive int, got 0"),
    ({"num_key_value_heads": -2}, "num_key_value_heads must be a positive int"),
    ({"num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": None},
     r"hidden_size \(32\) is not a multiple of num_attention_heads \(5\)"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be a finite number >= 0"),
    ({"rms_norm_eps": math.nan}, "rms_norm_eps must be a finite number >= 0"),
    ({"rms_norm_eps": math.inf}, "rms_norm_eps must be a finite number >= 0"),
    ({"eos_token_id": "2"}, "eos_token_id must be a non-negative int, got '2'"),
    ({"vocab_size": "300"}, "vocab_size must be a positive int"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be a bool"),
    ({"rope_parameters": [10000.0]}, "rope_parameters must be an object"),
])
def test_config_json_bad_values(ckpt, change, message):
    data = json.loads((ckpt / "config.json").read_text())
    data.update(change)
    data = {key: value for key, value in data.items() if value is not None}  # None: the key is absent
    (ckpt / "config.json").write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    with raises_at(ckpt / "config.json", message):
        load_model(ckpt, dtype=torch.float32)


@pytest.mark.parametrize("text, message", [
    ('{"eos_token_id": "2"}', "eos_token_id must be a non-negative int, got '2'"),
    ('{"eos_token_id": [2, "7"]}', "eos_token_id must be a non-negative int, got '7'"),
    ("[2]", "expected a JSON object"),
    ('{"eos_token_id": ', "not readable JSON"),
])
def test_generation_config_bad_eos(ckpt, text, message):
    (ckpt / "generation_config.json").write_text(text)
    with raises_at(ckpt / "generation_config.json", message):
        load_model(ckpt, dtype=torch.float32)


# ---- weights ----

def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    save_llama(tmp_path / "single")
    hf = save_llama(tmp_path / "sharded")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    single, _, _ = load_model(tmp_path / "single", dtype=torch.float32)
    sharded, _, config = load_model(tmp_path / "sharded", dtype=torch.float32)
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(sharded.model.layers[1].self_attn.qkv_proj.weight[-8:],
                               hf.model.layers[1].self_attn.v_proj.weight[-8:])


def test_dtype_and_tied_embeddings(tmp_path):
    save_llama(tmp_path, tie_word_embeddings=True)
    model, tokenizer, config = load_model(tmp_path, dtype=torch.bfloat16)
    assert tokenizer is None  # the checkpoint ships no tokenizer
    assert embeddings(model).dtype == torch.bfloat16 and model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.lm_head.weight is embeddings(model)


def test_generation_config_eos_wins(tmp_path):
    save_llama(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    _, _, config = load_model(tmp_path, dtype=torch.float32)
    assert config.eos_token_ids == [2, 7]


def test_missing_directory_config_or_weights(tmp_path):
    with raises_at(tmp_path / "nope", "does not exist"):
        load_model(tmp_path / "nope", dtype=torch.float32)
    with raises_at(tmp_path / "config.json", "no config.json"):
        load_model(tmp_path, dtype=torch.float32)
    save_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with raises_at(tmp_path, r"no \*.safetensors"):
        load_model(tmp_path, dtype=torch.float32)


def test_unknown_model_type(tmp_path):
    save_llama(tmp_path)
    edit_json(tmp_path / "config.json", model_type="falcon", architectures=["FalconForCausalLM"])
    with pytest.raises(ValueError, match="'falcon'.*FalconForCausalLM"):
        load(str(tmp_path), dtype=torch.float32)


def test_missing_shard(tmp_path):
    save_llama(tmp_path, tie_word_embeddings=False)
    transformers.LlamaForCausalLM.from_pretrained(tmp_path).save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with raises_at(tmp_path / "model.safetensors.index.json", f"missing.*{shard.name}"):
        load_model(tmp_path, dtype=torch.float32)


def test_missing_tensor(tmp_path):
    save_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with raises_at(tmp_path, r"lacks 1 tensors: model.layers.1.self_attn.k_proj.weight"):
        load_model(tmp_path, dtype=torch.float32)


def test_unexpected_tensor(tmp_path):
    save_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = torch.ones(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with raises_at(tmp_path / "model.safetensors", "unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_model(tmp_path, dtype=torch.float32)


def test_shape_mismatch(tmp_path):
    save_llama(tmp_path)
    edit_json(tmp_path / "config.json", intermediate_size=64)
    # safetensors lists tensors by name: down_proj is the first whose shape depends on intermediate_size
    with raises_at(tmp_path / "model.safetensors", r"'model.layers.0.mlp.down_proj.weight' has shape \[32, 48\], "
                                                    r"expected \[32, 64\]"):
        load_model(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "header only"])
def test_unreadable_safetensors(ckpt, damage):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    noise = bytes(random.getrandbits(8) for _ in range(4096))
    file.write_bytes({"truncated": data[:len(data) - random.randrange(1, len(data) // 2)], "empty": b"",
                      "garbage": noise, "header only": data[:8 + int.from_bytes(data[:8], "little")]}[damage])
    with raises_at(file, "not a readable safetensors file"):
        load_model(ckpt, dtype=torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight",
                                  "model.norm.weight"])
def test_non_finite_tensor_is_named(ckpt, name, bad):
    tensors = load_file(ckpt / "model.safetensors")
    flat = tensors[name].view(-1)
    flat[random.randrange(flat.numel())] = bad
    save_file(tensors, ckpt / "model.safetensors")
    with raises_at(ckpt / "model.safetensors", f"tensor '{name}' holds NaN or Inf"):
        load_model(ckpt, dtype=torch.float32)


def test_values_beyond_the_target_dtype(ckpt):
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = load_file(ckpt / "model.safetensors")
    tensors[name].view(-1)[random.randrange(tensors[name].numel())] = 1e6  # fp16 tops out at 65504
    save_file(tensors, ckpt / "model.safetensors")
    load_model(ckpt, dtype=torch.float32)  # fine where it fits
    with raises_at(ckpt / "model.safetensors", f"tensor '{name}' has values up to 1e\\+06, beyond the range of "
                                               "torch.float16"):
        load_model(ckpt, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_tensor_dtype_that_cannot_be_cast(ckpt, dtype):
    name = "model.layers.1.mlp.gate_proj.weight"
    tensors = load_file(ckpt / "model.safetensors")
    tensors[name] = torch.ones_like(tensors[name], dtype=dtype)
    save_file(tensors, ckpt / "model.safetensors")
    with raises_at(ckpt / "model.safetensors", f"tensor '{name}' has dtype {dtype}, which cannot be cast"):
        load_model(ckpt, dtype=torch.bfloat16)


def test_half_precision_checkpoint_loads_into_float32(ckpt, saved):
    tensors = load_file(ckpt / "model.safetensors")
    save_file({name: t.half() for name, t in tensors.items()}, ckpt / "model.safetensors")
    model, _, _ = load_model(ckpt, dtype=torch.float32)
    torch.testing.assert_close(embeddings(model), tensors["model.embed_tokens.weight"].half().float(), rtol=0, atol=0)


def test_tensor_in_two_files(ckpt):
    name = "model.norm.weight"
    tensors = load_file(ckpt / "model.safetensors")
    save_file({name: tensors[name]}, ckpt / "zz-extra.safetensors")
    with raises_at(ckpt / "zz-extra.safetensors", f"tensor '{name}' is also in .*model.safetensors"):
        load_model(ckpt, dtype=torch.float32)


def shard_checkpoint(path):
    """Rewrite the checkpoint as two shards and an index; returns the index dict."""
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, path / shard)
    index = {"metadata": {}, "weight_map": {n: shard for shard, ns in shards.items() for n in ns}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


@pytest.mark.parametrize("text, message", [
    ('{"metadata": {}}', "weight_map must be a non-empty object"),
    ('{"weight_map": ["model-00001-of-00002.safetensors"]}', "weight_map must be a non-empty object"),
    ('{"weight_map": "model-00001-of-00002.safetensors"}', "weight_map must be a non-empty object"),
    ('{"weight_map": {}}', "weight_map must be a non-empty object"),
    ('{"weight_map": {"model.norm.weight": 3}}', "shard 3 of tensor 'model.norm.weight'"),
    ("[]", "expected a JSON object"),
    ('{"weight_map": {', "not readable JSON"),
])
def test_bad_index(ckpt, text, message):
    shard_checkpoint(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(text)
    with raises_at(ckpt / "model.safetensors.index.json", message):
        load_model(ckpt, dtype=torch.float32)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "absolute", "sub/../../outside.safetensors"])
def test_index_shard_outside_the_directory(ckpt, escape):
    """The named file exists and holds the right tensors: only where it lives is wrong."""
    index = shard_checkpoint(ckpt)
    outside = ckpt.parent / "outside.safetensors"
    shutil.move(ckpt / "model-00002-of-00002.safetensors", outside)
    (ckpt / "sub").mkdir()
    shard = str(outside) if escape == "absolute" else escape
    index["weight_map"] = {n: shard if s.startswith("model-00002") else s for n, s in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with raises_at(ckpt / "model.safetensors.index.json", f"shard '{re.escape(shard)}' of tensor .* is not a file "
                                                           "name inside the checkpoint directory"):
        load_model(ckpt, dtype=torch.float32)


def test_index_shard_may_be_a_symlink_elsewhere(ckpt, saved):
    """The Hugging Face cache keeps each file of a snapshot as a link to a blob in another directory."""
    shard_checkpoint(ckpt)
    blob = ckpt.parent / "blob"
    shutil.move(ckpt / "model-00002-of-00002.safetensors", blob)
    (ckpt / "model-00002-of-00002.safetensors").symlink_to(blob)
    model, _, _ = load_model(ckpt, dtype=torch.float32)
    reference, _, _ = load_model(saved, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ---- tokenizer ----

def test_checkpoint_tokenizer_round_trip(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    corpus = ["paged attention stores the cache in blocks", "a block table maps positions to blocks"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"])
    save_llama(tmp_path)
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    _, tokenizer, config = load_model(tmp_path, dtype=torch.float32)
    assert isinstance(tokenizer, HFTokenizer)
    text = "the block table maps blocks"
    ids = tokenizer.encode(text)
    assert 0 < len(ids) < len(text) and all(0 <= i < config.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == bpe.token_to_id("</s>") == 1
    assert tokenizer.decode(ids + [1]) == text and "</s>" in tokenizer.decode(ids + [1], skip_special_tokens=False)
    assert tokenizer.vocab_size == bpe.get_vocab_size()


@pytest.mark.parametrize("file, text, message", [
    ("tokenizer.json", '{"model": {"type": "BPE", "vocab": ', "not a valid tokenizer"),
    ("tokenizer.json", '{"version": "1.0", "model": 7}', "not a valid tokenizer"),
    ("tokenizer.json", "", "not a valid tokenizer"),
    ("tokenizer_config.json", "[]", "expected a JSON object, got list"),
    ("tokenizer_config.json", '{"eos_token": ', "not readable JSON"),
])
def test_corrupt_tokenizer(ckpt, file, text, message):
    (ckpt / file).write_text(text)
    with raises_at(ckpt / file, message):
        load_model(ckpt, dtype=torch.float32)

