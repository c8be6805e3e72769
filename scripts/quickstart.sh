#!/usr/bin/env bash
# Fresh machine -> a tiny model whose held-out accuracy RL visibly raises, on a CPU.
#   1. install (.venv, once), 2. build the tiny model, 3. SFT warm-up on a flawed teacher's answers to
#   first-letter (the last letter 60% of the time), 4. RL with all five services (rlbus rl), greedy
#   held-out eval before and after, 5. SFT alone for the same minutes, same eval, 6. a summary ending
#   with `eval before <avg@1> after <avg@1>`. Configs: configs/quickstart/model.toml (the model),
#   configs/first_letter/{sft,rl}.toml. Everything lands in outputs/quickstart/ (replaced on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
source scripts/setup_env.sh
installed=$(date +%s)
# vLLM's CPU KV cache, GiB: the 1M-parameter model needs a few MB; the default would reserve more.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"

OUT=outputs/quickstart
CONFIGS=configs/first_letter
EVAL=first-letter-greedy
SFT_STEPS=$(python -c "import tomllib; print(tomllib.load(open('$CONFIGS/sft.toml', 'rb'))['max_steps'])")
SFT_WEIGHTS="$OUT/sft/weights/step_$SFT_STEPS"

say() { printf '\n[quickstart] %s\n' "$*"; }
now() { date +%s; }

say "1/4 building the tiny model (configs/quickstart/model.toml)"
rlbus model tiny @ configs/quickstart/model.toml
model_done=$(now)

say "2/4 SFT warm-up: $SFT_STEPS steps on a flawed teacher's first-letter answers"
rm -rf "$OUT/sft" "$OUT/sft_only"
rlbus sft @ "$CONFIGS/sft.toml"
sft_done=$(now)

say "3/4 RL on first-letter from $SFT_WEIGHTS: inference, trainer, orchestrator, env-worker, monitor"
say "    (greedy eval on held-out words before and after; live view: rlbus tail @ $OUT/rl/configs/rl.toml)"
rlbus rl @ "$CONFIGS/rl.toml" --model "$SFT_WEIGHTS" --clean-output-dir
rl_done=$(now)

# The comparison: what the RL phase's minutes buy when spent on more SFT instead (the warm-up's
# measured step rate), evaluated the same way.
more_steps=$(python scripts/sft_steps_for.py "$OUT/sft/steps.jsonl" "$((rl_done - sft_done))")
say "4/4 SFT alone for the same $((rl_done - sft_done)) s: $more_steps more steps, then the same greedy eval"
rlbus sft @ "$CONFIGS/sft.toml" --model "$SFT_WEIGHTS" --output-dir "$OUT/sft_only" --max-steps "$more_steps"
python scripts/eval_weights.py "$OUT/sft_only/weights/step_$more_steps" "$OUT/rl/configs/orchestrator.toml" \
    "$OUT/sft_only"
compare_done=$(now)

say "summary (from $OUT/rl/metrics.jsonl)"
python scripts/summarize_run.py "$OUT/rl" --phase "install=$((installed - start))" \
    --phase "model=$((model_done - installed))" --phase "sft=$((sft_done - model_done))" \
    --phase "rl=$((rl_done - sft_done))" --phase "sft-alone=$((compare_done - rl_done))" \
    --eval "$EVAL" --compare "SFT alone for the RL phase's minutes=$OUT/sft_only/eval/metrics.json"
