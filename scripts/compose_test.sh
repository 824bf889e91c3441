#!/usr/bin/env bash
# The compose test (see scripts/compose_test.py): builds the images (scripts/compose_images.sh;
# layers stay cached), then brings docker-compose.yml up for real, drives one whole training
# round through port 8000, restarts Postgres and the worker mid-stream, and tears down.
# Run it before any change to the Dockerfile or docker-compose.yml goes in, and record its last
# result in README ("docker compose"). Needs a Docker engine and docker-compose (on Debian:
# apt-get install docker.io docker-compose debootstrap) and ports 8000 and 9090 free.
# Usage: bash scripts/compose_test.sh [--keep] [--out FILE] [--timeout-min N]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$repo/scripts/bootstrap.sh" | tail -n 1)"
for tool in docker-compose debootstrap; do
  command -v "$tool" >/dev/null || { echo "compose test: $tool is missing" >&2; exit 2; }
done
"${DOCKER:-/usr/bin/docker}" info >/dev/null 2>&1 || { echo "compose test: no Docker engine answers" >&2; exit 2; }
started=$(date +%s)
bash "$repo/scripts/compose_images.sh"
echo "[compose-test] images ready in $(( $(date +%s) - started ))s"
exec "$venv/bin/python" "$repo/scripts/compose_test.py" "$@"
