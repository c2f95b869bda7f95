#!/usr/bin/env bash
# The whole pipeline on a lent GPU machine (no internet): install the carried packages, run
# headavatar.bench.e2e_gpu, write results to $OUT (or benchmarks/results). Any arguments pass through,
# e.g. --stages synth,extract,sample,matting,fitting,meshhead to split the run over calls of a machine
# that stays up.
#
# Carried packages (docs/gpu.md "A whole capture at real size"): wheels in .whl/, .whl_a/ or
# build/e2e_carry_{a,b}/, each folder installed with `pip install --target /tmp/site<folder>`, and tarballs
# of an installed site (*.tar.xz there) unpacked there. A call carries at most 64 MiB with the tree, so
#   PACK=1 bash benchmarks/e2e_gpu.sh
# makes, here, from .whl/, .whl_a/ and .whl_c/: build/e2e_carry_a/site.tar.xz (every package but gsplat,
# botocore's service models cut to S3's and STS's, xz: ~58 MiB), build/e2e_carry_b/ (gsplat's wheel, ~6 MiB)
# and build/e2e_carry_c/ (mlflow's server and client: the wheels pinned in benchmarks/e2e_carry_c.txt, ~33 MiB),
# for the first call (a) and a later one (b and c together). .whl_c/ is filled, here, with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux_2_27_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
#     -d .whl_c -r benchmarks/e2e_carry_c.txt
# A folder is installed once per machine: a later call of the same warm machine skips what is installed
# (reinstalling gsplat would touch its sources, and its CUDA extension would be built again). The folders
# in $E2E_TOOLS (build/e2e_carry_c) are not put on the stages' PYTHONPATH: their site is given to the bench
# as $E2E_MLFLOW_SITE, for the MLflow server and the tracking processes of its register phase alone.
#
# One run over several calls of a warm machine (a call lasts at most 10 minutes), never stopped between
# them: CHAIN=start launches the bench in a process session of its own (it outlives the call; its code
# copied to /tmp/e2e_code, its state in $E2E_HOME) and watches it; CHAIN=watch, in each later call,
# installs what that call carried and watches on. A call watches for $WATCH_S seconds (or until the bench
# ends), then copies the results and the stages' logs (logs.tar.gz) to $OUT; with $STOP_AT it makes the
# bench's stop file that many seconds into the call (the bench stops its stage at the next checkpoint and
# records where it got, as at --deadline).
set -euo pipefail
PYTHON=${PYTHON:-python3}
read -r -a CARRY <<<"${E2E_CARRY:-.whl_a .whl build/e2e_carry_a build/e2e_carry_b build/e2e_carry_c}"  # carried packages
TOOLS=" ${E2E_TOOLS-build/e2e_carry_c} "  # of those, the ones off the stages' path (mlflow)

if [ "${PACK:-0}" = 1 ]; then
  rm -rf build/e2e_pack build/e2e_carry_a build/e2e_carry_b build/e2e_carry_c
  mkdir -p build/e2e_pack build/e2e_carry_a build/e2e_carry_b build/e2e_carry_c
  wheels=$(ls .whl/*.whl .whl_a/*.whl | grep -v '/gsplat-')
  # shellcheck disable=SC2086
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --target build/e2e_pack --python-version 3.12 \
    --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any $wheels
  find build/e2e_pack/botocore/data -mindepth 1 -maxdepth 1 -type d \
    ! -name s3 ! -name sts ! -name sso ! -name sso-oidc -exec rm -rf {} +
  tar -C build/e2e_pack -cf - . | xz -9e -T0 >build/e2e_carry_a/site.tar.xz
  cp .whl_a/gsplat-*.whl build/e2e_carry_b/
  cp .whl_c/*.whl build/e2e_carry_c/
  rm -rf build/e2e_pack
  du -sh build/e2e_carry_a build/e2e_carry_b build/e2e_carry_c
  exit 0
fi

sites=() bins=() tools=()
for d in "${CARRY[@]}"; do
  target=/tmp/site$(printf %s "$d" | tr / _)
  if [[ $TOOLS == *" $d "* ]]; then
    tools+=("$target")
  else
    sites+=("$target") bins+=("$target/bin")  # on the path even before a later call fills it
  fi
  [ -d "$d" ] || continue
  signature=$(find "$d" -maxdepth 1 -type f -printf '%f %s\n' | sort | md5sum)
  [ "$(cat "$target/.installed" 2>/dev/null)" = "$signature" ] && continue
  if compgen -G "$d/*.whl" >/dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$d"/*.whl
  fi
  for t in "$d"/*.tar.xz; do
    [ -e "$t" ] || continue
    mkdir -p "$target"
    $PYTHON -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="fully_trusted")' \
      "$t" "$target"
  done
  mkdir -p "$target"
  printf %s "$signature" >"$target/.installed"
  echo "installed $d into $target"
done
code=$PWD
[ -n "${CHAIN:-}" ] && code=/tmp/e2e_code
PYTHONPATH="$(IFS=:; echo "${sites[*]}"):$code/tasks"
PATH="$(IFS=:; echo "${bins[*]}"):$PATH"
E2E_MLFLOW_SITE="$(IFS=:; echo "${tools[*]}")"
export PYTHONPATH PATH E2E_MLFLOW_SITE
[ "${INSTALL_ONLY:-0}" = 1 ] && exit 0
if [ -z "${CHAIN:-}" ]; then
  exec $PYTHON -m headavatar.bench.e2e_gpu --out "${OUT:-benchmarks/results}" "$@"
fi

home=${E2E_HOME:-/tmp/e2e_rs}
out=${OUT:-benchmarks/results}
t0=$SECONDS
mkdir -p "$home/logs" "$out"
if [ "$CHAIN" = start ]; then
  rm -rf /tmp/e2e_code "$home/STOP"
  mkdir -p /tmp/e2e_code
  cp -a tasks config /tmp/e2e_code/  # the next call's copy of the tree must not touch what runs
  cd /tmp/e2e_code
  # setsid: a session of its own, which the end of the call does not stop; nothing of the call's output kept open
  setsid "$PYTHON" -m headavatar.bench.e2e_gpu --home "$home" --out "$home/out" --log-dir "$home/logs" \
    --stop-file "$home/STOP" "$@" >"$home/bench.log" 2>&1 </dev/null &
  echo $! >"$home/bench.pid"
  cd - >/dev/null
  echo "bench started: pid $(cat "$home/bench.pid"), $home/bench.log"
fi
pid=$(cat "$home/bench.pid")
running() { [ -r "/proc/$pid/stat" ] && ! awk '{exit !($3 == "Z" || $3 == "X")}' "/proc/$pid/stat"; }
publish() {  # into $OUT, every minute too: a call cut short still returns them
  cp "$home"/out/*.json "$out"/ 2>/dev/null || true
  tar -C "$home" -czf "$out/logs.tar.gz" logs bench.log 2>/dev/null || true
}
stop_at=${STOP_AT:-}
last=0
while running && [ $((SECONDS - t0)) -lt "${WATCH_S:-560}" ]; do
  if [ -n "$stop_at" ] && [ $((SECONDS - t0)) -ge "$stop_at" ] && [ ! -e "$home/STOP" ]; then
    touch "$home/STOP"
    echo "[$((SECONDS - t0)) s] stop file made"
  fi
  if [ $((SECONDS - last)) -ge 60 ]; then
    last=$SECONDS
    echo "[$((SECONDS - t0)) s] $(grep -h -E 'step [0-9]+/|done in|running \(inputs|synthesising' "$home/bench.log" \
      | tail -n 1 | tr '\r' '\n' | tail -n 1 | cut -c1-220)"
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader 2>/dev/null || true
    publish
  fi
  sleep 2
done
running && echo "[$((SECONDS - t0)) s] the bench runs on (pid $pid)" || echo "[$((SECONDS - t0)) s] the bench has ended"
publish
tail -n 25 "$home/bench.log" | cut -c1-400
