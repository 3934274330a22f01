"""The decoder over the paged cache computes what Hugging Face transformers computes.

Tiny random Llama / Qwen2 / Qwen3 checkpoints are built with transformers, saved as safetensors and loaded
with ``load_model``. Weights are re-drawn with std 0.2, norm scales near 1 and non-zero biases: at HF's
default init (std 0.02, unit norms, zero biases) a tiny model repeats its last token and ignores biases and
q/k norms, so a wrong RoPE, head mapping, bias or cache would go unnoticed.

The paged driver below (``PagedDriver``) runs the engine's own ModelRunner without a scheduler, over blocks
handed out in a shuffled order, so block tables are neither contiguous nor ordered; the last test runs the
whole ``LLM`` on the saved checkpoint.
"""
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pagedattention import LLM, SamplingParams
from pagedattention.engine.config import EngineConfig
from pagedattention.engine.model_runner import ModelRunner
from pagedattention.engine.scheduler import ScheduledBatch
from pagedattention.engine.sequence import Sequence
from pagedattention.memory import PagedAttentionManager
from pagedattention.models import AttentionMetadata, ByteTokenizer, load, load_model, tiny_model
from pagedattention.models.llama import rope_inv_freq
from pagedattention.models.tiny import TINY_CONFIG

BASE = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-6,
            max_position_embeddings=512, initializer_range=0.2, bos_token_id=1, eos_token_id=2)

# name -> (transformers class name, config kwargs): together they cover GQA 1/2/3/4, q/k/v bias (Qwen2),
# q/k norm with an explicit head_dim (Qwen3), tied and untied embeddings, and three RoPE variants
CASES = {
    "llama_gqa2": ("Llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mha_tied_llama3_rope": ("Llama", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32))),
    "qwen2_bias_tied_linear_rope": ("Qwen2", dict(
        hidden_size=96, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=1e6, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "qwen3_qknorm_headdim32": ("Qwen3", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)),
    "qwen3_bias": ("Qwen3", dict(
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True)),
}

PROMPT_LENS = (1, 6, 13, 29)


def reinit_(model, seed):
    """Weights ~ N(0, 0.2), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else (0.1 if name.endswith("bias") else 0.2) * noise)


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    """(HF model, our model, config) for one case, our model loaded from the saved checkpoint."""
    transformers = pytest.importorskip("transformers")
    family, kwargs = CASES[request.param]
    hf_config = getattr(transformers, f"{family}Config")(**{**BASE, **kwargs})
    torch.manual_seed(0)
    hf = getattr(transformers, f"{family}ForCausalLM")(hf_config).eval()
    reinit_(hf, seed=sum(map(ord, request.param)))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    model, tokenizer, config = load_model(path, dtype=torch.float32, device="cpu")
    return hf, model, config, path


def prompts(vocab_size, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENS]


class PagedDriver:
    """The engine's own ModelRunner and PagedAttentionManager driving a model step by step, without a scheduler:
    packed prefill (optionally in chunks), then batched decode. Blocks are handed out in a shuffled order, so
    block tables are neither contiguous nor ordered, and the cache is poisoned with NaN: a read of a
    never-written slot shows up in the logits."""

    def __init__(self, model, config, *, block_size=4, num_blocks=96, backend="torch", seed=0):
        dtype = model.model.embed_tokens.weight.dtype
        engine_config = EngineConfig(device="cpu", dtype=dtype, block_size=block_size, attention_backend=backend,
                                     max_model_len=config.max_position_embeddings, enforce_eager=True)
        ops = model.bind_backend(engine_config.attention_backend)
        self.manager = PagedAttentionManager(num_blocks, block_size, config.num_hidden_layers,
                                             config.num_key_value_heads, config.head_dim, dtype, "cpu",
                                             copy_blocks=ops.copy_blocks)
        for cache in self.manager.key_caches + self.manager.value_caches:
            cache.fill_(float("nan"))
        blocks = self.manager.block_manager.allocate(num_blocks)
        random.Random(seed).shuffle(blocks)
        for block in blocks:  # the free list hands blocks out in the order they were freed
            self.manager.block_manager.free([block])
        model.bind_kv_cache(self.manager.key_caches, self.manager.value_caches)
        self.runner = ModelRunner(engine_config, model, self.manager)

    def prefill(self, prompts, chunk_size=None):
        """Sequences for ``prompts``, prefilled; the logits of each prompt's last token (float32)."""
        seqs = [Sequence(p, SamplingParams(temperature=0)) for p in prompts]
        for seq in seqs:
            self.manager.add_sequence(seq.seq_id, len(seq))
        chunk_size = chunk_size or max(map(len, prompts))
        last = [None] * len(seqs)
        for start in range(0, max(map(len, prompts)), chunk_size):
            active = [i for i, p in enumerate(prompts) if len(p) > start]
            for i in active:
                seqs[i].num_computed_tokens = start
                seqs[i].num_scheduled_tokens = min(chunk_size, len(prompts[i]) - start)
            ends = [len(prompts[i]) <= start + chunk_size for i in active]
            logits = self.runner.run(ScheduledBatch([seqs[i] for i in active], True, ends, [], None, [], []))
            for i, row in zip([i for i, e in zip(active, ends) if e], logits):
                last[i] = row
        for seq in seqs:
            seq.num_computed_tokens, seq.num_scheduled_tokens = len(seq), 0
        self.seqs = seqs
        return torch.stack(last)

    def greedy(self, prompts, max_new_tokens, chunk_size=None):
        """Greedy continuations: prefill all prompts (packed, optionally in chunks), then decode together."""
        logits = self.prefill(prompts, chunk_size)
        outputs = [[int(row.argmax())] for row in logits]
        for _ in range(max_new_tokens - 1):
            for seq, out in zip(self.seqs, outputs):
                seq.token_ids.append(out[-1])
                self.manager.append_token(seq.seq_id)
                seq.num_scheduled_tokens = 1
            logits = self.runner.run(ScheduledBatch(self.seqs, False, None, self.seqs, None, [], []))
            for out, row in zip(outputs, logits):
                out.append(int(row.argmax()))
        return outputs


def test_prefill_logits_match_hf(checkpoint):
    hf, model, config, _ = checkpoint
    batch = prompts(config.vocab_size, seed=1)
    logits = PagedDriver(model, config).prefill(batch)  # last-token logits of each prompt
    with torch.no_grad():
        for prompt, row in zip(batch, logits):
            expected = hf(torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(row, expected, atol=1e-4, rtol=1e-4)
            assert row.std() > 0.5  # logits vary: the model is not degenerate


def test_every_prefill_position_matches_hf(checkpoint):
    hf, model, config, _ = checkpoint
    prompt = prompts(config.vocab_size, seed=2)[-1]
    blocks = random.Random(2).sample(range(96), -(-len(prompt) // 4))  # any blocks, in any order
    model.bind_kv_cache(*[[torch.full((96, 4, config.num_key_value_heads, config.head_dim), float("nan"))
                           for _ in range(config.num_hidden_layers)] for _ in range(2)])
    positions = torch.arange(len(prompt))
    slots = [blocks[p // 4] * 4 + p % 4 for p in range(len(prompt))]
    attn = AttentionMetadata(is_prefill=True, slot_mapping=torch.tensor(slots),
                             block_tables=torch.tensor([blocks], dtype=torch.int32),
                             context_lens=torch.tensor([len(prompt)], dtype=torch.int32),
                             cu_seqlens_q=torch.tensor([0, len(prompt)], dtype=torch.int32), max_q_len=len(prompt))
    with torch.no_grad():
        ours = model.compute_logits(model(torch.tensor(prompt), positions, attn))
        expected = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_greedy_decoding_matches_hf_generate(checkpoint, chunk_size):
    hf, model, config, _ = checkpoint
    batch, max_new_tokens = prompts(config.vocab_size, seed=3), 12
    with torch.no_grad():
        ours = PagedDriver(model, config, seed=chunk_size or 0).greedy(batch, max_new_tokens, chunk_size)
        for prompt, out in zip(batch, ours):
            expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            assert out == expected
    assert len({tok for out in ours for tok in out}) > max_new_tokens  # not one repeated token


def test_llm_generate_matches_hf_generate_on_the_saved_checkpoint(checkpoint):
    """The whole engine (loader, scheduler, runner, sampler) on the checkpoint directory, batched and chunked."""
    hf, _, config, path = checkpoint
    batch, max_new_tokens = prompts(config.vocab_size, seed=4), 10
    llm = LLM(str(path), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16)
    outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=max_new_tokens, ignore_eos=True),
                           use_tqdm=False)
    with torch.no_grad():
        for prompt, out in zip(batch, outputs):
            expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            assert out.outputs[0].token_ids == expected


def test_rope_scaling_changes_frequencies():
    from pagedattention.models import ModelConfig

    base = ModelConfig(**TINY_CONFIG)
    linear = ModelConfig(**{**TINY_CONFIG, "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    llama3 = ModelConfig(**{**TINY_CONFIG, "rope_scaling": dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)})
    torch.testing.assert_close(rope_inv_freq(linear), rope_inv_freq(base) / 4)
    ratio = rope_inv_freq(base) / rope_inv_freq(llama3)
    assert ratio[0] == 1 and ratio[-1] == 8  # fastest dim kept, slowest slowed by `factor`
    assert torch.all(ratio[1:] >= ratio[:-1])


# ---- the embedded tiny default ----

def test_tiny_model_is_seeded_and_varied():
    model, tokenizer, config = tiny_model(seed=0)
    again, _, _ = tiny_model(seed=0)
    other, _, _ = tiny_model(seed=1)
    prompt = tokenizer.encode("The quick brown fox")
    with torch.no_grad():
        out = PagedDriver(model, config).greedy([prompt], 16)[0]
        assert PagedDriver(again, config).greedy([prompt], 16)[0] == out
        assert PagedDriver(other, config).greedy([prompt], 16)[0] != out
    assert len(set(out)) > 4
    assert all(0 <= t < config.vocab_size for t in out)


def test_tiny_model_bf16_close_to_fp32():
    batch = [[256, 72, 105, 33, 10, 200, 7]]
    with torch.no_grad():
        logits = {}
        for dtype in (torch.float32, torch.bfloat16):
            model, _, config = load(None, dtype=dtype, device="cpu")
            assert model.model.rotary_emb.inv_freq.dtype == torch.float32
            logits[dtype] = PagedDriver(model, config).prefill(batch)
    assert logits[torch.bfloat16].dtype == torch.bfloat16  # as the LM head computes them; the sampler reads them so
    torch.testing.assert_close(logits[torch.bfloat16].float(), logits[torch.float32], atol=0.15, rtol=0.05)


def test_decode_matches_prefill_of_the_same_tokens():
    """Decode reads its context from the cache: the logits equal a fresh prefill of the whole sequence."""
    model, tokenizer, config = tiny_model()
    prompt = tokenizer.encode("paged attention")
    with torch.no_grad():
        out = PagedDriver(model, config).greedy([prompt], 6)[0]
        logits = PagedDriver(model, config, seed=5).prefill([prompt + out[:-1]])
    assert int(logits[0].argmax()) == out[-1]


@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_specials():
    tok = ByteTokenizer()
    ids = tok.encode("hé") + [tok.eos_token_id, 400]
    assert tok.decode(ids) == "hé"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>hé<eos><unused400>"
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")


# ---- the cache interface ----

def test_bind_kv_cache_rejects_wrong_caches():
    model, _, config = tiny_model()
    shape = (8, 4, config.num_key_value_heads, config.head_dim)
    good = [torch.zeros(shape) for _ in range(config.num_hidden_layers)]
    with pytest.raises(ValueError, match="one key and one value cache per layer"):
        model.bind_kv_cache(good[:1], good[:1])
    with pytest.raises(ValueError, match=r"key_caches\[0\] must be \[num_blocks"):
        model.bind_kv_cache([torch.zeros(8, 4, config.head_dim)] + good[1:], good)
    with pytest.raises(ValueError, match=r"value_caches\[1\] must be torch.float32"):
        model.bind_kv_cache(good, good[:1] + [torch.zeros(shape, dtype=torch.float16)])
    attn = AttentionMetadata(is_prefill=False, slot_mapping=torch.tensor([0]),
                             block_tables=torch.zeros(1, 1, dtype=torch.int32),
                             context_lens=torch.ones(1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="bind_kv_cache"):  # the failed calls bound nothing
        model(torch.tensor([65]), torch.tensor([0]), attn)


def test_unknown_backend_is_rejected():
    model, _, config = tiny_model()
    with pytest.raises(ValueError, match="backend"):
        PagedDriver(model, config, backend="triton").greedy([[256, 65]], 1)


def test_numba_backend_matches_torch_backend():
    """The model on the Numba kernels (simulated on CPU) decodes as on the torch references."""
    kernels = pytest.importorskip("pagedattention.kernels")
    if not all(hasattr(kernels, f) for f in ("write_kv", "paged_attention", "paged_prefill_attention")):
        pytest.skip("the Numba kernels are not in pagedattention.kernels yet")
    model, tokenizer, config = tiny_model()
    prompt = tokenizer.encode("Hi, you")  # 8 tokens: the first decode step opens a second block of 8
    with torch.no_grad():
        expected = PagedDriver(model, config, block_size=8, num_blocks=4).greedy([prompt], 2)
        got = PagedDriver(model, config, block_size=8, num_blocks=4, backend="numba").greedy([prompt], 2)
    assert got == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode-sized GEMM dispatch runs on a GPU")
def test_numba_backend_runs_a_few_rows_on_the_skinny_kernel(monkeypatch):
    """Up to 16 rows of a small projection go to kernels/skinny_gemm.py, more to cuBLAS; both match torch."""
    from pagedattention.kernels import skinny_gemm
    from pagedattention.models.attention import backend_ops

    calls = []
    kernel = skinny_gemm.skinny_gemm
    monkeypatch.setattr(skinny_gemm, "skinny_gemm", lambda *a, **k: calls.append(a[0].shape[0]) or kernel(*a, **k))
    layer = torch.nn.Linear(896, 1152, bias=True).cuda().bfloat16()  # Qwen2.5-0.5B's qkv projection
    for rows in (1, 5, 16, 17, 64):
        x = torch.randn(rows, 896, device="cuda").bfloat16()
        got = backend_ops("numba").linear(layer, x)
        torch.testing.assert_close(got, layer(x), atol=2e-2, rtol=2e-2)
    assert calls == [1, 5, 16]
