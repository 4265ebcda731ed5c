#!/usr/bin/env bash
# OFFLINE CI ONLY (deploy/offline/README.md): builds the stand-in base images on the Docker engine that
# `docker` talks to (DOCKER_HOST), without any registry:
#   fedhl-offline/debian:bookworm       debootstrap --variant=minbase, `docker import`ed (skipped when present)
#   fedhl-offline/python:3.11-bookworm  + the host's extra CA certificates (never committed)
#   fedhl-offline/postgres:15, fedhl-offline/redis:7
# The three derived images are rebuilt on every call: unchanged, BuildKit's layer cache answers in seconds,
# and a changed Dockerfile or entrypoint takes effect. Needs root (debootstrap), docker, debootstrap.
#   FEDHL_CI_DEBIAN_MIRROR  the mirror debootstrap uses (default: the first .../debian mirror in apt's sources)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
scratch=$(mktemp -d /var/tmp/fedhl-bases.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

if ! docker image inspect fedhl-offline/debian:bookworm >/dev/null 2>&1; then
    mirror=${FEDHL_CI_DEBIAN_MIRROR:-}
    if [ -z "$mirror" ]; then
        mirror=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ \
            2>/dev/null | head -n1 | awk '{print $2}' || true)
    fi
    mirror=${mirror:-http://deb.debian.org/debian}
    echo "debootstrap bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$scratch/rootfs" "$mirror" >"$scratch/debootstrap.log" 2>&1 || {
        tail -n 50 "$scratch/debootstrap.log" >&2
        exit 1
    }
    # No init system in a container: packages must not try to start their services while installing.
    printf '#!/bin/sh\nexit 101\n' >"$scratch/rootfs/usr/sbin/policy-rc.d"
    chmod +x "$scratch/rootfs/usr/sbin/policy-rc.d"
    rm -rf "$scratch/rootfs/var/cache/apt/archives/"*.deb "$scratch/rootfs/var/lib/apt/lists/"*
    tar -C "$scratch/rootfs" --numeric-owner -c . |
        docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - fedhl-offline/debian:bookworm
    rm -rf "$scratch/rootfs"
fi

# The Python base's context: its Dockerfile and certs/ with the host's extra CA certificates.
mkdir -p "$scratch/python/certs"
cp "$here/python/Dockerfile" "$scratch/python/"
find /usr/local/share/ca-certificates -name '*.crt' -type f -exec cp {} "$scratch/python/certs/" \; 2>/dev/null || true
touch "$scratch/python/certs/.keep"

DOCKER_BUILDKIT=1 docker build -q -t fedhl-offline/python:3.11-bookworm "$scratch/python"
DOCKER_BUILDKIT=1 docker build -q -t fedhl-offline/postgres:15 "$here/postgres"
DOCKER_BUILDKIT=1 docker build -q -t fedhl-offline/redis:7 "$here/redis"
