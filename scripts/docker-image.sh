#!/usr/bin/env bash
# Builds the exactly container image on a machine that has a Docker engine but no image
# registry (nothing is pulled). Elsewhere `docker build -t exactly .` is the ordinary way.
#
#   scripts/docker-image.sh [IMAGE]       default IMAGE: $EXACTLY_IMAGE or exactly:local
#
# 1. The base image ($EXACTLY_BASE_IMAGE, default exactly-base:bookworm): reused when the engine
#    has it, else made here: a Debian bookworm minbase root file system from debootstrap (from
#    $EXACTLY_DEBIAN_MIRROR, default deb.debian.org; debootstrap is installed with apt-get when
#    missing), with tini and bookworm's security updates, trimmed and `docker import`ed.
#    EXACTLY_REBUILD_BASE=1 makes it afresh. It is a pure function of the Debian archive, so it
#    caches nothing we could not rebuild.
# 2. The binaries: `cargo build --release` on this host (Debian bookworm, so they link against
#    the same glibc as the base), stripped of debug info into a small build context.
# 3. `docker build` of the repository's Dockerfile with that base as both the builder and the
#    runtime image and PREBUILT pointing at the binaries: same Dockerfile, same image layout.
#
# Prints the image name as the last line.
set -euo pipefail
cd "$(dirname "$0")/.."

image=${1:-${EXACTLY_IMAGE:-exactly:local}}
base=${EXACTLY_BASE_IMAGE:-exactly-base:bookworm}
mirror=${EXACTLY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${EXACTLY_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

log() { printf 'docker-image: %s\n' "$*" >&2; }

make_base() {
  if ! command -v debootstrap >/dev/null; then
    if [[ $(id -u) -ne 0 ]]; then
      log "debootstrap is missing and this is not root: install it (apt-get install debootstrap)"
      exit 1
    fi
    log "installing debootstrap"
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends debootstrap >&2
  fi
  if [[ $(id -u) -ne 0 ]]; then
    log "debootstrap needs root: run this script as root (or with sudo) once to make $base"
    exit 1
  fi
  local rootfs
  rootfs=$(mktemp -d /tmp/exactly-rootfs.XXXXXX)
  # shellcheck disable=SC2064 # expand now: the variable is local
  trap "rm -rf --one-file-system '$rootfs'" EXIT
  log "debootstrap bookworm (minbase + tini) from $mirror into $rootfs"
  debootstrap --variant=minbase --include=tini bookworm "$rootfs" "$mirror" >&2
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security_mirror bookworm-security main
EOF
  log "applying bookworm-updates and bookworm-security"
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get -o Acquire::Languages=none update -q && apt-get upgrade -y -q' >&2
  # Trim what a container never reads, as Debian's own slim images do.
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
  find "$rootfs"/usr/share/doc -type f ! -name copyright -delete
  log "importing the root file system as $base"
  tar --numeric-owner -C "$rootfs" -c . |
    docker import --change 'CMD ["/bin/bash"]' \
      --message "Debian bookworm minbase + tini, debootstrap from $mirror" - "$base" >&2
  rm -rf --one-file-system "$rootfs"
  trap - EXIT
}

if [[ ${EXACTLY_REBUILD_BASE:-0} == 1 ]] || ! docker image inspect "$base" >/dev/null 2>&1; then
  make_base
else
  log "reusing the base image $base (EXACTLY_REBUILD_BASE=1 makes it afresh)"
fi

log "cargo build --release (exactlyd, exactly-exec-guard, exactly, exactly-sink)"
cargo build --release --locked --bin exactlyd --bin exactly-exec-guard --bin exactly \
  --bin exactly-sink >&2

context=target/docker-context
rm -rf "$context"
mkdir -p "$context/prebuilt" "$context/scripts"
for bin in exactlyd exactly-exec-guard exactly exactly-sink; do
  # The release profile keeps line tables for profiling; the image does not need them.
  strip --strip-debug -o "$context/prebuilt/$bin" "target/release/$bin"
done
cp Dockerfile "$context/"
cp scripts/docker-entrypoint.sh scripts/docker-healthcheck.sh scripts/docker-certs.sh "$context/scripts/"

previous=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
log "docker build -t $image (base $base, prebuilt binaries)"
docker build --quiet \
  --build-arg RUST_IMAGE="$base" \
  --build-arg RUNTIME_IMAGE="$base" \
  --build-arg PREBUILT=prebuilt \
  -t "$image" "$context" >&2
# The legacy builder keeps the builder stage as an untagged image; it is only a copy step here.
docker image prune -f --filter label=exactly.stage=builder >/dev/null
# The image this build replaced, if nothing uses it any more.
if [[ -n $previous && $previous != "$(docker image inspect --format '{{.Id}}' "$image")" ]]; then
  docker rmi "$previous" >/dev/null 2>&1 || true
fi
echo "$image"
