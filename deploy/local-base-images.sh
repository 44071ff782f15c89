#!/usr/bin/env bash
# Lantern's base images made from Debian's own packages, for hosts that reach no image
# registry (an offline site, a mirror-only network, this project's CI):
#
#   deploy/local-base-images.sh
#   export LANTERN_BASE_IMAGE=lantern-local/debian:bookworm LANTERN_REDIS_IMAGE=lantern-local/redis:bookworm
#   docker compose build && docker compose up -d
#
# The base is a debootstrap of the host's Debian release (bookworm elsewhere; SUITE= to choose)
# that trusts the host's CA bundle, so that apt and pip inside builds trust what the host
# trusts (a site's TLS-inspecting proxy included). The Redis image is Debian's redis-server on
# that base. Images that already exist are kept: the engine is the cache between runs.
set -euo pipefail

. /etc/os-release
SUITE=${SUITE:-$([ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-bookworm}" || echo bookworm)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BASE=${LANTERN_BASE_IMAGE:-lantern-local/debian:$SUITE}
REDIS=${LANTERN_REDIS_IMAGE:-lantern-local/redis:$SUITE}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

if docker image inspect "$BASE" >/dev/null 2>&1; then
  echo "base image $BASE: already made"
else
  command -v debootstrap >/dev/null || { $SUDO apt-get update && $SUDO apt-get install -y debootstrap; }
  work=$(mktemp -d)
  trap '$SUDO rm -rf "$work"' EXIT
  echo "base image $BASE: debootstrap $SUITE from $MIRROR"
  $SUDO debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$work/rootfs" "$MIRROR" \
    > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
  # Both places: the bundle pip and apt read now, and the directory update-ca-certificates
  # reads when a later package regenerates that bundle.
  $SUDO install -m 0644 "$HOST_CA" "$work/rootfs/usr/local/share/ca-certificates/host-bundle.crt"
  $SUDO install -m 0644 "$HOST_CA" "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
  $SUDO rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  # pip and uv (which `bentoml containerize` uses) carry their own CA lists; point both at
  # the system bundle, as on the host.
  $SUDO tar -C "$work/rootfs" -c . | docker import \
    -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    -c 'CMD ["bash"]' - "$BASE" >/dev/null
  echo "base image $BASE: made"
fi

if docker image inspect "$REDIS" >/dev/null 2>&1; then
  echo "redis image $REDIS: already made"
else
  # The same layout as the official image: redis-server and redis-cli on PATH, user redis,
  # data in /data.
  # The classic builder: a plain `docker` client has no buildx to drive BuildKit with.
  DOCKER_BUILDKIT=0 docker build --quiet -t "$REDIS" - >/dev/null <<DOCKERFILE
FROM $BASE
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
CMD ["redis-server"]
DOCKERFILE
  echo "redis image $REDIS: made"
fi
