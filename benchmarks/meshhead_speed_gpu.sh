#!/usr/bin/env bash
# Issue 22, stage 5 on a lent GPU machine (no internet): mesh-head step time, host syncs, profile and quality,
# before (the code of BASE, a `git archive <commit> tasks` unpacked there) and after (this tree), one call.
# Wheels: build/h5whl (pydantic and its needs). Usage: BASE=build/h5base benchmarks/meshhead_speed_gpu.sh [args]
set -uo pipefail
OUT=${OUT:-benchmarks/results/meshhead_speed}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site build/h5whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
log="$OUT/meshhead_log.txt"
bench=tasks/headavatar/bench/meshhead_speed_gpu.py
[ -f /tmp/meshhead_data.pt ] || PYTHONPATH=/tmp/site:$PWD/tasks python3 -m headavatar.bench.meshhead_speed_gpu \
  --role data --out "$OUT" 2>&1 | tee -a "$log"
if [ -n "${BASE:-}" ]; then
  PYTHONPATH=/tmp/site:$PWD/$BASE/tasks python3 "$bench" --role baseline --out "$OUT" ${BASE_ARGS:-} 2>&1 \
    | grep -v Warning | tee -a "$log"
fi
PYTHONPATH=/tmp/site:$PWD/tasks python3 -m headavatar.bench.meshhead_speed_gpu --role new --out "$OUT" "$@" 2>&1 \
  | grep -v Warning | tee -a "$log"
