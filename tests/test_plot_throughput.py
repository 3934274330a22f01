"""benchmarks/plot_throughput.py draws a report of benchmark_throughput.py, HF baseline rows included."""
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def plotter():
    return runpy.run_path(str(ROOT / "benchmarks" / "plot_throughput.py"), run_name="plot_throughput")


def engine_row(scheduling, lengths, step_s=0.01):
    """A run at cap 4 whose batch drains as its requests finish: one prefill step, then decode steps."""
    running = [len(lengths)] + [sum(n > i for n in lengths) for i in range(max(lengths))]
    running = [n for n in running if n]
    steps = len(running)
    return {"workload": "W2", "scheduling": scheduling, "max_num_seqs": 4, "output_tok_per_s": 1000.0 * steps,
            "requests_per_s": 10.0, "total_tok_per_s": 2000.0, "wall_s": steps * step_s,
            "ttft_s": {"mean": 0.01, "p50": 0.01, "p99": 0.02}, "tpot_s": {"mean": 0.001, "p50": 0.001, "p99": 0.002},
            "prefill_steps": 1, "decode_steps": steps - 1, "mean_running": sum(running) / steps,
            "timeline": {"t_s": [i * step_s for i in range(steps)], "prefill": [1] + [0] * (steps - 1),
                         "running": running, "tokens": [40] + running[1:]}}


def report(rows):
    return {"device": "test card", "model": "tiny", "dtype": "float32", "date": "today", "command": "pytest",
            "results": rows}


def check_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000


def test_plots_bars_and_timeline_with_a_baseline_row(tmp_path):
    hf = {"workload": "W2", "scheduling": "hf-static", "max_num_seqs": 2, "engine": "transformers generate()",
          "output_tok_per_s": 12.5, "requests_per_s": 0.1, "ttft_s": None, "tpot_s": None}
    rows = [engine_row("static", [3, 8, 5, 2]), engine_row("continuous", [6, 6, 6, 6]), hf]
    paths = plotter()["plot_throughput"](report(rows), tmp_path, "x")
    assert paths == [tmp_path / "throughput_x.png", tmp_path / "throughput_timeline_x.png"]
    for path in paths:
        check_png(path)


def test_report_without_timelines_writes_only_the_bar_chart(tmp_path):
    rows = [{k: v for k, v in engine_row(s, [3, 5]).items() if k != "timeline"} for s in ("static", "continuous")]
    rows.append({"workload": "W1", "scheduling": "hf-continuous", "max_num_seqs": None, "output_tok_per_s": 3.0})
    rows.append({"workload": "W1", "scheduling": "static"})  # no throughput: skipped, not an error
    paths = plotter()["plot_throughput"](report(rows), tmp_path / "out", "y")
    assert paths == [tmp_path / "out" / "throughput_y.png"]
    check_png(paths[0])


def test_command_line_names_the_plots_after_the_report(tmp_path, capsys):
    import json
    path = tmp_path / "throughput_card.json"
    path.write_text(json.dumps(report([engine_row("static", [2, 4]), engine_row("continuous", [3, 3])])))
    assert plotter()["main"]([str(path)]) == 0
    assert capsys.readouterr().out.split() == ["wrote", str(tmp_path / "throughput_card.png"),
                                               "wrote", str(tmp_path / "throughput_timeline_card.png")]
