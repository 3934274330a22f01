#!/usr/bin/env bash
# Every GPU result, regenerated on one H200, stage by stage:
#
#     bash benchmarks/run_h200.sh                                      # every stage into benchmarks/results
#     RESULTS=/tmp/r bash benchmarks/run_h200.sh throughput profile    # some stages, results elsewhere
#     QUICK=1 bash benchmarks/run_h200.sh kernels throughput          # kernels: headline shapes; caps 64,256
#     HF=off SHAPE_WORKLOADS=W2 bash benchmarks/run_h200.sh throughput shapes  # no HF baselines; shapes on W2 only
#
# stage        what                                                            limit   files
# kernels      bench_kernels.py: decode kernels, full grid, copy roofline        240 s   json png log
# prefill      bench_prefill.py: paged prefill vs SDPA (W1/W2-like steps too)    180 s   json png log
# profile      profile_step.py: decode steps at batch 1/16/64/256, W2's bound    180 s   json log
# profile_prefill  profile_prefill.py: W1/W2-like prefill steps per part        200 s   json log
# host_calls   host_calls.py: W3 under cProfile, then 100 traced steps: the CUDA  150 s   json log
#              calls per step and the GPU's busy share (is a whole run host- or GPU-bound?)
# profile_mixed  profile_mixed.py: a W3-like mixed step's parts against a decode    150 s   json log
#              step's (what admitting ~5 prompts into 250 decoding rows costs)
# gemm         bench_gemm.py: decode GEMMs, tensor-core kernel vs cuBLAS         120 s   json log
# rope_decode  bench_rope_decode.py: RoPE + cache write + attention, fused or not 120 s   json log
# sampling     bench_sampling.py: the sampling kernel at 1-256 rows vs torch       240 s   json log
# throughput   Qwen2.5-0.5B: W1/W2 at caps 16,64,256, W3 at 256, HF on W1/W2     570 s   json png png log
# shapes       qwen3-0.6b, llama3.2-1b, 7b (Qwen2.5-7B): W1/W2/W3 at 256, no HF 3x200 s  json x3, log
# sharing      bench_sharing.py --num-requests 128                               120 s   json png log
# serving      benchmark_serving.py --launch-server (W3 over HTTP)               240 s   json png log
# demo_memory  python -m pagedattention demo memory                              120 s   json log
# ab           ab_engine.py: W1/W2/W3 of this tree against OLD (a carried         570 s   json log
#              `git archive <rev> pagedattention benchmarks`), old/new/new/old; not in the default set
# ab_steps     the same for decode steps (ab_engine.py --steps: profile_step.py   420 s   json log
#              per tree): wall, host work and GPU time per step at batch 1/16/64/256
# tests        the engine's and kernels' tests on the GPU (CUDA graphs == eager,  400 s   log
#              the kernels against their references); not in the default set
#
# A stage writes its files as it finishes, so one that fails leaves the others' in place; each prints its wall
# time, and the script ends with a table of them. Device time is scarce and one command may run 10 minutes,
# so run the stages in groups of at most ~9 minutes (and at most 8 files, when results must be copied back):
#     host_calls profile_mixed profile kernels  |  prefill profile_prefill  |  throughput  |  shapes
#     |  gemm sharing demo_memory  |  serving
#     |  rope_decode sampling
# Set-up it does itself: wheels in .whl/ (shared/device/prepare.sh fetches numpy for the GPU image) go to
# .site/ on PYTHONPATH, the repository root goes on PYTHONPATH, the block allocator is built if missing.
set -u
cd "$(dirname "$0")/.."
out=${RESULTS:-benchmarks/results}
py=${PYTHON:-python3}
caps=16,64,256
[ -n "${QUICK:-}" ] && caps=64,256
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PWD/.site" .whl/*.whl \
        && export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -f pagedattention/memory/libblockmanager.so ] || make -s -C pagedattention/memory > /dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

timings=()
all_stages="kernels prefill profile profile_prefill host_calls profile_mixed gemm rope_decode sampling throughput shapes
    sharing serving demo_memory"
run_stage() {  # run_stage NAME SECONDS COMMAND...: output to $out/NAME.log, its tail on the terminal
    local name=$1 limit=$2 start=$SECONDS code before; shift 2
    echo "== $name (limit $limit s): $*"
    before=$(stat -c %s "$out/$name.log" 2>/dev/null || echo 0)
    timeout "$limit" "$@" >> "$out/$name.log" 2>&1
    code=$?
    timings+=("$(printf '%-12s exit %3d  %4d s  %s' "$name" "$code" $((SECONDS - start)) "$*")")
    echo "   exit $code after $((SECONDS - start)) s ($out/$name.log)"
    tail -c +$((before + 1)) "$out/$name.log" | grep -v -e 'Processed prompts' -e NumbaPerformanceWarning \
        -e 'warn(errors' -e '^USDT' | tail -n 30
}
stage() {
    : > "$out/$1.log"
    case $1 in
        kernels) run_stage kernels 240 $py benchmarks/bench_kernels.py --out "$out" ${QUICK:+--quick} ;;
        prefill) run_stage prefill 180 $py benchmarks/bench_prefill.py --out-dir "$out" ;;
        profile) run_stage profile 180 $py benchmarks/profile_step.py --out "$out" ;;
        profile_prefill) run_stage profile_prefill 200 $py benchmarks/profile_prefill.py --out "$out" ;;
        host_calls) run_stage host_calls 150 $py benchmarks/host_calls.py --out "$out" ;;
        profile_mixed) run_stage profile_mixed 150 $py benchmarks/profile_mixed.py --out "$out" ;;
        gemm) run_stage gemm 120 $py benchmarks/bench_gemm.py --out "$out" ;;
        rope_decode) run_stage rope_decode 120 $py benchmarks/bench_rope_decode.py --out "$out" ;;
        sampling) run_stage sampling 240 $py benchmarks/bench_sampling.py --out "$out" ;;
        throughput) run_stage throughput 570 $py benchmarks/benchmark_throughput.py --model-shape qwen2.5-0.5b \
                        --workloads W1,W2,W3 --max-num-seqs "$caps" --hf "${HF:-auto}" --out "$out" ;;
        shapes) for shape in qwen3-0.6b llama3.2-1b 7b; do
                    run_stage shapes 200 $py benchmarks/benchmark_throughput.py --model-shape "$shape" \
                        --workloads "${SHAPE_WORKLOADS:-W1,W2,W3}" --max-num-seqs 256 --hf off --no-plots --out "$out"
                done ;;
        sharing) run_stage sharing 120 $py benchmarks/bench_sharing.py --num-requests 128 --out "$out" ;;
        serving) if [ -f benchmarks/benchmark_serving.py ]; then
                     run_stage serving 240 $py benchmarks/benchmark_serving.py --launch-server --out "$out"
                 else echo "== serving: benchmarks/benchmark_serving.py is missing, skipped"; fi ;;
        demo_memory) run_stage demo_memory 120 $py -m pagedattention demo memory --unshared --no-progress \
                         --json "$out/demo_memory_gpu.json" ;;
        tests) run_stage tests 400 $py -m pytest -q -x -p no:cacheprovider tests/test_engine.py \
                   tests/test_mixed_steps.py tests/test_sampler.py tests/test_sampling_kernel.py \
                   tests/test_correctness.py ;;
        ab|ab_steps) [ -f "${OLD:-}/pagedattention/memory/libblockmanager.so" ] \
                || make -s -C "${OLD:?set OLD to the other build}/pagedattention/memory" > /dev/null
            if [ "$1" = ab ]; then
                run_stage ab 570 $py benchmarks/ab_engine.py --old "$OLD" --workloads "${AB_WORKLOADS:-W1,W2,W3}" \
                    --out "$out/ab"
            else
                run_stage ab_steps 420 $py benchmarks/ab_engine.py --old "$OLD" --steps --out "$out/ab_steps"
            fi ;;
        *) rm -f "$out/$1.log"
           echo "unknown stage $1 ($all_stages)"; return 2 ;;
    esac
}
started=$SECONDS
for s in ${@:-$all_stages}; do
    stage "$s"
done
echo
printf '%s\n' "${timings[@]}"
echo "total $((SECONDS - started)) s; results in $out"
