"""benchmarks/profile_step.py: kernel names to parts, a step's trace to per-part times, the bounds' arithmetic."""
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import common  # noqa: E402
import profile_step as ps  # noqa: E402
import workloads  # noqa: E402
from pagedattention import models  # noqa: E402
from pagedattention.models import ModelConfig  # noqa: E402

# Kernel names as CUPTI reports them: Numba's (mangled, and demangled), cuBLAS's, and torch's.
NAMES = {
    "_ZN6cudapy14pagedattention7kernels18paged_attention_v215build_v2_kernel12_3clocals_3e6kernelB2v1E5ArrayIiLi1E": "attention",
    "cudapy::pagedattention::kernels::paged_attention_v2::build_merge_kernel::_3clocals_3e::merge_kernel(Array<int>)": "attention",
    "_ZN6cudapy14pagedattention7kernels18paged_attention_tc15build_tc_kernel12_3clocals_3e6kernelB2v3E": "attention",
    "_ZN6cudapy14pagedattention7kernels9layer_ops21_rope_write_kv_kernel12_3clocals_3e6kernelB2v4E": "layer_ops",
    "cudapy::pagedattention::kernels::layer_ops::_add_rms_norm_kernel::_3clocals_3e::kernel[abi:v5](long long)": "layer_ops",
    "_ZN6cudapy14pagedattention7kernels9layer_ops21_silu_and_mul_kernel12_3clocals_3e6kernelB2v6E": "layer_ops",
    "nvjet_tst_128x64_64x8_1x1_v_bz_coopA_TNT": "gemm",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)": "gemm",
    "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false, false>(...)": "gemm",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>(...)": "gemm",
    "void at::native::vectorized_elementwise_kernel<4, at::native::cos_kernel_cuda(at::TensorIteratorBase&)::"
    "{lambda()#2}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul> >(int, ...)": "layer_ops",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, true>(...)": "layer_ops",
    "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>": "other",
    "void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<float, 4, "
    "at::native::templates::cuda::normal_and_transform<float, float>>(...)": "other",
    "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::MulFunctor<float>>>": "other",
    "aten::mm": "gemm", "aten::addmm": "gemm", "aten::rms_norm": "layer_ops", "aten::copy_": "other",
}


@pytest.mark.parametrize("name", NAMES)
def test_kernel_names_go_to_their_part(name):
    assert ps.part_of(name) == NAMES[name]


def kernel(name, ts, dur, cat="kernel", correlation=None):
    event = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}
    if correlation is not None:
        event["args"] = {"correlation": correlation}
    return event


def fake_step(t0, rng, correlations):
    """One decode step as the host launches it and the GPU runs it: the inputs' copy, one graph launch for the
    layers' kernels, then the LM head and sampling launched one by one. The GPU runs behind the host, so the
    last kernels end after the host's step has returned. Returns (events, ms per part, host window)."""
    layer = [("_ZN6cudapy14pagedattention7kernels9layer_ops21_add_rms_norm_kernel", "layer_ops"),
             ("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", "gemm"),
             ("_ZN6cudapy14pagedattention7kernels9layer_ops21_rope_write_kv_kernel", "layer_ops"),
             ("_ZN6cudapy14pagedattention7kernels18paged_attention_v215build_v2_kernel", "attention"),
             ("nvjet_tst_64x8_64x16_4x1_v_bz_TNN", "gemm"),
             ("void at::native::elementwise_kernel<128, 2, MulFunctor<float>>", "other")]
    launches = ([("cudaMemcpyAsync", [("Memcpy HtoD (Pinned -> Device)", "copies")]), ("cudaGraphLaunch", layer * 3)]
                + [("cudaLaunchKernel", [k]) for k in [("void gemv2T_kernel_val<int, int, __nv_bfloat16>", "lm_head"),
                                                      ("void at::native::vectorized_elementwise_kernel<4, copy>", "sampling"),
                                                      ("void at::native::cunn_SoftMaxForward<4, float>", "sampling")]]
                + [("cudaMemcpyAsync", [("Memcpy DtoH (Device -> Pinned)", "copies")])])
    events, expected, host, gpu = [], dict.fromkeys(ps.PARTS, 0.0), t0, t0 + 5
    for api, kernels in launches:
        correlation = next(correlations)
        events.append(kernel(api, host, 2.0, "cuda_runtime", correlation))
        gpu = max(gpu, host + 3)
        for name, part in kernels:
            dur = rng.uniform(1, 20)
            events.append(kernel(name, gpu, dur, "gpu_memcpy" if name.startswith("Memcpy") else "kernel", correlation))
            expected[part] += dur
            gpu += dur + rng.uniform(0, 3)
        host += 4
    return events, expected, (t0, host + 1)


def test_a_traced_step_splits_into_its_parts():
    rng, correlations = random.Random(7), iter(range(1000, 2000))
    trace, expected, t = [], [], 100.0
    for _ in range(3):
        events, parts, (start, end) = fake_step(t, rng, correlations)
        trace += [*events, {"ph": "X", "cat": "user_annotation", "name": ps.STEP_LABEL, "ts": start, "dur": end - start}]
        expected.append(parts)
        t = max(e["ts"] + e["dur"] for e in events) + rng.choice([-30, 20])  # the next step may start first
    trace.append(kernel("a kernel launched between steps", t - 1, 1.0, correlation=5))
    rng.shuffle(trace)
    windows = ps.step_windows(trace)
    steps, outside = ps.split_steps(windows, ps.device_events(trace), ps.launch_times(trace))
    assert len(steps) == 3 and outside == 1
    for step, parts in zip(steps, expected):
        got, others, kernels = ps.classify_step(step)
        assert got == pytest.approx(parts)
        assert set(others) == {"void at::native::elementwise_kernel<128, 2, MulFunctor<float>>"}
        # the per-kernel table adds up to the parts and counts every event once
        per_part = {}
        for part, calls, us in kernels.values():
            per_part[part] = per_part.get(part, 0.0) + us
        assert per_part == pytest.approx({k: v for k, v in parts.items() if v})
        assert sum(calls for _, calls, _ in kernels.values()) == len(step)


def test_idle_inside_graphs_is_the_gaps_between_the_kernels_of_each_replay():
    """The kernels of one graph replay share their launch's correlation id: the time between them counts (an
    overlap of two counts once); time between replays, and around copies or lone launches, does not."""
    def ev(ts, dur, correlation):
        return kernel("k", ts, dur, correlation=correlation)

    step_1 = [ev(0, 10, 1), ev(12, 5, 1), ev(15, 4, 1),     # replay 1: span 0-19, busy 17 -> 2
              ev(30, 3, 2),                                 # a lone launch
              ev(40, 5, 3), ev(50, 5, 3)]                   # replay 3: span 40-55, busy 10 -> 5
    step_2 = [ev(100, 4, 4), ev(106, 4, 4), kernel("copy", 120, 1, cat="gpu_memcpy")]  # -> 2
    assert ps.graph_gaps([step_1, step_2]) == pytest.approx((2 + 5 + 2) / 2 / 1e3)
    assert ps.busy_union(step_1[:3]) == 17
    assert ps.graph_gaps([]) == 0


def test_short_kernel_names():
    assert ps.short_name("cudapy::pagedattention::kernels::layer_ops::_add_rms_norm_kernel::_3clocals_3e::kernel"
                         "(long long, long long)") == "layer_ops::_add_rms_norm_kernel::kernel"
    assert (ps.short_name("pagedattention::kernels::sampling::_kernels::<locals>::partial")
            == "sampling::_kernels::partial")
    assert ps.short_name("nvjet_sm90_tst_128x8_64x12_4x1_v_bz_TNT") == "nvjet_sm90_tst_128x8_64x12_4x1_v_bz_TNT"


def test_a_cpu_trace_counts_each_op_by_its_self_time():
    ops = [{"cat": "cpu_op", "name": "aten::linear", "ts": 0.0, "dur": 10.0, "tid": 1},
           {"cat": "cpu_op", "name": "aten::t", "ts": 1.0, "dur": 1.0, "tid": 1},
           {"cat": "cpu_op", "name": "aten::addmm", "ts": 3.0, "dur": 6.0, "tid": 1},
           {"cat": "cpu_op", "name": "aten::resolve_conj", "ts": 4.0, "dur": 0.5, "tid": 1},
           {"cat": "cpu_op", "name": "aten::mul", "ts": 12.0, "dur": 2.0, "tid": 1}]
    self_times = {e["name"]: e["dur"] for e in ps.device_events(ops)}
    assert self_times == pytest.approx({"aten::linear": 3.0, "aten::t": 1.0, "aten::addmm": 5.5,
                                        "aten::resolve_conj": 0.5, "aten::mul": 2.0})


SHAPES = [ModelConfig(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True,
                      tie_word_embeddings=True),
          ModelConfig(model_type="qwen3", vocab_size=80, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=3, head_dim=8, qk_norm=True),
          ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=8)]


@pytest.mark.parametrize("mc", SHAPES, ids=["qwen2-tied", "qwen3", "llama-untied"])
def test_parameter_counts_match_a_built_model(mc):
    model, _, _ = models.load(mc, dtype=torch.float32, device="cpu")
    params = list(model.parameters())
    assert common.num_params(mc) == sum(p.numel() for p in params)
    embed = model.model.embed_tokens.weight.numel()
    read = sum(p.numel() for p in params) - (0 if mc.tie_word_embeddings else embed)
    assert common.weight_bytes(mc, 2) == 2 * read


def test_projection_flops_match_torchs_flop_counter():
    mc = SHAPES[1]  # no biases: the counter counts only the matrix products
    model, _, _ = models.load(mc, dtype=torch.float32, device="cpu")
    tokens = 5
    with FlopCounterMode(display=False) as counter:
        for layer in model.model.layers:
            layer.self_attn.qkv_proj(torch.randn(tokens, mc.hidden_size))
            layer.self_attn.o_proj(torch.randn(tokens, mc.num_attention_heads * mc.head_dim))
            layer.mlp.gate_up_proj(torch.randn(tokens, mc.hidden_size))
            layer.mlp.down_proj(torch.randn(tokens, mc.intermediate_size))
    assert counter.get_total_flops() == 2 * tokens * mc.num_hidden_layers * common.layer_linear_params(mc)


def test_kv_bytes_per_token_match_the_engines_cache():
    from pagedattention import LLM
    llm = LLM(None, device="cpu", num_kv_blocks=8, block_size=4, max_num_seqs=2, max_model_len=32)
    assert llm.manager.bytes_per_block == 4 * common.kv_bytes_per_token(llm.model_config, 4)


def test_workload_bound_matches_a_step_by_step_count():
    rng = random.Random(3)
    prompts = [[0] * rng.randint(1, 30) for _ in range(9)]
    w = workloads.Workload("X", prompts, [rng.randint(1, 12) for _ in prompts], "test")
    mc, d, bw, rate = SHAPES[0], 2, 1e9, 1e11
    bound = ps.workload_bound(mc, w, d, bw, rate, cap=len(prompts))
    # every request runs from the start; at decode step s each unfinished one reads its prompt + s tokens
    steps, kv_tokens = 0, 0
    while any(o - 1 > steps for o in w.output_lens):
        steps += 1
        kv_tokens += sum(len(p) + steps for p, o in zip(prompts, w.output_lens) if o - 1 >= steps)
    assert bound["decode_steps"] == steps and bound["kv_tokens_read"] == kv_tokens
    seconds = (steps * common.weight_bytes(mc, d) + kv_tokens * common.kv_bytes_per_token(mc, d)) / bw \
        + sum(common.prefill_flops(mc, len(p)) for p in prompts) / rate
    assert bound["seconds"] == pytest.approx(seconds)
    assert bound["output_tok_per_s"] == pytest.approx(sum(w.output_lens) / seconds)


def test_tiny_profile_end_to_end(tmp_path, capsys):
    assert ps.main(["--tiny", "--batches", "1,3", "--context", "12", "--steps", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "profile_cpu_tiny.json").read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 3]
    for r in report["rows"]:
        assert r["steps_traced"] == 2 and r["ran_whole"]
        assert sum(r["parts_ms"].values()) == pytest.approx(r["device_busy_ms"])
        assert r["parts_ms"]["lm_head"] > 0 and r["parts_ms"]["sampling"] > 0
        assert set(r["bounds_ms"]) == {"attention", "gemm", "layer_ops", "lm_head", "sampling"}
        assert r["device_idle_fraction"] < 1 and r["wall_ms"] > 0
        assert r["device_idle_inside_graphs_fraction"] == 0  # (no graphs on the CPU)
        assert r["device_idle_waiting_fraction"] == pytest.approx(r["device_idle_fraction"])
        assert r["host_wait_ms"] == 0  # on the CPU nothing runs asynchronously: the host never waits
        phases = r["host_phases_ms"]  # every phase of a decode step ran (those of the GPU's path: none)
        assert all(phases[name] > 0 for name in ps.HOST_PHASES if name not in ps.GPU_PHASES)
        assert all(phases[name] == 0 for name in ps.GPU_PHASES)
        # each phase without the timed calls inside it: together less than the step (nothing counted twice)
        assert sum(phases[name] for name in ps.HOST_PHASES) < phases["llm.step"]
    assert 0 < report["w2_fraction_of_bound"] < 1
    out = capsys.readouterr().out
    assert "unclassified" in out and "W2 bound on cpu" in out


def test_host_phases_leave_out_the_timed_calls_inside_them(monkeypatch):
    """A wait inside ``execute`` counts as waiting, not as execute; every method is restored afterwards."""
    from pagedattention.engine.model_runner import ModelRunner

    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda event: time.sleep(0.05))

    def execute(runner, x, eager=False):
        time.sleep(0.01)
        torch.cuda.Event.synchronize(object())
    monkeypatch.setattr(ModelRunner, "execute", execute)
    before = {(owner, name): owner.__dict__.get(name) for methods in ps.HOST_PHASES.values() for owner, name in methods}
    with ps.host_phase_timers() as seconds:
        for _ in range(3):
            ModelRunner.execute(None, None)
    assert 0.15 <= seconds["waiting for the GPU"] < 1.0
    assert 0.03 <= seconds["execute (rest)"] < 0.12  # with the waits it would be 0.18 or more
    assert seconds["schedule"] == seconds["postprocess"] == 0
    assert all(owner.__dict__.get(name) is method for (owner, name), method in before.items())


def test_host_phases_time_a_method_inherited_from_a_base_class_and_leave_it_inherited(monkeypatch):
    """The graph replay's method may be the C base class's: it is timed, then the subclass holds nothing again."""
    class Base:
        def replay(self):
            time.sleep(0.01)

    class Graph(Base):
        pass

    monkeypatch.setitem(ps.HOST_PHASES, "graph replay", [(Graph, "replay")])
    with ps.host_phase_timers() as seconds:
        Graph().replay()
    assert 0.01 <= seconds["graph replay"] < 0.1 and "replay" not in Graph.__dict__


def test_prefill_bounds_count_the_prefill_flops():
    """At an unbounded copy rate and 1 FLOP/s, the GEMM, attention and LM-head bounds (seconds) are FLOPs and
    add up to ``common.prefill_flops`` of the step's prompts."""
    import profile_prefill

    mc, lens = common.model_shape("qwen2.5-0.5b"), [100, 37, 512, 1]
    bounds = profile_prefill.prefill_bounds(mc, lens, 2, copy_bw=1e30, rate=1.0)
    flops = sum(common.prefill_flops(mc, n) for n in lens)
    assert bounds["gemm"] + bounds["attention"] + bounds["lm_head"] == pytest.approx(flops, rel=1e-12)
    assert bounds["layer_ops"] < 1e-15   # bytes only


def test_tiny_prefill_profile_end_to_end(tmp_path):
    import profile_prefill

    assert profile_prefill.main(["--tiny", "--steps", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "profile_prefill_cpu_tiny.json").read_text())
    assert [k["kind"] for k in report["kinds"]] == list(profile_prefill.KINDS)
    for kind in report["kinds"]:
        (step,) = kind["steps"]
        low, high = kind["prompt_lens"]
        assert low * step["sequences"] <= step["tokens"] <= report["tokens_per_step"]
        assert step["parts_ms"]["gemm"] > 0 and step["parts_ms"]["attention"] > 0
        assert 0 <= step["device_idle_in_span"] < 1 and step["host_step_ms"] > 0
        assert len(kind["untraced_step_ms"]) == 1 and kind["untraced_step_ms"][0] > 0
        assert 0 < kind["untraced_step_returned_ms"][0] <= kind["untraced_step_ms"][0]
        # the cProfile'd step: functions by their own time, each within its time including callees
        functions = kind["host_functions"]
        assert functions and [f[2] for f in functions] == sorted((f[2] for f in functions), reverse=True)
        assert all(0 <= ms <= cumulative + 1e-9 and calls >= 1 for _, calls, ms, cumulative in functions)
        assert all(step["bounds_ms"][k] > 0 for k in ("gemm", "attention", "layer_ops", "lm_head"))
