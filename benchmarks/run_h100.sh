#!/usr/bin/env bash
# Every committed GPU result, regenerated in one go (about 17 minutes on an H100):
#
#     bash benchmarks/run_h100.sh                       # all stages into benchmarks/results
#     RESULTS=/tmp/r bash benchmarks/run_h100.sh kernels prefill   # some stages elsewhere
#
# Each stage has its own time limit and writes its JSON/PNG/log as it finishes, so a stage that fails
# leaves the others' results in place.
set -u
out=${RESULTS:-benchmarks/results}
mkdir -p "$out"
run_stage() {  # run_stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "   exit $? ($out/$name.log)"
    grep -v -e 'Processed prompts' -e NumbaPerformanceWarning -e 'warn(errors' "$out/$name.log" | tail -n 25
}
stage() {
    case $1 in
        throughput) run_stage throughput 590 python benchmarks/benchmark_throughput.py --max-num-seqs 16,64,256 --out "$out" ;;
        kernels) run_stage kernels 170 python benchmarks/bench_kernels.py --out "$out" ;;
        prefill) run_stage prefill 100 python benchmarks/bench_prefill.py --out-dir "$out" ;;
        sharing) run_stage sharing 120 python benchmarks/bench_sharing.py --num-requests 128 --out "$out" ;;
        demo_memory) run_stage demo_memory 120 python -m pagedattention demo memory --unshared --no-progress \
                         --json "$out/demo_memory_gpu.json" ;;
        *) echo "unknown stage $1"; return 2 ;;
    esac
}
for name in "${@:-throughput kernels prefill sharing demo_memory}"; do
    for s in $name; do stage "$s"; done
done
