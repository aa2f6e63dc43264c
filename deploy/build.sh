#!/usr/bin/env bash
# Builds the statically linked release binaries of `supernode` and `leaf`
# and the container images servent-supernode and servent-leaf around them
# (deploy/Dockerfile, FROM scratch: no registry is needed).
#
#   deploy/build.sh              binaries and both images, tagged :latest
#   SERVENT_TAG=0.1.0 deploy/build.sh
#
# The binaries come from a cargo profile of their own, `deploy` (release
# optimisations, no debug info, stripped), defined here on the command line
# so the workspace's Cargo.toml stays as it is. With an explicit --target
# they land in target/x86_64-unknown-linux-gnu/deploy/, apart from
# `cargo build --release`, which they never invalidate.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cargo="${CARGO:-cargo}"
triple=x86_64-unknown-linux-gnu
tag="${SERVENT_TAG:-latest}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
out="$target_dir/$triple/deploy"

say() { printf 'build.sh: %s\n' "$*" >&2; }

command -v docker >/dev/null || { echo "error: docker is not installed" >&2; exit 1; }

start=$SECONDS
say "static binaries ($triple, profile deploy)"
# crt-static links glibc statically; with an explicit --target the flag
# applies to our binaries only, not to build scripts and proc macros.
# glibc (2.34 and later) has its files and dns name services built in, so
# the static binaries still resolve `supernode1:7400` from /etc/hosts and
# the container network's DNS.
unset CARGO_ENCODED_RUSTFLAGS
(
    cd "$root"
    RUSTFLAGS="-C target-feature=+crt-static" "$cargo" \
        --config 'profile.deploy.inherits="release"' \
        --config 'profile.deploy.debug=false' \
        --config 'profile.deploy.strip=true' \
        build --locked --profile deploy --target "$triple" \
        -p servent-supernode -p servent-leaf --bins
)
for bin in supernode leaf; do
    # A dynamically linked binary would have an interpreter (ld.so) that a
    # scratch image does not have.
    if command -v readelf >/dev/null && readelf -l "$out/$bin" | grep -q 'interpreter'; then
        echo "error: $out/$bin is not statically linked" >&2
        exit 1
    fi
done
say "binaries built in $((SECONDS - start)) s"

# The build context: the binaries and a minimal root file system.
#   rootfs/etc/passwd, rootfs/etc/group   user and group 10001 "servent"
#   rootfs/tmp                            mode 1777
#   data/, share/                         empty: the volume and the share mount point
ctx="$out/image-context"
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/etc" "$ctx/rootfs/tmp" "$ctx/data" "$ctx/share"
printf 'root:x:0:0:root:/:/sbin/nologin\nservent:x:10001:10001:servent:/data:/sbin/nologin\n' \
    >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nservent:x:10001:\n' >"$ctx/rootfs/etc/group"
chmod 0755 "$ctx/rootfs" "$ctx/rootfs/etc" "$ctx/data" "$ctx/share"
chmod 0644 "$ctx/rootfs/etc/passwd" "$ctx/rootfs/etc/group"
chmod 1777 "$ctx/rootfs/tmp"
cp "$out/supernode" "$out/leaf" "$ctx/"

images_start=$SECONDS
for role in supernode leaf; do
    say "image servent-$role:$tag"
    docker build --quiet -f "$here/Dockerfile" --target "$role" \
        --label "org.opencontainers.image.title=servent-$role" \
        -t "servent-$role:$tag" "$ctx" >/dev/null
    # The image this tag named before, if no container uses it any more.
    docker image prune -f --filter "label=org.opencontainers.image.title=servent-$role" >/dev/null
done
say "images built in $((SECONDS - images_start)) s ($(docker image inspect -f '{{.Size}}' "servent-supernode:$tag") and $(docker image inspect -f '{{.Size}}' "servent-leaf:$tag") bytes)"
