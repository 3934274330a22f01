"""Tensor parallelism: two CPU processes over gloo compute what one process and Hugging Face compute.

Tiny random Qwen2 / Llama / Qwen3 checkpoints (odd vocabularies pad the vocab-parallel rows; GQA and MHA) are run
by one engine per tensor_parallel_size, sharing a small KV cache that forces preemption, with prefix caching on and
chunked prefill. The engines live for the whole module: starting the worker process is most of the cost.
"""
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pagedattention import LLM, BeamSearchParams, SamplingParams
from pagedattention.engine.cuda_graphs import CudaGraphs
from pagedattention.engine.distributed import TensorParallelError
from pagedattention.models import CheckpointError, ModelConfig, load, load_model
from pagedattention.models.parallel import TensorParallel
from pagedattention.models.tiny import TINY_CONFIG

transformers = pytest.importorskip("transformers")

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-6, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2)
CASES = {
    "qwen2_gqa_tied_odd_vocab": ("Qwen2", dict(vocab_size=201, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=True)),
    "llama_mha": ("Llama", dict(vocab_size=200, num_attention_heads=4, num_key_value_heads=4,
                                tie_word_embeddings=False)),
    "qwen3_qknorm_odd_vocab": ("Qwen3", dict(vocab_size=203, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=32, tie_word_embeddings=False)),
}
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=14, max_model_len=48,
              max_num_batched_tokens=16, enable_prefix_caching=True, cpu_threads=1)


def tp_children() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("pagedattention-tp")]


def gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def save_hf_checkpoint(name, path):
    family, kwargs = CASES[name]
    torch.manual_seed(0)
    hf = getattr(transformers, f"{family}ForCausalLM")(
        getattr(transformers, f"{family}Config")(**BASE, **kwargs)).eval()
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():  # varied weights: at HF's init a tiny model repeats one token
        for pname, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in pname else (0.1 if pname.endswith("bias") else 0.2) * noise)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (HF model, checkpoint directory)."""
    return {name: (hf, path) for name in CASES
            for path in [tmp_path_factory.mktemp(name)] for hf in [save_hf_checkpoint(name, path)]}


@pytest.fixture(scope="module", params=list(CASES))
def engines(request, checkpoints):
    """(HF model, the engine at tensor_parallel_size 1, the engine at 2) for one checkpoint."""
    hf, path = checkpoints[request.param]
    one, two = LLM(str(path), **ENGINE), LLM(str(path), tensor_parallel_size=2, **ENGINE)
    yield hf, one, two
    two.runner.shutdown()


def prompts(vocab_size, seed):
    """Five prompts, four of them sharing a 9-token prefix (two full blocks: prefix-cache hits)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab_size) for _ in range(9)]
    batch = [prefix + [rng.randrange(3, vocab_size) for _ in range(rng.randrange(1, 9))] for _ in range(4)]
    return batch + [[rng.randrange(3, vocab_size) for _ in range(13)]]


def hf_greedy(hf, prompt, max_new_tokens):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def count_copies(llm):
    """Copy-on-write pairs shipped to the other rank from now on, in a list that grows."""
    recorder, shipped = llm.runner._copies, []
    take = recorder.take

    def counting_take():
        pending = take()
        shipped.extend(pair for pairs in pending for pair in pairs.tolist())
        return pending
    recorder.take = counting_take
    return shipped


# --- one process and two compute the same -----------------------------------------------------------------------

def test_greedy_equals_one_process_and_hf_generate_under_preemption_and_prefix_caching(engines):
    hf, one, two = engines
    batch, max_tokens = prompts(one.model_config.vocab_size, seed=1), 12
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    preemptions, hits = two.num_preemptions, two.stats().prefix_cache_hit_tokens
    got = [o.outputs[0].token_ids for o in two.generate(batch, params, use_tqdm=False)]
    assert got == [o.outputs[0].token_ids for o in one.generate(batch, params, use_tqdm=False)]
    assert got == [hf_greedy(hf, p, max_tokens) for p in batch]
    assert len({t for out in got for t in out}) > max_tokens  # not one repeated token
    assert two.num_preemptions > preemptions and two.stats().prefix_cache_hit_tokens > hits
    assert two.manager.num_blocks == one.manager.num_blocks  # one block layout for every rank


def test_parallel_sampling_forks_copy_on_every_rank(engines):
    _, one, two = engines
    batch = prompts(one.model_config.vocab_size, seed=2)[:3]
    params = [SamplingParams(temperature=1.0, n=3, max_tokens=8, seed=s) for s in range(len(batch))]
    shipped = count_copies(two)
    got = two.generate(batch, params, use_tqdm=False)
    expected = one.generate(batch, params, use_tqdm=False)
    assert shipped  # the children's first appends copied their parent's last block
    for g, e in zip(got, expected):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in e.outputs]
        assert len({tuple(c.token_ids) for c in g.outputs}) > 1


def test_beam_search_equals_one_process(engines):
    _, one, two = engines
    batch = [p[:7] for p in prompts(one.model_config.vocab_size, seed=3)[:2]]
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    shipped = count_copies(two)
    got, expected = two.beam_search(batch, params), one.beam_search(batch, params)
    assert shipped
    for g, e in zip(got, expected):
        assert [b.token_ids for b in g.sequences] == [b.token_ids for b in e.sequences]
        for gb, eb in zip(g.sequences, e.sequences):
            assert gb.cum_logprob == pytest.approx(eb.cum_logprob, abs=1e-4)


# --- loading a shard ----------------------------------------------------------------------------------------------

def test_each_rank_loads_its_heads_features_and_vocabulary_rows(checkpoints):
    """Rank r's weights are the checkpoint's rows (columns) of its heads, MLP features and vocabulary ids."""
    name = "qwen3_qknorm_odd_vocab"
    hf, path = checkpoints[name]
    full = {k: v for k, v in hf.state_dict().items()}
    c = hf.config
    hd, vocab = c.head_dim, c.vocab_size
    per = -(-vocab // 2)
    for rank in range(2):
        model, _, _ = load(str(path), tp=TensorParallel(rank, 2))
        layer, attn = "model.layers.1.", model.model.layers[1].self_attn
        heads = slice(rank * 2 * hd, (rank + 1) * 2 * hd)     # 2 of the 4 query heads
        kv = slice(rank * hd, (rank + 1) * hd)                 # 1 of the 2 KV heads
        expected_qkv = torch.cat([full[layer + "self_attn.q_proj.weight"][heads],
                                  full[layer + "self_attn.k_proj.weight"][kv],
                                  full[layer + "self_attn.v_proj.weight"][kv]])
        assert torch.equal(attn.qkv_proj.weight, expected_qkv)
        assert torch.equal(attn.o_proj.weight, full[layer + "self_attn.o_proj.weight"][:, heads])
        assert torch.equal(attn.q_norm.weight, full[layer + "self_attn.q_norm.weight"])
        features = slice(rank * 48, (rank + 1) * 48)
        mlp = model.model.layers[1].mlp
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat([full[layer + "mlp.gate_proj.weight"][features],
                                                               full[layer + "mlp.up_proj.weight"][features]]))
        assert torch.equal(mlp.down_proj.weight, full[layer + "mlp.down_proj.weight"][:, features])
        ids = slice(rank * per, min(vocab, (rank + 1) * per))
        for ours, theirs in ((model.model.embed_tokens.weight, "model.embed_tokens.weight"),
                             (model.lm_head.weight, "lm_head.weight")):
            owned = ids.stop - ids.start
            assert ours.shape[0] == per and torch.equal(ours[:owned], full[theirs][ids])
            assert not ours[owned:].any()  # the padding row of the last rank


@pytest.mark.parametrize("source", [None, ModelConfig(**{**TINY_CONFIG, "num_attention_heads": 8, "vocab_size": 301})])
def test_every_rank_draws_the_same_random_weights_and_keeps_its_slice(source):
    """The tiny model and a ModelConfig: each rank draws the whole model under the seed, then keeps its slices."""
    seed = random.randrange(2**31)
    whole, _, config = load(source, seed=seed)
    tensors = {name: param[rows] for name, (param, rows) in whole.hf_weight_slots().items()}
    for rank in range(2):
        shard, _, _ = load(source, seed=seed, tp=TensorParallel(rank, 2))
        attn = shard.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (config.num_attention_heads // 2, config.num_key_value_heads // 2)
        for name, (param, rows, *split) in shard.hf_weight_slots().items():
            expected = split[0].take(tensors[name]) if split else tensors[name]
            assert torch.equal(param[rows], expected), name
        assert sum(p.numel() for p in shard.parameters()) < sum(p.numel() for p in whole.parameters())


def test_a_shard_is_checked_against_the_whole_tensor(checkpoints, tmp_path):
    """Rank 0's rows are intact, but the file's q_proj has a head too many: refused with the whole shape."""
    _, path = checkpoints["llama_mha"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = torch.cat([tensors[name], tensors[name][:16]])
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{name}' has shape \[80, 64\], expected \[64, 64\]"):
        load_model(bad, tp=TensorParallel(0, 2))


def test_one_process_builds_no_parallel_layer():
    """tensor_parallel_size 1: plain nn.Linear / nn.Embedding modules, so no collective can run."""
    model, _, _ = load(None)
    kinds = {type(m) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert kinds == {nn.Linear, nn.Embedding}


def test_decode_graphs_run_the_lm_head_only_in_one_process():
    """A shard's LM head computes its vocabulary rows and rank 0 gathers them, outside the graph: only a
    one-process model's decode graphs end with the LM head (into ``logits``)."""
    config = LLM(device="cpu", max_num_seqs=4, max_model_len=64).config
    whole, _, _ = load(None)
    assert CudaGraphs(whole, config).logits.shape == (4, whole.lm_head.out_features)
    for rank in range(2):
        shard, _, _ = load(None, tp=TensorParallel(rank, 2))
        assert CudaGraphs(shard, config).logits is None


# --- configuration ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, error, match", [
    (0, ValueError, "tensor_parallel_size must be >= 1"),
    ("2", TypeError, "tensor_parallel_size must be an int"),
    (4, ValueError, r"tensor_parallel_size=4 must divide the model's num_key_value_heads \(2\)"),
    (3, ValueError, r"tensor_parallel_size=3 must divide the model's num_attention_heads \(4\)"),
])
def test_bad_tensor_parallel_size_is_refused_before_any_process_starts(size, error, match):
    before = tp_children()
    with pytest.raises(error, match=match):
        LLM(device="cpu", tensor_parallel_size=size)
    assert tp_children() == before


# --- failures and shutdown ------------------------------------------------------------------------------------

def test_a_rank_that_raises_while_loading_fails_the_engine_with_its_error(checkpoints, tmp_path):
    """NaN only in rows rank 1 loads: rank 0 loads fine, rank 1's CheckpointError ends the start-up."""
    _, path = checkpoints["qwen2_gqa_tied_odd_vocab"]
    bad = tmp_path / "nan_in_rank_1"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][:, 60:] = float("nan")  # features 48..95 are rank 1's
    save_file(tensors, bad / "model.safetensors")
    before = tp_children()
    with pytest.raises(TensorParallelError, match=r"(?s)tensor-parallel rank 1 exited with code 1:.*down_proj"
                                                  r".*NaN or Inf"):
        LLM(str(bad), tensor_parallel_size=2, **ENGINE)
    assert tp_children() == before


def test_a_rank_killed_mid_step_fails_generate_at_once_and_leaves_no_process():
    llm = LLM(device="cpu", tensor_parallel_size=2, num_kv_blocks=64, max_model_len=1024)
    runner, pids = llm.runner, llm.runner.worker_pids
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    warm = llm.generate(["warm up"], params, use_tqdm=False)[0].outputs[0].token_ids
    alone = LLM(device="cpu", num_kv_blocks=64, max_model_len=1024)
    assert warm == alone.generate(["warm up"], params, use_tqdm=False)[0].outputs[0].token_ids
    execute, calls = runner.local.execute, []

    def kill_rank_1_then_execute(x, eager=False):  # rank 1 has the step: it dies while running it
        calls.append(x)
        if len(calls) == 3:
            os.kill(pids[0], signal.SIGKILL)
        return execute(x, eager=eager)
    runner.local.execute = kill_rank_1_then_execute
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"^tensor-parallel rank 1 exited with code -9$"):
        llm.generate(["hello", "world"], params, use_tqdm=False)
    assert time.monotonic() - start < 10
    assert all(gone(pid) for pid in pids) and not llm.has_unfinished_requests()
    with pytest.raises(TensorParallelError, match="rank 1 exited with code -9"):  # and stays failed
        llm.generate(["again"], params, use_tqdm=False)


def test_workers_stop_when_the_engine_is_collected_and_at_interpreter_exit(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import gc, os
        from pagedattention import LLM, SamplingParams

        if __name__ == "__main__":
            params = SamplingParams(temperature=0, max_tokens=3)
            llm = LLM(device="cpu", tensor_parallel_size=2)
            pids = llm.runner.worker_pids
            llm.generate("collected", params, use_tqdm=False)
            del llm
            gc.collect()
            print("collected", not any(os.path.exists(f"/proc/{pid}") for pid in pids))
            llm = LLM(device="cpu", tensor_parallel_size=2)
            llm.generate("left running", params, use_tqdm=False)
            print("running", *llm.runner.worker_pids, flush=True)  # and exits without a shutdown
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["collected"] == "True"
    assert all(gone(int(pid)) for pid in lines["running"].split())
