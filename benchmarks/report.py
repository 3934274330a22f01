"""Markdown tables from the benchmark results: every ``benchmarks/results/*.json``, with its card, date and command.

    python benchmarks/report.py                      # print the tables
    python benchmarks/report.py --readme README.md   # rewrite the README's Results section in place

Each result file is one JSON object. The files of known scripts (kernels_*, prefill_*, throughput_*,
sharing_*, the memory demo) get tables of their headline columns; any other file, or one whose keys have
changed, gets its rows as they are: each list of objects it holds (nested objects flattened to "a b"
columns), else its nested objects of numbers (one row each, named by path), else one row of its numbers.
The card, date and command come from the keys named in META, whichever a script used.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
META = {
    "card": ("card", "gpu", "device_name", "device"),
    "date": ("date", "timestamp", "time", "created"),
    "command": ("command", "cmd", "argv"),
}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# Section titles by the file name's first word, in the order the README shows them.
TITLES = {"demo": "Memory: one system prompt, many requests", "kernels": "Decode attention kernels",
          "prefill": "Paged prefill kernel", "throughput": "Engine throughput: continuous vs static batching",
          "profile": "Decode step profile: GPU time per part against its bound",
          "profile_prefill": "Prefill step profile: GPU time per part against its bound",
          "sharing": "Sharing: parallel sampling, beam search, prefix caching",
          "host": "Engine host time per decode step",
          "hostload": "Engine host time over a request set, the model replaced",
          "gemm": "Decode GEMMs: the skinny tensor-core kernel against cuBLAS",
          "rope_decode": "RoPE + cache write inside the decode kernel, or launched before it",
          "sampling": "Sampling kernel: one launch over the LM head's logits",
          "serving": "Serving: W3 over HTTP",
          "step_mix": "A request set's decode steps by rows (its schedule replayed on the CPU), its mixed steps' cost"}
MAX_COLUMNS = 14  # wider tables do not read on a page; the JSON keeps everything


# --- formatting ----------------------------------------------------------------------------------------

def is_scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return ""
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3e}" if value != 0 and abs(value) < 1e-3 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if is_scalar(v) and k not in columns]
    columns = columns[:MAX_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --- the known scripts' headline columns ---------------------------------------------------------------

def kernel_rows(data: dict) -> list[dict]:
    """bench_kernels.py: decode attention per shape; bandwidth as a share of the card's copy roofline."""
    rows = []
    for r in data["rows"]:
        v2, v1 = r["v2"], r["v1"]
        gather, sdpa = r["torch_gather_sdpa"], r["torch_sdpa_contiguous"]
        rows.append({
            "batch": r["batch"], "context": r["ctx"], "heads q/kv": f"{r['num_heads']}/{r['num_kv_heads']}",
            "head_dim": r["head_dim"], "block": r["block_size"], "dtype": str(r["dtype"]).replace("torch.", ""),
            "V2 ms": v2["ms"], "V2 TB/s": v2["tbps"], "V2 % of copy": v2["pct_copy"], "V1 ms": v1["ms"],
            "gather+SDPA ms": gather["ms"], "SDPA contiguous ms": sdpa["ms"],
            "V2 vs gather+SDPA": f"{gather['ms'] / v2['ms']:.2f}x", "V2 vs SDPA": f"{sdpa['ms'] / v2['ms']:.2f}x",
        })
    return rows


def prefill_rows(data: dict) -> list[dict]:
    """bench_prefill.py: causal TFLOP/s of the paged prefill kernel against torch SDPA (flash) in the same run;
    only the configuration the kernel runs by default when the file also holds tuning variants."""
    rows = [r for r in data["rows"] if r.get("default", True)]
    return [{"shape": r["shape"], "workload": r["workload"], "dtype": r["dtype"],
             "paged ms": r["paged_ms"], "SDPA ms": r["sdpa_ms"], "paged TFLOP/s": r["paged_tflops"],
             "paged TFLOP/s in a CUDA graph": r.get("paged_graph_tflops"), "SDPA TFLOP/s": r["sdpa_tflops"],
             "paged / SDPA": r["ratio"]} for r in rows]


def throughput_rows(data: dict) -> list[dict]:
    """benchmark_throughput.py: one row per (workload, scheduling, batch cap); Hugging Face rows have no step
    counts, and a baseline that failed shows its error."""
    rows = []
    for r in data["results"]:
        row = {"workload": r["workload"], "scheduling": r["scheduling"], "max_num_seqs": r["max_num_seqs"]}
        if "error" in r:
            rows.append({**row, "requests/s": r["error"]})
            continue
        ttft, tpot = r.get("ttft_s") or {}, r.get("tpot_s") or {}
        rows.append({**row, "requests/s": r["requests_per_s"], "output tok/s": r["output_tok_per_s"],
                     "total tok/s": r["total_tok_per_s"], "TTFT mean s": ttft.get("mean"), "TTFT p99 s": ttft.get("p99"),
                     "TPOT mean ms": 1e3 * tpot["mean"] if tpot else None,
                     "TPOT p99 ms": 1e3 * tpot["p99"] if tpot else None, "mean running": r.get("mean_running"),
                     "decode steps": r.get("decode_steps"), "mixed steps": r.get("mixed_steps"),
                     "prefill steps": r.get("prefill_steps"),
                     "preemptions": r.get("preemptions")})
    return rows


def profile_tables(data: dict) -> list[tuple[str, list[dict]]]:
    """profile_step.py: ms per decode step of each part, measured / bound, per batch size; then W2's bound."""
    rows = []
    for r in data["rows"]:
        row = {"batch": r["batch"], "context": round(r["context_mean"]), "llm.step() ms": r["wall_ms"],
               "GPU busy ms": r["device_busy_ms"], "GPU idle": f"{r['device_idle_fraction']:.0%}",
               "step bound ms": r["step_bound_ms"]}
        if "device_idle_waiting_fraction" in r:  # (older profiles lack the split)
            row["GPU idle waiting for the host"] = f"{r['device_idle_waiting_fraction']:.0%}"
        if "host_wait_ms" in r:  # profiles from before it was measured lack it
            row["host waits for GPU ms"] = r["host_wait_ms"]
        rows.append(row | measured_over_bound(r["parts_ms"], r["bounds_ms"]))
    b = data["w2_bound"]
    bound = [{"decode steps": b["decode_steps"], "mean batch": b["mean_batch"], "weights s": b["weights_s"],
              "KV s": b["kv_s"], "prefill s": b["prefill_s"], "bound s": b["seconds"],
              "bound output tok/s": b["output_tok_per_s"], "W2 measured tok/s": data.get("w2_output_tok_per_s"),
              "fraction of bound": data.get("w2_fraction_of_bound")}]
    return [("ms per step, measured / bound", rows), ("W2's physical bound", bound)]


def measured_over_bound(parts_ms: dict, bounds_ms: dict) -> dict:
    """A profile row's cells: each part's ms, and " / its bound" where it has one."""
    return {part: f"{ms:.3f}" + (f" / {bounds_ms[part]:.3f}" if part in bounds_ms else "")
            for part, ms in parts_ms.items()}


def prefill_profile_rows(data: dict) -> list[dict]:
    """profile_prefill.py: ms of each traced prefill step per part, measured / bound, and the kind's untraced steps
    (the median; runs from before they were timed show none)."""
    rows = []
    for kind in data["kinds"]:
        untraced = kind.get("untraced_step_ms")
        for r in kind["steps"]:
            row = {"prompts": f"{kind['kind']} U{kind['prompt_lens']}", "tokens": r["tokens"],
                   "sequences": r["sequences"], "GPU busy ms": sum(r["parts_ms"].values()),
                   "llm.step() ms, traced": r["host_step_ms"]}
            if untraced:
                row["llm.step() ms, untraced (median)"] = statistics.median(untraced)
            rows.append(row | measured_over_bound(r["parts_ms"], r["bounds_ms"]))
    return rows


def memory_demo_rows(data: dict) -> list[dict]:
    """examples/demo_memory.py: naive copies vs the measured peak with sharing."""
    row = {
        "requests": data["num_requests"], "prompt": data["prompt_len"], "answer": data["answer_len"],
        "block": data["block_size"], "sharing": data["mode"], "model": data["model"],
        "naive GB": data["naive_bytes"] / 1e9, "paged GB": data["paged_bytes"] / 1e9,
        "saved": f"{data['saved_fraction']:.1%}",
        "utilization at peak": f"{data['stats_at_peak']['utilization']:.1%}",
    }
    if "unshared_bytes" in data:
        row["measured unshared GB"] = data["unshared_bytes"] / 1e9
    return [row]


def sharing_tables(data: dict) -> list[tuple[str, list[dict]]]:
    """bench_sharing.py: KV memory held with fork/copy-on-write vs private copies, then prefix caching."""
    sharing = [{"workload": r["workload"], "sharing": r["sharing"], "n / beam width": r["n"],
                "KV memory saved %": r["kv_memory_saving_pct"], "peak blocks held": r["peak_blocks_held"],
                "peak blocks unshared": r["peak_blocks_unshared"], "requests/s": r["requests_per_s"],
                "output tok/s": r["output_tok_per_s"], "preemptions": r.get("preemptions")} for r in data["sharing"]]
    caching = [{"workload": r["workload"], "prefix caching": r["prefix_caching"], "requests": r["num_requests"],
                "system prompt tokens": r["system_prompt_tokens"], "TTFT mean s": r["ttft_mean_s"],
                "TTFT p99 s": r["ttft_p99_s"], "output tok/s": r["output_tok_per_s"],
                "total tok/s": r["total_tok_per_s"], "hit rate": r["prefix_cache_hit_rate"]}
               for r in data["prefix_caching"]]
    return [("parallel sampling and beam search", sharing), ("prefix caching", caching)]


def step_mix_tables(data: dict) -> list[tuple[str | None, list[dict]]]:
    """Decode steps per band of rows, continuous beside static; then the full batches' cost from a GPU timeline."""
    runs = data["runs"]
    bands = zip(*(runs[s]["decode_bands"] for s in ("continuous", "static")))
    rows = [{"rows": f"{c['rows'][0]}-{c['rows'][1]}", "continuous steps": c["steps"],
             "continuous mean context": c["context"], "static steps": s["steps"], "static mean context": s["context"]}
            for c, s in bands]
    kinds = {s: ", ".join(f"{n:,} {kind}" for kind, n in runs[s]["steps"].items()) for s in runs}
    waited = {s: sum(runs[s]["steps_not_overlapped"].values()) for s in runs if "steps_not_overlapped" in runs[s]}
    note = "" if len(waited) < len(runs) else \
        f"; steps after which the host waited for the tokens before the next launch: " \
        f"{waited['continuous']:,} and {waited['static']:,}"
    out = [(f"{data['workload']} at {data['max_num_seqs']} seats: continuous {kinds['continuous']} steps, static "
            f"{kinds['static']}{note}", rows)]
    full = data.get("full_phase")
    if full:
        out.append((f"steps of >= 240 rows in the continuous run on the {full['card']} ({full['timeline']})",
                    [{k: full[k] for k in ("seconds", "steps", "mixed_steps", "prompt_tokens", "decode_ms_assumed",
                                           "mixed_extra_ms", "mixed_extra_us_per_prompt_token")}]))
    return out


def one_table(presenter):
    return lambda data: [(None, presenter(data))]


PRESENTERS = {"kernels_": one_table(kernel_rows), "prefill_": one_table(prefill_rows),
              "throughput_": one_table(throughput_rows), "profile_prefill_": one_table(prefill_profile_rows),
              "profile_": profile_tables, "sharing_": sharing_tables, "step_mix_": step_mix_tables}


def benchmark_of(path: Path) -> str:
    """The benchmark a result file comes from: its name's first word (``profile_prefill``, ``rope_decode`` and
    ``step_mix`` are two)."""
    two = [name for name in ("profile_prefill", "rope_decode", "step_mix") if path.stem.startswith(name + "_")]
    return two[0] if two else path.stem.split("_")[0]


# --- any other file ------------------------------------------------------------------------------------

def flatten(row: dict, prefix: str = "") -> dict:
    """{"v2": {"ms": 1}} -> {"v2 ms": 1}; lists are left out."""
    flat = {}
    for key, value in row.items():
        name = f"{prefix} {key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        elif is_scalar(value):
            flat[name] = value
    return flat


def _is_rows(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def generic_tables(data: dict) -> list[tuple[str | None, list[dict]]]:
    """Every list of objects the file holds, one table each (captioned by its key when there are several)."""
    lists = [(key, value) for key, value in data.items() if _is_rows(value)]
    if lists:
        return [(key if len(lists) > 1 else None, [flatten(r) for r in value]) for key, value in lists]
    rows = leaf_rows({k: v for k, v in data.items() if isinstance(v, dict)})
    if rows:
        return [(None, rows)]
    meta_keys = {k for keys in META.values() for k in keys}
    return [(None, [{k: v for k, v in data.items() if is_scalar(v) and k not in meta_keys}])]


def leaf_rows(tree: dict, path: str = "") -> list[dict]:
    """{"W1": {"static": {...numbers}}} -> [{"name": "W1/static", ...numbers}]."""
    rows = []
    for key, value in tree.items():
        name = f"{path}/{key}" if path else str(key)
        scalars = {k: v for k, v in value.items() if is_scalar(v)}
        if len(scalars) >= 2:
            rows.append({"name": name, **scalars})
        rows += leaf_rows({k: v for k, v in value.items() if isinstance(v, dict)}, name)
    return rows


# --- the report ----------------------------------------------------------------------------------------

def find_meta(data: dict, key: str):
    for name in META[key]:
        value = data.get(name)
        if value not in (None, ""):
            return " ".join(map(str, value)) if isinstance(value, list) else value
    return None


def tables(path: Path, data: dict) -> list[tuple[str | None, list[dict]]]:
    if data.get("demo") == "memory":
        presenter = one_table(memory_demo_rows)
    else:
        presenter = next((f for prefix, f in PRESENTERS.items() if path.stem.startswith(prefix)), generic_tables)
    try:
        return presenter(data)
    except (KeyError, TypeError, ZeroDivisionError):  # a script changed its format: show what is there
        return generic_tables(data)


def section(path: Path) -> str:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        data = {"rows": data} if _is_rows(data) else {}
    card, date, command = (find_meta(data, k) for k in ("card", "date", "command"))
    title = TITLES.get(benchmark_of(path))
    head = [f"### {title} ({path.name})" if title else f"### {path.name}", "",
            f"card: {card or 'not recorded'}; date: {date or 'not recorded'}"
            + (f"; copy roofline {data['copy_tbps']:.3f} TB/s" if isinstance(data.get("copy_tbps"), float) else "")
            + "  ",
            f"command: `{command}`" if command else "command: not recorded in the JSON"]
    body = [(f"{caption}:\n\n" if caption else "") + markdown_table(rows) for caption, rows in tables(path, data)]
    return "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n"


def canonical(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """One file per (benchmark, card, model shape): the shortest name, as extra runs (tuning, variants) add
    suffixes to it."""
    best: dict[tuple, Path] = {}
    for f in files:
        data = json.loads(f.read_text())
        data = data if isinstance(data, dict) else {}
        key = (benchmark_of(f), find_meta(data, "card"), data.get("model_shape"))
        if key not in best or (len(f.stem), f.stem) < (len(best[key].stem), best[key].stem):
            best[key] = f
    chosen = [f for f in files if f in best.values()]
    return chosen, [f for f in files if f not in chosen]


def report(results: Path, all_files: bool = True) -> str:
    order = list(TITLES)
    def position(f: Path):  # by benchmark in TITLES order, GPU runs before CPU ones, then by name
        kind = benchmark_of(f)
        return order.index(kind) if kind in order else len(order), "cpu" in f.stem.split("_")[1:], f.name
    files = sorted(results.glob("*.json"), key=position)
    if not files:
        return f"_No results yet: run the benchmarks (they write JSON under {results.name}/)._\n"
    others: list[Path] = []
    if not all_files:
        files, others = canonical(files)
    text = "\n".join(section(f) for f in files)
    if others:
        text += (f"\nOther runs in {results.name}/ (`python benchmarks/report.py` shows every file): "
                 + ", ".join(f.name for f in others) + "\n")
    return text


def rewrite_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} markers to write between")
    before, rest = content.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{BEGIN}\n{text}{END}{after}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS, help=f"folder of result JSON (default {RESULTS})")
    p.add_argument("--readme", type=Path, help=f"rewrite this file between {BEGIN} and {END}, with one run "
                                               "per benchmark and card (the file with the shortest name)")
    args = p.parse_args(argv)
    text = report(args.results, all_files=not args.readme)
    if args.readme:
        rewrite_readme(args.readme, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
