#!/usr/bin/env bash
# Debian's SCOWL word lists for the TextArena tests (tests/integration/test_verifiers_textarena.py):
# TextArena's word games read NLTK's `words` corpus, which `nltk.download` cannot fetch without
# network; the tests build that corpus from these lists (docs/environments.md shows the same steps
# for users). Idempotent: a fast no-op once the lists are present; needs root (or sudo) and apt-get.
set -euo pipefail

[ -d /usr/share/dict/scowl ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "[install_scowl] no /usr/share/dict/scowl and no apt-get: install the scowl word lists by hand" >&2
    exit 1
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "[install_scowl] missing scowl: run as root" >&2; exit 1; }
    as_root=(sudo -n)
fi
echo "[install_scowl] installing scowl"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends scowl >/dev/null
