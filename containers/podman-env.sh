#!/usr/bin/env bash
# Source this file to run Debian's podman (4.3) on a machine like our CI runners, without touching the
# machine's own podman configuration:
#   source containers/podman-env.sh && loraserve_base_image && podman build ...
# What was needed to run containers there at all (docs/deployment.md, "Building the images"):
#   runtime runc (crun fails on hybrid cgroup hosts), cgroup_manager cgroupfs (no systemd), a file events logger
#   (no journald), default ulimits below the host's hard limits; storage in a private directory.
# LORASERVE_CONTAINERS_DIR (default: .cache/containers in the checkout, git-ignored) holds the configuration,
# the image store and the cached Debian root filesystem, so a second run reuses every layer.
_lcs_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LORASERVE_CONTAINERS_DIR="${LORASERVE_CONTAINERS_DIR:-$_lcs_root/.cache/containers}"
#: The name the Dockerfiles' FROM uses (ARG BASE); the local copy is imported under exactly this name.
export LORASERVE_BASE_IMAGE="${LORASERVE_BASE_IMAGE:-docker.io/library/debian:bookworm-slim}"
LORASERVE_DEBIAN_MIRROR="${LORASERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$LORASERVE_CONTAINERS_DIR/storage" "$LORASERVE_CONTAINERS_DIR/run"
cat > "$LORASERVE_CONTAINERS_DIR/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$LORASERVE_CONTAINERS_DIR/run/events.log"
CONF
cat > "$LORASERVE_CONTAINERS_DIR/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$LORASERVE_CONTAINERS_DIR/storage"
runroot = "$LORASERVE_CONTAINERS_DIR/run"
CONF
export CONTAINERS_CONF="$LORASERVE_CONTAINERS_DIR/containers.conf"
export CONTAINERS_STORAGE_CONF="$LORASERVE_CONTAINERS_DIR/storage.conf"

# Make LORASERVE_BASE_IMAGE available without a registry: a `debootstrap --variant=minbase bookworm` root
# filesystem (cached as a tarball), imported with `podman import`. Idempotent; returns at once when present.
loraserve_base_image() {
  if podman image exists "$LORASERVE_BASE_IMAGE" 2>/dev/null; then
    return 0
  fi
  local tarball="$LORASERVE_CONTAINERS_DIR/debian-bookworm-minbase.tar"
  if [ ! -s "$tarball" ]; then
    local rootfs
    rootfs="$(mktemp -d "$LORASERVE_CONTAINERS_DIR/rootfs.XXXXXX")"
    debootstrap --variant=minbase bookworm "$rootfs" "$LORASERVE_DEBIAN_MIRROR" >"$LORASERVE_CONTAINERS_DIR/debootstrap.log" 2>&1 \
      || { tail -20 "$LORASERVE_CONTAINERS_DIR/debootstrap.log" >&2; rm -rf "$rootfs"; return 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  podman import --change 'CMD ["/bin/bash"]' "$tarball" "$LORASERVE_BASE_IMAGE" >/dev/null
}
