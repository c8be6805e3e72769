#!/usr/bin/env bash
# Debian packages of the SLURM and live-tailing tests (tests/integration/test_slurm.py,
# tests/integration/test_tmux.py): slurm-wlm + munge (a real single-node SLURM started by
# hand, see docs/slurm.md) and tmux (scripts/tmux.sh). Idempotent: a fast no-op once the
# binaries are present; needs root (or sudo) and apt-get otherwise.
set -euo pipefail

missing=()
command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
    && command -v sbatch >/dev/null 2>&1 || missing+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || missing+=(munge)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
[ "${#missing[@]}" -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "[install_slurm] missing ${missing[*]} and no apt-get: install them by hand" >&2
    exit 1
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "[install_slurm] missing ${missing[*]}: run as root" >&2; exit 1; }
    as_root=(sudo -n)
fi
echo "[install_slurm] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
