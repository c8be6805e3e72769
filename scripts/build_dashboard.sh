#!/usr/bin/env bash
# Bundles the dashboard's charting library into the package: npm ci installs what
# services/monitor/web/package-lock.json pins (uPlot), and its browser build is copied into
# services/monitor/static/ (git-ignored, shipped as package data), so the page the monitor and
# `rlbus dashboard` serve loads nothing from the internet. Sourced by setup_env.sh; also runs alone.
# A fast no-op once static/ holds the files of the current lock file.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WEB="$ROOT/services/monitor/web"
STATIC="$ROOT/services/monitor/static"
stamp="$STATIC/.lock-sha256"
want="$(sha256sum "$WEB/package-lock.json" | cut -d' ' -f1)"

if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -f "$STATIC/uPlot.iife.min.js" ] && [ -f "$STATIC/uPlot.min.css" ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "[dashboard] npm is missing: install Node.js and npm (Debian: apt-get install nodejs npm), then" \
         "run scripts/build_dashboard.sh" >&2
    exit 1
fi
echo "[dashboard] bundling uPlot from npm into $STATIC"
(cd "$WEB" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
mkdir -p "$STATIC"
cp "$WEB/node_modules/uplot/dist/uPlot.iife.min.js" "$WEB/node_modules/uplot/dist/uPlot.min.css" "$STATIC/"
cp "$WEB/node_modules/uplot/LICENSE" "$STATIC/uPlot.LICENSE"
echo "$want" > "$stamp"
