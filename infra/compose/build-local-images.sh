#!/usr/bin/env bash
# Builds the images docker-compose.local.yml runs, on hosts that reach Debian and PyPI but no container
# registry: everything FROM the project's Debian base (images/base/build.sh). Layers are cached by the
# engine, so a second run takes seconds. The stage images come from `make images`.
#   usage: infra/compose/build-local-images.sh        (DOCKER_HOST selects the engine)
# CA certificates added to this host (/usr/local/share/ca-certificates/*.crt, or the PEM file named by
# BUILD_CA_CERT_FILE) are trusted by pip during the builds only, for TLS-inspecting proxies.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DOCKER_BUILDKIT=0
# One build of these images at a time (a background build in .ci/run, a test fixture): the lock of
# headavatar.devserver.images.BUILD_LOCK, released when this script exits.
mkdir -p .headavatar
exec 9>>.headavatar/images.lock
flock 9
base=$(images/base/build.sh headavatar/base)
ca=""
if [ -n "${BUILD_CA_CERT_FILE:-}" ]; then
  ca=$(cat "$BUILD_CA_CERT_FILE")
elif compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  ca=$(cat /usr/local/share/ca-certificates/*.crt)
fi
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
build() {  # tag dockerfile [build args...]
  local tag=$1 file=$2 start=$SECONDS
  shift 2
  docker build -q -f "$file" --build-arg BASE_IMAGE="$base" --build-arg EXTRA_CA_CERT="$ca" "$@" -t "$tag" . >/dev/null
  echo "built $tag in $((SECONDS - start)) s" >&2
}
build headavatar/postgres-local:15 images/compose/postgres.Dockerfile
build headavatar/seaweedfs-local:4.48 images/compose/seaweedfs.Dockerfile
build headavatar/docker-proxy-local:0.1.0 images/compose/docker-proxy.Dockerfile
build headavatar/mlflow:3.17.2 images/mlflow.Dockerfile --build-arg PYTHON_IMAGE="$base"
build headavatar/airflow-local:0.1.0 images/compose/airflow.Dockerfile --build-arg GIT_COMMIT="$commit"
