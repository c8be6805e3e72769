#!/usr/bin/env bash
# Fresh machine -> whole test suite: creates .venv if missing, installs, runs pytest.
# Extra arguments go to pytest (e.g. ./scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# System services some integration tests start for real (SLURM, Docker, ...): each
# scripts/ci/install_*.sh is idempotent and a fast no-op once its packages are present.
for installer in scripts/ci/install_*.sh; do
    [ -e "$installer" ] && bash "$installer"
done

set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "[test] pytest collected no tests (exit 5): nothing was tested" >&2
    exit 1
fi
exit "$status"
