"""Checkpoint loading: config.json reading, safetensors (single and sharded), tokenizers, clear errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedattention.models import HFTokenizer, ModelConfig, load, load_model

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
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope", dtype=torch.float32)
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path, dtype=torch.float32)
    save_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*.safetensors"):
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
    with pytest.raises(ValueError, match=f"missing.*{shard.name}"):
        load_model(tmp_path, dtype=torch.float32)


def test_missing_tensor(tmp_path):
    save_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 tensors: model.layers.1.self_attn.k_proj.weight"):
        load_model(tmp_path, dtype=torch.float32)


def test_unexpected_tensor(tmp_path):
    save_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = torch.ones(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_model(tmp_path, dtype=torch.float32)


def test_shape_mismatch(tmp_path):
    save_llama(tmp_path)
    edit_json(tmp_path / "config.json", intermediate_size=64)
    # safetensors lists tensors by name: down_proj is the first whose shape depends on intermediate_size
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \[32, 48\], "
                                         r"expected \[32, 64\]"):
        load_model(tmp_path, dtype=torch.float32)


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


def test_load_picks_tiny_default_and_checks_dtype():
    model, tokenizer, config = load(None, dtype="bfloat16")
    assert embeddings(model).dtype == torch.bfloat16 and config.vocab_size == tokenizer.vocab_size
    with pytest.raises(TypeError, match="dtype"):
        load(None, dtype="int8")
    with pytest.raises(TypeError, match="dtype"):
        load(None, dtype="float33")
