#!/usr/bin/env bash
# Debian package of the one-service-per-host test (tests/integration/test_multi_host.py): iproute2,
# whose `ip netns` and veth links make three hosts out of this machine (the test also needs root).
# Idempotent: a fast no-op once `ip` is present.
set -euo pipefail

command -v ip >/dev/null 2>&1 && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[install_netns] iproute2 is missing: install it as root (the multi-host test will be skipped)" >&2
    exit 0
fi
echo "[install_netns] installing iproute2"
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q "$@"; }
apt_get update
apt_get install -y --no-install-recommends iproute2
