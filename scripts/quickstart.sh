#!/usr/bin/env bash
# Fresh machine -> CPU quickstart: creates .venv if missing, installs, builds the tiny model,
# resolves the quickstart run's config for every service. The RL run itself arrives with the
# services (see the README's status section); this script runs the most complete part that works today.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh

start=$(date +%s)
if [ ! -f models/tiny/config.json ]; then
    rlbus model tiny --out models/tiny
fi
rlbus rl @ configs/quickstart/rl.toml --dry-run
python scripts/bench/bus.py
echo "[quickstart] done in $(( $(date +%s) - start )) s: model in models/tiny, resolved configs in outputs/quickstart/configs/"
