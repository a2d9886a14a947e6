#!/usr/bin/env bash
# One command for a lent GPU machine: install the wheels carried in .whl/ (no registry there), unpack or
# build mamba-ssm (.kernels/), then the steps named in STEPS, in that order. Output (logs, JSON, plot)
# goes to $OUT (default: results/gpu_check).
#   STEPS: tests profiles encoder tune_gemv tune_gemm run_all load snapshot speedrun
#   (default: "tests profiles run_all"); speedrun: the tiny speedrun chain on cuda:0 (SPEEDRUN_CONFIG to change)
#   load: bench/load_gpu.py (LOAD_ARGS), snapshot: bench/snapshot_bench.py --gpu
#   TESTS=tests/... (pytest -m cuda target), PROFILES="args;args" (bench/profile_decode.py runs),
#   RUN_ALL_ARGS (default "--skip hf memory"; "--plot \$OUT/memory_vs_context.png" for the full table),
#   STEP_TIMEOUT (seconds per step, default 400), MAMBA=1 / PACK_MAMBA=1 (build / bring back mamba-ssm).
#   bash bench/gpu_check.sh
#   STEPS="tune_gemm run_all" RUN_ALL_ARGS="--plot \$OUT/memory_vs_context.png" bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f .kernels/mamba_site.txz ]; then  # a stripped, xz-packed build (smaller to carry than the pieces)
  mkdir -p /tmp/site && xz -dc .kernels/mamba_site.txz | tar xf - -C /tmp/site && echo "mamba-ssm unpacked"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
elif ls .kernels/mamba_site.tgz.part* >/dev/null 2>&1; then  # a build brought back from an earlier run
  mkdir -p /tmp/site && cat .kernels/mamba_site.tgz.part* | tar xzf - -C /tmp/site && echo "mamba-ssm unpacked"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
elif [ "${MAMBA:-0}" = 1 ]; then
  bash .kernels/build_mamba_kernels.sh > "$OUT/mamba_build.log" 2>&1 || echo "mamba-ssm build failed (see log)"
  if [ "${PACK_MAMBA:-0}" = 1 ]; then  # bring the build back in <16 MiB pieces for later runs
    (cd /tmp/site && tar czf - mamba_ssm selective_scan_cuda*.so) | split -b 15M - "$OUT/mamba_site.tgz.part"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
limit=${STEP_TIMEOUT:-400}
quiet() { grep -v "^INFO"; }
for step in ${STEPS:-tests profiles run_all}; do
  echo "== $step ($(date -u +%H:%M:%S))"
  case $step in
    tests) timeout "$limit" python3 -m pytest -q -m cuda ${TESTS:-tests/test_cuda_runtime.py} -s 2>&1 \
             | tee "$OUT/pytest_cuda.log" | tail -25 ;;
    profiles)
      IFS=';' read -ra profiles <<< "${PROFILES---decode fused;--decode fused --no-pdl;--decode split}"
      for variant in "${profiles[@]}"; do
        timeout "$limit" python3 bench/profile_decode.py $variant 2>&1 | quiet | tail -14 | tee -a "$OUT/profile_decode.log"
      done ;;
    encoder) timeout "$limit" python3 bench/profile_encoder.py 2>&1 | quiet | tee "$OUT/profile_encoder.log" | tail -32 ;;
    tune_gemv) timeout "$limit" python3 bench/tune_gemv.py 2>&1 | quiet | tee "$OUT/tune_gemv.log" | tail -40 ;;
    tune_gemm) timeout "$limit" python3 bench/tune_gemm.py 2>&1 | quiet | tee "$OUT/tune_gemm.log" | tail -14 ;;
    run_all) timeout "$limit" python3 bench/run_all.py --out "$OUT" ${RUN_ALL_ARGS:---skip hf memory} 2>&1 | quiet \
               | tee "$OUT/run_all.log" | tail -40 ;;
    load) timeout "$limit" python3 -m bench.load_gpu --out "$OUT/load_gpu" ${LOAD_ARGS:-} 2>&1 | quiet \
            | tee "$OUT/load_gpu.log" | tail -20 ;;
    snapshot) timeout "$limit" python3 -m bench.snapshot_bench --gpu 2>&1 | quiet | tee "$OUT/snapshot_gpu.log" | tail -12
              cp bench/results/snapshot_gpu.json "$OUT/" 2>/dev/null ;;
    speedrun) timeout "$limit" python3 -m src.speedrun --config "${SPEEDRUN_CONFIG:-hparams/speedrun/tiny.yaml}" \
                --out /tmp/speedrun --device cuda:0 2>&1 | tee "$OUT/speedrun.log" | tail -40
              cp /tmp/speedrun/pieces/summary.md "$OUT/speedrun_summary.md" 2>/dev/null
              tail -30 /tmp/speedrun/logs/*.log > "$OUT/speedrun_step_logs.txt" 2>/dev/null ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "== done ($(date -u +%H:%M:%S))"
