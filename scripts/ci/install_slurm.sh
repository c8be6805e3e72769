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

source "$(dirname "$0")/apt_packages.sh"
apt_install install_slurm "${missing[@]}"
