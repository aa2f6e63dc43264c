#!/usr/bin/env bash
# Chaos test of the compose network: brings up a network of its own (a
# unique project name, its own sample files), breaks it in the ways real
# networks break, checks that it recovers, and tears everything down at the
# end, also when a check fails or the script is interrupted.
#
#   deploy/chaos.sh                     builds first (deploy/build.sh)
#   SERVENT_SKIP_BUILD=1 deploy/chaos.sh
#
# stdout carries one JSON object a line, one per check:
#   {"check": "...", "ok": true, "elapsed_ms": 1234, "detail": "..."}
# and progress goes to stderr. Exit status 0 only if every check passed.
#
# The checks, in order (each leaf shares 3 files named "sample leafN ..."):
#   network_up          images built, 3 supernodes and 6 leaves healthy
#   search_every_leaf   a search from each leaf finds the files of every other leaf
#   download_verified   leaf1 downloads leaf4's 2 MiB file; the bytes equal the original
#   supernode_killed    after `docker kill` of supernode1, a search finds every
#                       leaf's files again within 15 s
#   supernode_rejoins   supernode1 started again: a search through it alone finds
#                       every leaf's files (it meshed again, by name)
#   partition_search    supernode2 cut off (`docker network disconnect`): a search
#                       finds every leaf's files within 15 s
#   partition_heals     supernode2 connected again: a search through it alone finds
#                       every leaf's files
#   leaf_new_address    leaf6 restarted with a new IP address: searches show it at
#                       the new address and never the old one, and a download from
#                       it succeeds
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-servent-chaos-$(date +%s)-$$}"
work="$(mktemp -d "${TMPDIR:-/tmp}/servent-chaos.XXXXXX")"
export SERVENT_SAMPLES="$work/samples"
tag="${SERVENT_TAG:-latest}"
placeholder="$COMPOSE_PROJECT_NAME-placeholder"
leaves=(leaf1 leaf2 leaf3 leaf4 leaf5 leaf6)
passed=0
failed=0

log() { printf 'chaos.sh: %s\n' "$*" >&2; }
now_ms() { date +%s%3N; }

command -v jq >/dev/null || { echo "error: chaos.sh needs jq" >&2; exit 2; }

teardown() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$failed" -gt 0 ] || [ "$rc" -ne 0 ]; then
        log "logs of the network, for the failure above:"
        "$here/compose.sh" ps >&2 2>/dev/null
        for c in "${!C[@]}"; do
            log "--- $c (last 30 lines)"
            docker logs --tail 30 "${C[$c]}" 2>&1 | sed "s/^/$c | /" >&2
        done
    fi
    log "tearing down $COMPOSE_PROJECT_NAME"
    docker rm -f "$placeholder" >/dev/null 2>&1
    "$here/down.sh" >/dev/null 2>&1 || log "compose down failed: clean up with COMPOSE_PROJECT_NAME=$COMPOSE_PROJECT_NAME deploy/down.sh"
    rm -rf "$work"
    log "$passed passed, $failed failed"
    if [ "$failed" -gt 0 ] && [ "$rc" -eq 0 ]; then rc=1; fi
    exit "$rc"
}
declare -A C=()
trap teardown EXIT
trap 'log "interrupted"; exit 130' INT TERM

# result NAME OK START_MS DETAIL: prints the check's JSON line.
result() {
    local ok="$2"
    jq -cn --arg check "$1" --argjson ok "$ok" --argjson ms "$(($(now_ms) - $3))" \
        --arg detail "$4" '{check: $check, ok: $ok, elapsed_ms: $ms, detail: $detail}'
    if [ "$ok" = true ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
    log "$1: $([ "$ok" = true ] && echo passed || echo FAILED) ($4)"
}

ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"; }

# search FROM [GLOBAL_FLAG...]: `leaf search --json sample` in leaf FROM.
search() {
    local from="$1"
    shift
    docker exec "${C[$from]}" leaf "$@" search --json --timeout 3 --max 1000 sample 2>/dev/null
}

# expected [EXCEPT]: the names of every leaf's files, but leaf EXCEPT's.
expected() {
    local n
    for n in 1 2 3 4 5 6; do
        [ "leaf$n" = "${1:-}" ] && continue
        printf 'sample leaf%s %s\n' "$n" notes.txt "$n" photo.jpg "$n" movie.bin
    done
}

# missing HITS [EXCEPT]: the expected names not among the hits, one a line.
missing() {
    comm -23 <(expected "${2:-}" | sort) <(jq -r .name <<<"$1" 2>/dev/null | sort -u)
}

# until_found DEADLINE_S FROM EXCEPT [GLOBAL_FLAG...]: searches from FROM
# until every expected file (but EXCEPT's) is found or DEADLINE_S pass.
# Sets HITS (the last answer) and WHY (what was missing).
until_found() {
    local deadline=$(($(now_ms) + $1 * 1000)) from="$2" except="$3"
    shift 3
    while :; do
        HITS="$(search "$from" "$@")"
        WHY="$(missing "$HITS" "$except" | wc -l) of $(expected "$except" | wc -l) files missing, e.g. $(missing "$HITS" "$except" | head -1)"
        [ -z "$(missing "$HITS" "$except")" ] && return 0
        [ "$(now_ms)" -ge "$deadline" ] && return 1
        sleep 0.5
    done
}

# --- network_up ---------------------------------------------------------
t=$(now_ms)
log "project $COMPOSE_PROJECT_NAME"
if ! "$here/up.sh"; then
    result network_up false "$t" "deploy/up.sh failed"
    exit 1
fi
# Container ids by the labels compose puts on them (quicker than `compose ps`).
for s in supernode1 supernode2 supernode3 "${leaves[@]}"; do
    C[$s]="$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
        --filter "label=com.docker.compose.service=$s")"
done
net="$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "${C[supernode1]}")"
result network_up true "$t" "3 supernodes and 6 leaves healthy on network $net"

# --- search_every_leaf --------------------------------------------------
t=$(now_ms)
ok=true
detail="each of the 6 leaves found the 15 files of the 5 others"
for l in "${leaves[@]}"; do
    # The first search also waits for the leaves to finish registering.
    if ! until_found 60 "$l" "$l"; then
        ok=false
        detail="search from $l: $WHY"
        break
    fi
done
result search_every_leaf "$ok" "$t" "$detail"

# --- download_verified --------------------------------------------------
t=$(now_ms)
name="sample leaf4 movie.bin"
hash="$(search leaf1 | jq -r --arg n "$name" 'select(.name == $n) | .hash' | head -1)"
if [ -z "$hash" ]; then
    result download_verified false "$t" "no hit for \"$name\""
elif ! out="$(docker exec "${C[leaf1]}" leaf get --timeout 5 --out /tmp/chaos-download "$hash" 2>&1)"; then
    result download_verified false "$t" "leaf get failed: $(tail -1 <<<"$out")"
elif ! docker cp "${C[leaf1]}:/tmp/chaos-download" "$work/download" >/dev/null; then
    result download_verified false "$t" "cannot copy the download out of leaf1"
elif ! cmp -s "$work/download" "$SERVENT_SAMPLES/leaf4/$name"; then
    result download_verified false "$t" "the downloaded bytes differ from leaf4's file"
else
    result download_verified true "$t" "leaf1 got $(stat -c %s "$work/download") bytes of $hash from leaf4, equal to the original"
fi

# --- supernode_killed ---------------------------------------------------
docker kill "${C[supernode1]}" >/dev/null
t=$(now_ms)
# leaf2 still asks supernode1 too (it is in its cache): that ask times out,
# as a user's would.
if until_found 15 leaf2 ""; then
    result supernode_killed true "$t" "after docker kill supernode1, all 18 files found from leaf2"
else
    result supernode_killed false "$t" "15 s after docker kill supernode1: $WHY"
fi

# --- supernode_rejoins --------------------------------------------------
docker start "${C[supernode1]}" >/dev/null
t=$(now_ms)
if until_found 60 leaf2 "" --supernode supernode1:7400; then
    result supernode_rejoins true "$t" "supernode1 back at $(ip_of "${C[supernode1]}"): all 18 files found through it alone"
else
    result supernode_rejoins false "$t" "60 s after docker start supernode1, through it alone: $WHY"
fi

# --- partition_search, partition_heals ----------------------------------
docker network disconnect "$net" "${C[supernode2]}"
t=$(now_ms)
if until_found 15 leaf3 ""; then
    result partition_search true "$t" "supernode2 cut off: all 18 files found from leaf3"
else
    result partition_search false "$t" "15 s after supernode2 was cut off: $WHY"
fi
# Apart long enough for both sides to drop their links (leaf sessions idle
# out after 6 s, mesh links after 8 s of silence, QUIC itself later): a
# shorter cut is a blip that the old connections ride out.
while [ $(($(now_ms) - t)) -lt 20000 ]; do sleep 0.5; done
# Compose gave the container its service name as an alias; a new
# connection needs it again.
docker network connect --alias supernode2 "$net" "${C[supernode2]}"
t=$(now_ms)
if until_found 60 leaf3 "" --supernode supernode2:7400; then
    result partition_heals true "$t" "supernode2 reconnected at $(ip_of "${C[supernode2]}"): all 18 files found through it alone"
else
    result partition_heals false "$t" "60 s after supernode2 was reconnected, through it alone: $WHY"
fi

# --- leaf_new_address ---------------------------------------------------
t=$(now_ms)
old="$(ip_of "${C[leaf6]}")"
docker stop "${C[leaf6]}" >/dev/null
# Docker hands a freed address out again first: a stand-in container takes
# leaf6's, so leaf6 starts at another one. It is a supernode on loopback
# that no one knows of.
docker run -d --name "$placeholder" --network "$net" \
    --entrypoint /usr/local/bin/supernode "servent-supernode:$tag" \
    --listen 127.0.0.1:0 --data-dir /tmp/placeholder >/dev/null
docker start "${C[leaf6]}" >/dev/null
new="$(ip_of "${C[leaf6]}")"
# at_new_only HITS: every leaf6 hit has a source at the new address and none at the old.
at_new_only() {
    jq -se --arg new "$new:" --arg old "$old:" '
        map(select(.name | startswith("sample leaf6 "))) as $h
        | ($h | length) == 3
          and all($h[]; any(.addrs[]; startswith($new)) and all(.addrs[]; startswith($old) | not))' \
        <<<"$1" >/dev/null 2>&1
}
if [ -z "$new" ] || [ "$new" = "$old" ]; then
    result leaf_new_address false "$t" "leaf6 came back at the same address $old: nothing tested"
else
    deadline=$(($(now_ms) + 30000))
    until hits="$(search leaf1)" && at_new_only "$hits"; do
        [ "$(now_ms)" -ge "$deadline" ] && break
        sleep 0.5
    done
    seen="$(jq -r 'select(.name | startswith("sample leaf6 ")) | .addrs[]' <<<"$hits" 2>/dev/null | sort -u | tr '\n' ' ')"
    if ! at_new_only "$hits"; then
        result leaf_new_address false "$t" "leaf6 moved $old -> $new; after 30 s searches show it at: ${seen:-nowhere}"
    else
        name="sample leaf6 photo.jpg"
        hash="$(jq -r --arg n "$name" 'select(.name == $n) | .hash' <<<"$hits" | head -1)"
        if docker exec "${C[leaf1]}" leaf get --timeout 5 --out /tmp/chaos-leaf6 "$hash" >/dev/null 2>&1 &&
            docker cp "${C[leaf1]}:/tmp/chaos-leaf6" "$work/leaf6" >/dev/null &&
            cmp -s "$work/leaf6" "$SERVENT_SAMPLES/leaf6/$name"; then
            result leaf_new_address true "$t" "leaf6 moved $old -> $new; searches show it at ${seen}only, and a download from it is verified"
        else
            result leaf_new_address false "$t" "leaf6 moved $old -> $new and is shown there, but a download from it failed"
        fi
    fi
fi
docker rm -f "$placeholder" >/dev/null 2>&1

[ "$failed" -eq 0 ]
