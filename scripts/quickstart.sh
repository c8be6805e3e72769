#!/usr/bin/env bash
# Fresh machine -> a tiny model that visibly learns reverse-text with RL, on a CPU.
#   1. install (.venv, once), 2. build the tiny model, 3. SFT warm-up on synthetic reverse-text,
#   4. RL with all five services (rlbus rl), 5. a summary: reward over the first and last
#   RL steps, mismatch KL, wall time per phase. Configs: configs/quickstart/{model,sft,rl}.toml.
# Everything lands in outputs/quickstart/ (sft/ and rl/ are replaced on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
source scripts/setup_env.sh
installed=$(date +%s)
# vLLM's CPU KV cache, GiB: the 1M-parameter model needs a few MB; the default would reserve more.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"

OUT=outputs/quickstart
CONFIGS=configs/quickstart
SFT_STEPS=$(python -c "import tomllib; print(tomllib.load(open('$CONFIGS/sft.toml', 'rb'))['max_steps'])")
SFT_WEIGHTS="$OUT/sft/weights/step_$SFT_STEPS"

say() { printf '\n[quickstart] %s\n' "$*"; }
now() { date +%s; }

say "1/3 building the tiny model (configs/quickstart/model.toml)"
rlbus model tiny @ "$CONFIGS/model.toml"
model_done=$(now)

say "2/3 SFT warm-up: $SFT_STEPS steps on synthetic reverse-text"
rm -rf "$OUT/sft"
rlbus sft @ "$CONFIGS/sft.toml"
sft_done=$(now)

say "3/3 RL on reverse-text from $SFT_WEIGHTS: inference, trainer, orchestrator, env-worker, monitor"
say "    (vLLM takes a minute or two to start on a CPU; live view in another shell: rlbus tail @ $OUT/rl/configs/rl.toml)"
rlbus rl @ "$CONFIGS/rl.toml" --model "$SFT_WEIGHTS" --clean-output-dir
rl_done=$(now)

say "summary (from $OUT/rl/metrics.jsonl)"
python scripts/summarize_run.py "$OUT/rl" --phase "install=$((installed - start))" \
    --phase "model=$((model_done - installed))" \
    --phase "sft=$((sft_done - model_done))" --phase "rl=$((rl_done - sft_done))"
