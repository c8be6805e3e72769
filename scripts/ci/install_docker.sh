#!/usr/bin/env bash
# Installs what the compose CI test needs from Debian: a Docker engine (docker.io: dockerd,
# containerd, runc, the docker CLI) and debootstrap (to build the base image without a registry).
# Idempotent: a fast no-op when everything is present. Needs root (CI runs as root).
set -euo pipefail

PACKAGES=(docker.io debootstrap)
need=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "[install_docker] need root to install: ${need[*]}" >&2
    exit 1
fi
echo "[install_docker] installing ${need[*]}"
# Other jobs may hold the dpkg lock: wait for it instead of failing.
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q "$@"; }
apt_get update
# No systemd here: the test starts dockerd by hand, so the package's service is never used.
apt_get install -y --no-install-recommends "${need[@]}"
