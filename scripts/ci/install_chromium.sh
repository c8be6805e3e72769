#!/usr/bin/env bash
# Debian's Chromium and its chromedriver, for the dashboard's browser test
# (tests/integration/test_dashboard.py drives a headless Chromium through Selenium and the system
# /usr/bin/chromedriver: nothing is downloaded at test time). Idempotent: a fast no-op once both
# binaries are present; needs root (or sudo) and apt-get otherwise.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
[ "${#missing[@]}" -eq 0 ] && exit 0

source "$(dirname "$0")/apt_packages.sh"
apt_install install_chromium "${missing[@]}"
