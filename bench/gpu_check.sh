#!/usr/bin/env bash
# One command for a lent GPU machine: install the wheels carried in .whl/ (no registry there), optionally
# build mamba-ssm (MAMBA=1, ~3 min, needs .kernels/ from ../shared/tools), then the CUDA tests, the decode
# profiles and the benchmark table. Output (logs, JSON, plot) goes to $OUT (default: results/gpu_check).
#   bash bench/gpu_check.sh                       # tests + profiles + run_all (no HF generate, no memory)
#   RUN_ALL_ARGS="--plot \$OUT/memory_vs_context.png" bash bench/gpu_check.sh   # the full table
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ls .kernels/mamba_site.tgz.part* >/dev/null 2>&1; then  # a build brought back from an earlier run
  mkdir -p /tmp/site && cat .kernels/mamba_site.tgz.part* | tar xzf - -C /tmp/site && echo "mamba-ssm unpacked"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
elif [ "${MAMBA:-0}" = 1 ]; then
  bash .kernels/build_mamba_kernels.sh > "$OUT/mamba_build.log" 2>&1 || echo "mamba-ssm build failed (see log)"
  if [ "${PACK_MAMBA:-0}" = 1 ]; then  # bring the build back in <16 MiB pieces for later runs
    (cd /tmp/site && tar czf - mamba_ssm selective_scan_cuda*.so) | split -b 15M - "$OUT/mamba_site.tgz.part"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -m cuda ${TESTS:-tests/test_cuda_runtime.py} -s 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
fi
IFS=';' read -ra profiles <<< "${PROFILES---decode fused;--decode fused --no-pdl;--decode split}"
for variant in "${profiles[@]}"; do
  python3 bench/profile_decode.py $variant 2>&1 | grep -v "^INFO" | tail -14 | tee -a "$OUT/profile_decode.log"
done
if [ "${ENCODER_PROFILE:-0}" = 1 ]; then
  python3 bench/profile_encoder.py 2>&1 | grep -v "^INFO" | tee "$OUT/profile_encoder.log" | tail -32
fi
if [ "${TUNE:-0}" = 1 ]; then
  python3 bench/tune_gemv.py 2>&1 | grep -v "^INFO" | tee "$OUT/tune_gemv.log"
fi
if [ "${SKIP_RUN_ALL:-0}" != 1 ]; then
  python3 bench/run_all.py --out "$OUT" ${RUN_ALL_ARGS:---skip hf memory} 2>&1 | grep -v "^INFO" \
    | tee "$OUT/run_all.log" | tail -40
fi
