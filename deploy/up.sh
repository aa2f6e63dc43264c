#!/usr/bin/env bash
# Brings the compose network up: builds the static binaries and the images
# (deploy/build.sh; quick when nothing changed), makes the sample files
# (deploy/samples.sh), starts 3 supernodes and 6 leaves, and waits until
# all nine containers report healthy.
#
#   deploy/up.sh                              project "servent"
#   COMPOSE_PROJECT_NAME=mine deploy/up.sh    a second network beside it
#   SERVENT_SKIP_BUILD=1 deploy/up.sh         use the images already built
#
# Tear it down with deploy/down.sh (same COMPOSE_PROJECT_NAME).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-servent}"
export SERVENT_SAMPLES="${SERVENT_SAMPLES:-$here/samples}"
timeout="${SERVENT_UP_TIMEOUT:-120}"

say() { printf 'up.sh: %s\n' "$*" >&2; }

if [ "${SERVENT_SKIP_BUILD:-0}" != 1 ]; then
    "$here/build.sh"
fi
"$here/samples.sh" "$SERVENT_SAMPLES"

start=$SECONDS
say "starting project $COMPOSE_PROJECT_NAME"
"$here/compose.sh" up -d
containers=($("$here/compose.sh" ps -q))
if [ "${#containers[@]}" -ne 9 ]; then
    say "expected 9 containers, found ${#containers[@]}"
    exit 1
fi
while :; do
    unhealthy=0
    for c in "${containers[@]}"; do
        status="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$c")"
        [ "$status" = healthy ] || unhealthy=$((unhealthy + 1))
    done
    [ "$unhealthy" -eq 0 ] && break
    if [ $((SECONDS - start)) -ge "$timeout" ]; then
        say "$unhealthy of ${#containers[@]} containers not healthy after ${timeout} s:"
        "$here/compose.sh" ps >&2
        exit 1
    fi
    sleep 1
done
say "9 containers healthy in $((SECONDS - start)) s"
cat >&2 <<MSG
up.sh: try
  deploy/compose.sh exec leaf1 leaf search sample
  deploy/compose.sh exec leaf1 leaf get --out /tmp/movie.bin <HASH>
  deploy/compose.sh logs -f supernode1
and tear it down with: COMPOSE_PROJECT_NAME=$COMPOSE_PROJECT_NAME deploy/down.sh
MSG
