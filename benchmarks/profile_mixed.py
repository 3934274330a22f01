"""What admitting prompts into a decode batch costs: a mixed step's GPU time per part next to a plain decode step's.

    python benchmarks/profile_mixed.py            # GPU: Qwen2.5-0.5B shape, 250 decoding sequences + W3's prompts
    python benchmarks/profile_mixed.py --tiny     # CPU smoke run of the same pipeline

W3's continuous run (2,048 requests at 256 seats) spends most of its first ~4 s in full batches that admit a few
prompts every few steps: ~400 mixed steps (a decode batch of ~250 rows plus ~4.5 prompts, ~1,000 tokens, in one
CUDA graph), and the run's timeline puts a mixed step at ~2.3 ms more than a decode step, 3.1-3.5 µs a prompt token,
about twice what an 8k-token prefill step takes a token. This splits that difference by part.

``--batch`` requests of ~``--context`` prompt tokens are prefilled until they decode together, with
``--prompts`` seats left free. Then, ``--steps`` times: a plain decode step, and a mixed step that admits
``--prompts`` prompts drawn from W3's own (the largest prompt part that fits the engine's largest mixed step),
whose requests are aborted after it. The engine overlaps steps (it launches step t + 1 before it finishes t), so
a step's device work is the kernels, copies and graph launches made inside the ``llm.step()`` call that launched
it (correlation ids, as profile_step.py does). Reported per part (profile_step's parts): ms in a decode step and
in a mixed step (medians), the difference, and the prompt part's own bound (profile_prefill.prefill_bounds: the
prompts' GEMM FLOPs and causal attention at the measured GEMM rate, their layer ops at the copy bandwidth), with
the prompt tokens and the tokens of the mixed graph they were padded to; then each kind's span on the device (first
event to last) and its idle in two: the gaps between a graph's kernels, and the device waiting for the step's next
launch (a host slow between the graph and the eager work after it). JSON: results/profile_mixed_<card>.json.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import workloads  # noqa: E402
from profile_prefill import prefill_bounds  # noqa: E402
from profile_step import (PARTS, STEP_LABEL, classify_step, device_events, graph_gaps, launch_times,  # noqa: E402
                          load_trace, measured_rates, span_of, split_steps, start_decoding, step_windows)
from pagedattention import LLM, SamplingParams  # noqa: E402


def pick_prompts(prompts: list[list[int]], count: int, max_tokens: int, rng: random.Random) -> list[list[int]]:
    """``count`` of ``prompts`` whose lengths add up to at most ``max_tokens`` (fewer when no such set is drawn)."""
    short = [p for p in prompts if len(p) <= max_tokens]
    count = min(count, len(short))
    for _ in range(100):
        chosen = rng.sample(short, count)
        if sum(map(len, chosen)) <= max_tokens:
            return chosen
    return pick_prompts(prompts, count - 1, max_tokens, rng) if count > 1 else [min(short, key=len)]


def padded_tokens(llm: LLM, num_decode: int, lens: list[int]) -> int | None:
    """Tokens of the mixed graph that takes ``num_decode`` decode rows and prompts of ``lens`` (None: no graphs)."""
    graphs = getattr(llm.stepper.runner, "graphs", None)
    if graphs is None:
        return None
    bucket = next((b for b in graphs.mixed_buckets if b.num_decode >= num_decode
                   and b.num_tokens - b.num_decode >= sum(lens) and b.num_seqs - b.num_decode >= len(lens)), None)
    return bucket and bucket.num_tokens


def traced_pairs(llm: LLM, pool: list[list[int]], count: int, limit: int, pairs: int, rng: random.Random):
    """``pairs`` times a decode step, then a mixed step admitting ``count`` prompts of ``pool``: the trace, the
    kind each traced ``llm.step()`` call launched, and the prompt lengths of each mixed step."""
    on_gpu = llm.config.device.type == "cuda"
    params = SamplingParams(max_tokens=4, ignore_eos=True, output_kind="final_only")
    kinds, prompt_lens = [], []
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for _ in range(pairs):
            with record_function(STEP_LABEL):
                llm.step()
            kinds.append(llm.last_step.kind)
            chosen = pick_prompts(pool, count, limit, rng)
            ids = [llm.add_request(p, params) for p in chosen]
            with record_function(STEP_LABEL):
                llm.step()
            kinds.append(llm.last_step.kind)
            prompt_lens.append([len(p) for p in chosen])
            llm.step()  # finishes the mixed step (untraced: it launches the next decode step)
            for request_id in ids:
                llm.abort_request(request_id)
            llm.step()  # the batch is back to its decoding sequences
        if on_gpu:
            torch.cuda.synchronize()
    return load_trace(prof), kinds, prompt_lens


def profile_mixed(llm: LLM, batch: int, context: int, count: int, pairs: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    mc, dtype_bytes = llm.model_config, llm.config.dtype.itemsize
    limit = llm.stepper.runner.mixed_prompt_limit or (llm.config.max_num_batched_tokens - batch, count)
    count = min(count, limit[1])
    pool = workloads.make_workload("W3", tiny=llm.config.device.type != "cuda", vocab_size=mc.vocab_size).prompts
    ids = start_decoding(llm, batch, context, max_tokens=10_000, temperature=0.6, seed=seed)
    traced_pairs(llm, pool, count, limit[0], 1, rng)  # compiles and captures what the shapes need
    trace, kinds, prompt_lens = traced_pairs(llm, pool, count, limit[0], pairs, rng)
    for request_id in ids:
        llm.abort_request(request_id)
    while llm.has_unfinished_requests():
        llm.step()
    per_step, _ = split_steps(step_windows(trace), device_events(trace), launch_times(trace))
    by_kind, spans = {"decode": [], "mixed": []}, {"decode": [], "mixed": []}
    for kind, events in zip(kinds, per_step):
        if kind in by_kind and events:
            by_kind[kind].append(classify_step(events)[0])
            spans[kind].append((span_of(events) / 1e3, graph_gaps([events])))
    if not by_kind["mixed"]:
        raise RuntimeError(f"no traced step admitted the prompts (kinds {kinds}): are seats and tokens free?")
    median = {kind: {p: statistics.median(s[p] for s in steps) / 1e3 for p in PARTS}
              for kind, steps in by_kind.items() if steps}
    _, copy_bw, rate = measured_rates(llm)
    lens = sorted(prompt_lens, key=sum)[len(prompt_lens) // 2]  # the prompts of the median step
    bounds = prefill_bounds(mc, lens, dtype_bytes, copy_bw, rate)
    return {"batch": batch, "context": context, "prompts": count, "pairs": pairs, "kinds_traced": kinds,
            "prompt_lens": prompt_lens, "median_prompt_lens": lens,
            "padded_tokens": padded_tokens(llm, batch, lens), "copy_tbps": copy_bw / 1e12,
            "matmul_tflops": rate / 1e12, "decode_ms": median.get("decode"), "mixed_ms": median["mixed"],
            # a step's device time from its first event's start to its last one's end, and the gaps in it between
            # the kernels of a graph replay (medians); the rest of the span less the parts: waiting for the host
            "span_ms": {k: statistics.median(s for s, _ in v) for k, v in spans.items() if v},
            "inside_graphs_ms": {k: statistics.median(g for _, g in v) for k, v in spans.items() if v},
            "prompt_bound_ms": {k: 1e3 * v for k, v in bounds.items()}}


def print_report(r: dict, label: str) -> None:
    decode, mixed, bound = r["decode_ms"] or dict.fromkeys(PARTS, 0.0), r["mixed_ms"], r["prompt_bound_ms"]
    tokens = sum(r["median_prompt_lens"])
    print(f"\n{label}: {r['batch']} decoding sequences (~{r['context']} prompt tokens each); a mixed step admits "
          f"{len(r['median_prompt_lens'])} prompts, {tokens} tokens (median step), padded to "
          f"{r['padded_tokens']} graph tokens; medians of {r['pairs']} steps of each kind, ms")
    print(f"{'part':<11}{'decode':>9}{'mixed':>9}{'mixed-dec':>11}{'prompts bound':>15}")
    for part in PARTS:
        extra = mixed[part] - decode[part]
        print(f"{part:<11}{decode[part]:9.3f}{mixed[part]:9.3f}{extra:11.3f}" +
              (f"{bound[part]:15.3f}" if part in bound else ""))
    total = sum(mixed.values()) - sum(decode.values())
    print(f"{'all':<11}{sum(decode.values()):9.3f}{sum(mixed.values()):9.3f}{total:11.3f}{sum(bound.values()):15.3f}"
          f"   ({1e3 * total / max(tokens, 1):.2f} µs a prompt token)")
    span, gaps = r["span_ms"], r["inside_graphs_ms"]
    rows = {"span": span, "graph gaps": gaps,
            "waiting": {k: span[k] - gaps[k] - sum((decode if k == "decode" else mixed).values()) for k in span}}
    for name, cells in rows.items():  # the device's time around the parts: the span, and its idle in two
        d, m = cells.get("decode", 0.0), cells.get("mixed", 0.0)
        print(f"{name:<11}{d:9.3f}{m:9.3f}{m - d:11.3f}")
    print("(span: first to last event of the step; graph gaps: between a replay's kernels; waiting: the rest of the "
          "span, the device idle between the step's launches)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="embedded tiny model on the CPU (a smoke run)")
    parser.add_argument("--model-shape", choices=list(common.MODEL_SHAPES), default=common.DEFAULT_SHAPE)
    parser.add_argument("--batch", type=int, default=None, help="decoding sequences (default 250; 6 with --tiny)")
    parser.add_argument("--context", type=int, default=None, help="their prompt tokens (default 370; 24 tiny)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts a mixed step admits (default 5; 2 tiny)")
    parser.add_argument("--steps", type=int, default=5, help="traced steps of each kind")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    batch = args.batch or (6 if args.tiny else 250)
    count = args.prompts or (2 if args.tiny else 5)
    llm = LLM(None if args.tiny else common.model_shape(args.model_shape), device=device,
              max_num_seqs=batch + count, max_model_len=256 if args.tiny else 2048,
              cpu_threads=common.cpu_threads(args.tiny) if device == "cpu" else None)
    report = profile_mixed(llm, batch, args.context or (24 if args.tiny else 370), count, args.steps)
    card = common.card_name(device)
    shape = None if args.tiny else args.model_shape
    print_report(report, f"{card}, {common.model_description(shape)}")
    path = common.write_json(args.out / f"profile_mixed_{common.result_tag(card, args.tiny, shape)}.json",
                             {**common.run_info(device), "model": common.model_description(shape), **report})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
