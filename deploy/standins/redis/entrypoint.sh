#!/bin/sh
# The official image compiles protected mode off, so that other containers may connect without a
# password on the compose network; Debian's build has it on, so say it here.
set -eu
if [ "${1:-}" = redis-server ]; then
  exec "$@" --protected-mode no
fi
exec "$@"
