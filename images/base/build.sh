#!/usr/bin/env bash
# The project's own Debian base image, for hosts that reach Debian's archive but no container registry.
# Debian bookworm (minbase) + its Python 3.11, made with mmdebstrap and `docker import`. It stands in for
# python:3.11-slim-bookworm: `python`, `pip` (inside a venv) and apt-get work the same way in both.
# Cached: the tag carries a hash of this recipe, so the image is rebuilt only when this file changes.
#   usage: images/base/build.sh [IMAGE]   (DOCKER_HOST selects the engine; prints the image tag)
set -euo pipefail
image=${1:-headavatar/base}
recipe=$(sha256sum "$0" | cut -c1-12)
tag="$image:bookworm-$recipe"
if docker image inspect "$tag" >/dev/null 2>&1; then
  docker tag "$tag" "$image:bookworm"
  echo "$tag"; exit 0
fi
command -v mmdebstrap >/dev/null || { echo "mmdebstrap missing: apt-get install mmdebstrap" >&2; exit 1; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mmdebstrap --quiet --variant=minbase --mode=root \
  --include=python3,python3-venv,python-is-python3,ca-certificates,tzdata \
  --customize-hook='chroot "$1" sh -c "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin"' \
  bookworm "$work/rootfs.tar" \
  "deb http://deb.debian.org/debian bookworm main" \
  "deb http://deb.debian.org/debian bookworm-updates main" \
  "deb http://deb.debian.org/debian-security bookworm-security main" >&2
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "mmdebstrap --variant=minbase bookworm + python3 (recipe $recipe)" \
  "$work/rootfs.tar" "$tag" >&2
docker tag "$tag" "$image:bookworm"
echo "$tag"
