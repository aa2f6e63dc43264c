#!/usr/bin/env bash
# Generates the files the six leaves of the compose network share:
# DIR/leafN/ holds "sample leafN notes.txt" (text), "sample leafN photo.jpg"
# (64 KiB) and "sample leafN movie.bin" (2 MiB), random bytes, so every file
# has its own hash. A leaf folder that exists already is left as it is.
#
#   deploy/samples.sh [DIR]        default deploy/samples
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${1:-$here/samples}"
mkdir -p "$dir"
for n in 1 2 3 4 5 6; do
    leaf="$dir/leaf$n"
    [ -d "$leaf" ] && continue
    # Made aside and renamed, so a leaf never shares a half-written folder.
    tmp="$(mktemp -d "$dir/.leaf$n.XXXXXX")"
    {
        echo "Servent sample file of leaf$n, made $(date -u +%FT%TZ)."
        head -c 3000 /dev/urandom | od -An -tx1
    } >"$tmp/sample leaf$n notes.txt"
    head -c 65536 /dev/urandom >"$tmp/sample leaf$n photo.jpg"
    head -c 2097152 /dev/urandom >"$tmp/sample leaf$n movie.bin"
    # Readable by the containers' user (10001) whatever the umask.
    chmod 0755 "$tmp"
    chmod 0644 "$tmp"/*
    mv "$tmp" "$leaf"
done
