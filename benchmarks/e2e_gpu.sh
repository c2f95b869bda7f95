#!/usr/bin/env bash
# The whole pipeline on a lent GPU machine (no internet): install the carried wheels, run
# headavatar.bench.e2e_gpu, write results to $OUT (or benchmarks/results). Wheels go in .whl/ (and
# .whl_a/ when one call's carry limit needs two folders; README "Stage 6" lists them). Any
# arguments pass through, e.g. --stages synth,extract,sample,matting,fitting,meshhead to split the
# run over two calls of a machine that stays up.
set -euo pipefail
# One target per folder: a second `pip install --target` into the same folder replaces its bin/.
for d in .whl_a .whl; do
  if compgen -G "$d/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "/tmp/site$d" "$d"/*.whl
  fi
done
export PYTHONPATH="/tmp/site.whl:/tmp/site.whl_a:$PWD/tasks" PATH="/tmp/site.whl_a/bin:$PATH"
[ "${INSTALL_ONLY:-0}" = 1 ] && exit 0
python3 -m headavatar.bench.e2e_gpu --out "${OUT:-benchmarks/results}" "$@"
