#!/usr/bin/env bash
# Debian's SCOWL word lists for the TextArena tests (tests/integration/test_verifiers_textarena.py):
# TextArena's word games read NLTK's `words` corpus, which `nltk.download` cannot fetch without
# network; the tests build that corpus from these lists (docs/environments.md shows the same steps
# for users). Idempotent: a fast no-op once the lists are present; needs root (or sudo) and apt-get.
set -euo pipefail

[ -d /usr/share/dict/scowl ] && exit 0
source "$(dirname "$0")/apt_packages.sh"
apt_install install_scowl scowl
