"""The Hugging Face baselines of benchmarks/hf_baselines.py on a tiny random model (CPU)."""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pytest  # noqa: E402
import torch  # noqa: E402

import hf_baselines  # noqa: E402
from pagedattention.models import ModelConfig  # noqa: E402

TINY = ModelConfig(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6, attention_bias=True,
                   tie_word_embeddings=True, max_position_embeddings=256, eos_token_id=3)


@pytest.fixture(scope="module")
def workload():
    rng = random.Random(0)
    prompts = [[rng.randint(0, 511) for _ in range(n)] for n in (5, 17, 9, 30, 12, 3)]
    return prompts, [7, 3, 12, 5, 9, 1]


@pytest.fixture(scope="module")
def model():
    return hf_baselines.hf_model(TINY, dtype=torch.float32, device="cpu")


def check_metrics(metrics, prompts, max_tokens):
    assert metrics["num_requests"] == len(prompts)
    assert metrics["prompt_tokens"] == sum(map(len, prompts))
    assert metrics["output_tokens"] == sum(max_tokens)
    assert metrics["wall_s"] > 0 and metrics["output_tok_per_s"] > 0 and isinstance(metrics["engine"], str)
    for key in ("ttft_s", "tpot_s"):
        stats = metrics[key]
        assert stats is not None and 0 < stats["p50"] <= stats["p99"] and stats["mean"] > 0
    assert metrics["ttft_s"]["p99"] <= metrics["wall_s"]


def test_hf_model_shape(model):
    assert model.config._attn_implementation == "sdpa" and not model.training
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v bias
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_static(model, workload):
    prompts, max_tokens = workload
    metrics = hf_baselines.run_hf_static(model, prompts, max_tokens, batch_size=4, temperature=0.6)
    check_metrics(metrics, prompts, max_tokens)
    assert "static batches of 4" in metrics["engine"]


def test_static_step_times(model, workload, monkeypatch):
    """Request i of a batch gets its first token at the batch's first step and its last at step max_tokens_i - 1."""
    steps = []
    real = hf_baselines._generate_batch

    def spy(*args):
        steps.append(real(*args))
        return steps[-1]

    monkeypatch.setattr(hf_baselines, "_generate_batch", spy)
    prompts, max_tokens = workload
    metrics = hf_baselines.run_hf_static(model, prompts, max_tokens, batch_size=4, temperature=0.6)
    assert [len(t) for t in steps] == [4, 12, 9]  # warm-up, then each batch runs to its longest output
    batch1, batch2 = steps[1], steps[2]
    tpots = [(batch1[m - 1] - batch1[0]) / (m - 1) for m in max_tokens[:4]] + [(batch2[8] - batch2[0]) / 8]
    # TTFTs: four requests at batch 1's first step, two at batch 2's (p50 is a batch-1 one, p99 a batch-2 one)
    assert metrics["ttft_s"]["p99"] - metrics["ttft_s"]["p50"] == pytest.approx(batch2[0] - batch1[0])
    assert metrics["tpot_s"]["mean"] == pytest.approx(sum(tpots) / len(tpots))


class AlwaysEOS(torch.nn.Module):
    """An LM head that makes the EOS id 3 (almost) certain, so a run that did not ignore EOS would stop at once."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., 3] += 1e4
        return logits


@pytest.fixture(scope="module")
def eos_model():
    model = hf_baselines.hf_model(TINY, dtype=torch.float32, device="cpu")
    model.lm_head = AlwaysEOS(model.lm_head)
    return model


def test_static_ignores_eos(eos_model, workload):
    prompts, max_tokens = workload
    metrics = hf_baselines.run_hf_static(eos_model, prompts, max_tokens, batch_size=4, temperature=0.6)
    assert metrics["output_tokens"] == sum(max_tokens)  # and run_hf_static checked every batch's length


def run_continuous(model, prompts, max_tokens):
    try:
        # a small cache keeps the CPU set-up quick (the cache's static tensors scale with both numbers)
        return hf_baselines.run_hf_continuous(model, prompts, max_tokens, temperature=0.6,
                                              max_batch_tokens=64, num_blocks=4)
    except RuntimeError as error:
        if "has no" in str(error):  # the API itself is missing from this transformers
            pytest.skip(str(error))
        raise


def test_continuous(model, workload):
    prompts, max_tokens = workload
    metrics = run_continuous(model, prompts, max_tokens)
    check_metrics(metrics, prompts, max_tokens)
    assert model.config._attn_implementation == "sdpa"  # restored for the static baseline


def test_continuous_ignores_eos(eos_model, workload):
    prompts, max_tokens = workload
    metrics = run_continuous(eos_model, prompts, max_tokens)
    assert metrics["output_tokens"] == sum(max_tokens)  # and run_hf_continuous checked every request's length
