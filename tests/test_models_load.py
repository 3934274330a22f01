"""``models.load``, the one way to get a model: what each kind of source gives, and what it refuses.

Also ModelConfig's own checks, for configs built in code (benchmarks, tests) rather than read from a file.
"""
import json
import math
import random

import pytest
import torch

from pagedattention.models import ByteTokenizer, ModelConfig, load, tiny_model
from pagedattention.models.llama import LlamaForCausalLM

QWEN_LIKE = dict(model_type="qwen2", vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                 num_attention_heads=6, num_key_value_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, attention_bias=True, max_position_embeddings=512, eos_token_id=7)


def benchmark_recipe(config, seed, dtype):
    """Random weights as the benchmarks have always drawn them, the definition ``load`` must keep: torch's
    default init under ``manual_seed(seed)``, then every Linear weight N(0, 0.02), then the cast."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.02)
    return model.to(dtype)


def assert_same_weights(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=0, msg=name)


# ---- what each source gives ----

def test_none_is_the_embedded_tiny_model():
    model, tokenizer, config = load(None, seed=random.randrange(1, 2**31))
    reference, _, reference_config = tiny_model()
    assert config == reference_config and not model.training
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.vocab_size == config.vocab_size
    assert_same_weights(model, reference)  # the seed is for random shapes: the tiny model is always the same


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_config_gives_the_benchmarks_random_weights(dtype):
    config = ModelConfig(**QWEN_LIKE)
    seed = random.randrange(2**31)
    rng_before = torch.get_rng_state()
    model, tokenizer, returned = load(config, dtype=dtype, seed=seed)
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeded without touching the caller's RNG
    assert tokenizer is None and returned is config and not model.training
    assert_same_weights(model, benchmark_recipe(config, seed, dtype))
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert abs(qkv.float().std().item() - 0.02) < 0.002
    other, _, _ = load(config, dtype=dtype, seed=seed + 1)
    assert not torch.equal(other.model.layers[0].self_attn.qkv_proj.weight, qkv)


def save_checkpoint(model, config, path):
    """Write ``model`` as a Hugging Face checkpoint directory (config.json + one safetensors file)."""
    from safetensors.torch import save_file

    path.mkdir()
    tensors = {name: param[rows].detach().contiguous() for name, (param, rows) in model.hf_weight_slots().items()}
    save_file(tensors, path / "model.safetensors")
    hf = {key: value for key, value in config.to_dict().items()
          if key not in ("rope_scaling", "o_proj_bias", "qk_norm", "bos_token_id")}
    (path / "config.json").write_text(json.dumps(hf))


def test_path_is_a_checkpoint_directory(tmp_path):
    config = ModelConfig(**QWEN_LIKE)
    saved, _, _ = load(config, seed=random.randrange(2**31))
    save_checkpoint(saved, config, tmp_path / "ckpt")
    for source in (tmp_path / "ckpt", str(tmp_path / "ckpt")):
        model, tokenizer, loaded_config = load(source)
        assert loaded_config == config and tokenizer is None and not model.training
        assert_same_weights(model, saved)


@pytest.mark.parametrize("source", [42, 3.5, b"/some/dir", ["/some/dir"], {"model_type": "llama"}])
def test_other_sources_are_a_type_error(source):
    with pytest.raises(TypeError, match=f"^model must be a checkpoint directory .*got {type(source).__name__}"):
        load(source)


def test_empty_path_is_refused():
    with pytest.raises(ValueError, match="empty path"):
        load("")


def test_load_checks_dtype_device_and_seed():
    model, tokenizer, config = load(None, dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and config.vocab_size == tokenizer.vocab_size
    for dtype in ("int8", "float33", torch.int32, torch.float64, 16):
        with pytest.raises(TypeError, match="dtype"):
            load(None, dtype=dtype)
    with pytest.raises(ValueError, match="device"):
        load(None, device="gpu")
    with pytest.raises(TypeError, match="device"):
        load(None, device=["cpu"])
    for seed in ("1", 1.0, True):
        with pytest.raises(TypeError, match="seed"):
            load(ModelConfig(**QWEN_LIKE), seed=seed)


# ---- ModelConfig built in code ----

TINY_SHAPE = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=4)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)


@pytest.mark.parametrize("change, key", [
    ({"vocab_size": 0}, "vocab_size"), ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"intermediate_size": -16}, "intermediate_size"), ({"hidden_size": 8.0}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"), ({"num_key_value_heads": -2}, "num_key_value_heads"),
    ({"head_dim": 0}, "head_dim"), ({"head_dim": 5}, "head_dim"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"rope_theta": 0.0}, "rope_theta"), ({"rope_theta": math.inf}, "rope_theta"),
    ({"rope_theta": "1e4"}, "rope_theta"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"), ({"rms_norm_eps": math.nan}, "rms_norm_eps"),
    ({"rms_norm_eps": math.inf}, "rms_norm_eps"), ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"attention_bias": 1}, "attention_bias"), ({"bos_token_id": -1}, "bos_token_id"),
    ({"eos_token_id": "2"}, "eos_token_id"), ({"eos_token_id": [2, "3"]}, "eos_token_id"),
    ({"eos_token_id": 2.0}, "eos_token_id"), ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0.0}}, "rope_scaling factor"),
    ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, "rope_scaling high_freq_factor"),
    ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 0}},
     "rope_scaling original_max_position_embeddings"),
])
def test_model_config_rejects_degenerate_values_naming_the_key(change, key):
    ModelConfig(**TINY_SHAPE, rope_scaling=LLAMA3)  # the base is valid: the change alone is at fault
    with pytest.raises(ValueError, match=f"^{key} .*must"):
        ModelConfig(**{**TINY_SHAPE, **change})


def test_eos_token_ids_of_one_or_several():
    assert ModelConfig(**TINY_SHAPE, eos_token_id=7).eos_token_ids == [7]
    assert ModelConfig(**TINY_SHAPE, eos_token_id=[7, 3]).eos_token_ids == [7, 3]
    assert ModelConfig(**TINY_SHAPE).eos_token_ids == []
