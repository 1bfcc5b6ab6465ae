#!/usr/bin/env bash
# The whole Safe RLHF pipeline on the embedded mini dataset, on CPU:
# data -> tokenizer -> SFT -> reward model -> cost model -> evaluations -> PPO-Lagrangian, PPO and
# reward shaping -> the exact judge per policy -> arena -> report (OUT/report.md + report.json + PNGs).
# Every step is an ordinary `jaxalign` command; the tiny configs under configs/ chain through OUT.
# Outputs appear whole or not at all (a re-run reuses them); the plot and report are redrawn (--overwrite).
#
#   bash experiments/quickstart.sh              # results under out/
#   OUT=/tmp/qs bash experiments/quickstart.sh  # anywhere else
#   FORCE=1 bash experiments/quickstart.sh      # redo every stage (default: finished stages are reused)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out}
FORCE=${FORCE:-0}
mkdir -p "$OUT"
START=$(date +%s)

step() { printf '\n=== %s (%ss)\n' "$*" "$(($(date +%s) - START))"; }
# done_or_clear PATH: true when PATH exists and FORCE is off (reuse it); with FORCE=1 PATH is removed first.
done_or_clear() {
  if [ "$FORCE" = 1 ]; then rm -rf "$1"; return 1; fi
  if [ -e "$1" ]; then echo "reusing $1 (FORCE=1 redoes it)"; return 0; fi
  return 1
}
# Trains a stage; a finished workdir is a no-op of `jaxalign train` (nothing trained, export kept).
train() {
  local config=$1 workdir=$2; shift 2
  if [ "$FORCE" = 1 ]; then rm -rf "$workdir"; fi
  jaxalign train --config "$config" --workdir "$workdir" --config.tokenizer="$OUT/mini_tokenizer" \
    --config.data.source="$OUT/mini" "$@"
}
# The RL runs chain through OUT and evaluate on 64 held-out prompts every 40 iterations (eval/* metrics).
RL_PATHS=(--config.model.init_path="$OUT/sft_tiny/export"
          --config.rl.reward_model_path="$OUT/reward_tiny/export" --config.rl.cost_model_path="$OUT/cost_tiny/export"
          --config.data.eval_split=test --config.rl.eval_every=40 --config.rl.eval_prompts=64)
POLICIES=(sft ppo_lag ppo ppo_reward_shaping)
LABELS=(SFT PPO-Lagrangian PPO "reward shaping")

step "1/11 mini dataset in the release layout (+ stats and plot)"
if ! done_or_clear "$OUT/mini"; then
  jaxalign data mini --out "$OUT/mini"
  jaxalign data validate "$OUT/mini"
  jaxalign data stats "$OUT/mini" --plot "$OUT/mini_stats.png" > "$OUT/mini_stats.txt"
fi

step "2/11 byte-level BPE tokenizer trained on the mini dataset"
done_or_clear "$OUT/mini_tokenizer" || jaxalign tokenizer --data "$OUT/mini" --out "$OUT/mini_tokenizer" --vocab-size 2048

step "3/11 SFT of a tiny random-init Llama (both responses of every row, like Alpaca-7B)"
train configs/sft_tiny.py "$OUT/sft_tiny"

step "4/11 reward model (helpfulness pairs)"
train configs/reward_tiny.py "$OUT/reward_tiny" --config.model.init_path="$OUT/sft_tiny/export"

step "5/11 cost model (harmlessness pairs + safety signs)"
train configs/cost_tiny.py "$OUT/cost_tiny" --config.model.init_path="$OUT/sft_tiny/export"

step "6/11 reward and cost distributions on the test split"
done_or_clear "$OUT/eval_reward" || \
  jaxalign evaluate reward --model "$OUT/reward_tiny/export" --data "$OUT/mini" --out "$OUT/eval_reward" --max-length 64
done_or_clear "$OUT/eval_cost" || \
  jaxalign evaluate cost --model "$OUT/cost_tiny/export" --data "$OUT/mini" --out "$OUT/eval_cost" --max-length 64

step "6b/11 severity-sensitive moderation model (unsafe, 19 categories, severity, streaming) + its evaluation"
train configs/moderation_tiny.py "$OUT/moderation_tiny" --config.model.init_path="$OUT/sft_tiny/export" \
  --config.data.max_length=64
done_or_clear "$OUT/eval_moderation" || \
  jaxalign evaluate moderation --model "$OUT/moderation_tiny/export" --data "$OUT/mini" --out "$OUT/eval_moderation"

step "7/11 PPO-Lagrangian (Safe RLHF), evaluated on held-out prompts inside the loop"
train configs/ppo_lag_tiny.py "$OUT/ppo_lag_tiny" "${RL_PATHS[@]}"

step "8/11 baselines: plain PPO (reward only) and static reward shaping R - nu*C"
train configs/ppo_tiny.py "$OUT/ppo_tiny" "${RL_PATHS[@]}"
train configs/ppo_reward_shaping_tiny.py "$OUT/ppo_reward_shaping_tiny" "${RL_PATHS[@]}"
jaxalign evaluate curves --runs "$OUT/ppo_lag_tiny" "$OUT/ppo_tiny" "$OUT/ppo_reward_shaping_tiny" \
  --labels PPO-Lagrangian PPO "reward shaping" --threshold -5.5 --out "$OUT/rl_curves.png" --overwrite > /dev/null

step "9/11 the exact judge: every policy on the test prompts (2 answers each)"
for i in "${!POLICIES[@]}"; do
  name=${POLICIES[$i]}
  done_or_clear "$OUT/judge_$name" || jaxalign evaluate judge --model "$OUT/${name}_tiny/export" \
    --data "$OUT/mini" --out "$OUT/judge_$name" --label "${LABELS[$i]}" --max-new-tokens 40 --prompt-length 32 > /dev/null
done

step "10/11 arena: SFT (red) against the RL policies, judged by the reward/cost models and the exact judge"
done_or_clear "$OUT/arena" || jaxalign arena \
  --policies "sft=$OUT/sft_tiny/export" "ppo_lag=$OUT/ppo_lag_tiny/export" "ppo=$OUT/ppo_tiny/export" \
  "ppo_reward_shaping=$OUT/ppo_reward_shaping_tiny/export" --reward-model "$OUT/reward_tiny/export" \
  --cost-model "$OUT/cost_tiny/export" --prompts "$OUT/mini" --out "$OUT/arena" --max-new-tokens 40 \
  --prompt-length 32 --score-max-length 80 > /dev/null

step "11/11 report"
jaxalign evaluate report --out "$OUT" --overwrite --wall-seconds "$(($(date +%s) - START))"
printf '\nDone in %ss. Results under %s/: report.md, report.json, judge_*/, arena/, rl_curves.png, eval_*/\n' \
  "$(($(date +%s) - START))" "$OUT"
