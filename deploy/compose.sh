#!/usr/bin/env bash
# `docker compose` for deploy/docker-compose.yml, with whichever of
# `docker compose` (v2) and `docker-compose` (v1.27 or later) is installed.
# The project name is $COMPOSE_PROJECT_NAME, default "servent".
#
#   deploy/compose.sh ps
#   deploy/compose.sh logs -f supernode1
#   deploy/compose.sh exec leaf1 leaf search moon
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
project="${COMPOSE_PROJECT_NAME:-servent}"

if docker compose version >/dev/null 2>&1; then
    exec docker compose -f "$here/docker-compose.yml" -p "$project" "$@"
elif command -v docker-compose >/dev/null; then
    exec docker-compose -f "$here/docker-compose.yml" -p "$project" "$@"
else
    echo "error: neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 1
fi
