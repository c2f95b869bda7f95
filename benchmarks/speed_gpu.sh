#!/usr/bin/env bash
# Issue 22 on a lent GPU machine (no internet): stage 5/6 step time, profile, quality and time to PSNR,
# before (the code of BASE, a `git archive <commit> tasks` unpacked there) and after (this tree).
# Wheels: $WHEELS (default build/h5whl: gsplat, av, pydantic and its needs). A gsplat extension JIT-built on an
# identical machine may be carried in build/h5gs/gsplat_cuda.so (loaded by benchmarks/gsplat_csrc.py); otherwise it is built here (~100 s) and copied to $OUT.
# Usage: BASE=build/h5base benchmarks/speed_gpu.sh [--parts gaussian,mesh] [--quality-steps N] ...
set -uo pipefail
OUT=${OUT:-benchmarks/results/speed}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-build/h5whl}"/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=/tmp/ext
if [ -f build/h5gs/gsplat_cuda.so ]; then
  cp build/h5gs/gsplat_cuda.so /tmp/site/gsplat/ && cp benchmarks/gsplat_csrc.py /tmp/site/gsplat/csrc.py
fi
start=$(date +%s)
python3 -c "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat has no CUDA backend'" || exit 1
echo "gsplat ready in $(( $(date +%s) - start )) s"
if [ ! -f build/h5gs/gsplat_cuda.so ] && [ -f /tmp/ext/gsplat_cuda/gsplat_cuda.so ]; then
  cp /tmp/ext/gsplat_cuda/gsplat_cuda.so "$OUT/"
fi
log="$OUT/speed_log.txt"
[ -f /tmp/speed_data.pt ] || PYTHONPATH=/tmp/site:$PWD/tasks python3 -m headavatar.bench.speed_gpu --role data --out "$OUT" ${DATA_ARGS:-} \
  2>&1 | grep -v Warning | tee -a "$log"
if [ -n "${BASE:-}" ]; then
  PYTHONPATH=/tmp/site:$PWD/$BASE/tasks python3 tasks/headavatar/bench/speed_gpu.py --role baseline --out "$OUT" \
    ${BASE_ARGS:-} 2>&1 | grep -v Warning | tee -a "$log"
fi
PYTHONPATH=/tmp/site:$PWD/tasks python3 -m headavatar.bench.speed_gpu --role new --out "$OUT" "$@" 2>&1 \
  | grep -v Warning | tee -a "$log"
