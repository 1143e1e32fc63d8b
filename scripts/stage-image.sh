#!/usr/bin/env bash
# Build the stage image with the Docker engine (`make image`).
#
#   scripts/stage-image.sh [cpu|gpu] [docker build options...]
#       -> meshpipe/stage-service:<version> (cpu) or meshpipe/stage-service:<version>-gpu
#
# Starts the engine when none answers (scripts/docker-engine.sh), builds FROM python:3.11-slim-bookworm or
# its local stand-in (scripts/base-image.sh), with the legacy builder, on the host's network (pip inside
# the build reaches the package index the way pip here does; proxy variables are passed on when set).
set -euo pipefail
cd "$(dirname "$0")/.."

variant="${1:-cpu}"
[ $# -gt 0 ] && shift
case "$variant" in
  cpu) suffix="" ;;
  gpu) suffix="-gpu" ;;
  *) echo "stage-image: VARIANT must be cpu or gpu, got '$variant'" >&2; exit 2 ;;
esac
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)"
tag="meshpipe/stage-service:${version}${suffix}"

scripts/docker-engine.sh
base="$(scripts/base-image.sh)"
proxy_args=()
for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  if [ -n "${!var:-}" ]; then proxy_args+=(--build-arg "$var=${!var}"); fi
done

started=$(date +%s)
previous=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
DOCKER_BUILDKIT=0 docker build --network host --build-arg "PYTHON_IMAGE=$base" --build-arg "VARIANT=$variant" \
  ${proxy_args[@]+"${proxy_args[@]}"} -t "$tag" "$@" .
size=$(docker image inspect -f '{{.Size}}' "$tag")
# The image the tag named before is left untagged by a rebuild: remove it, so rebuilds do not pile up
# (not when a container still uses it, and never the build stages, which the next build's cache reuses).
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$tag")" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
echo "stage-image: $tag ($variant, FROM $base): $((size / 1000000)) MB, built in $(( $(date +%s) - started )) s" >&2
