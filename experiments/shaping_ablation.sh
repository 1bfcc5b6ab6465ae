#!/usr/bin/env bash
# The Safe RLHF paper's ablation on mini: static reward shaping R - nu*C for a sweep of nu against
# PPO-Lagrangian, every policy judged by the exact judge, one harmlessness-vs-helpfulness plot.
# Run after the quickstart (its SFT, reward and cost models, tokenizer and PPO-Lagrangian policy):
#
#   bash experiments/quickstart.sh && bash experiments/shaping_ablation.sh     # OUT=out, NUS="0.01 ... 100"
#
# Writes OUT/ablation/comparison.{md,json,png}; finished runs and judge results are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out}
NUS=${NUS:-"0.01 0.5 1 2 5 10 100"}
DIR="$OUT/ablation"
mkdir -p "$DIR"
judge() {  # name model_dir
  [ -e "$DIR/judge_$1/judge.json" ] || jaxalign evaluate judge --model "$2" --data "$OUT/mini" --out "$DIR/judge_$1" \
    --label "$1" --max-new-tokens 40 --prompt-length 32 > /dev/null
}
judge sft "$OUT/sft_tiny/export"
judge ppo_lag "$OUT/ppo_lag_tiny/export"
methods=(sft ppo_lag)
for nu in $NUS; do
  name="shaping_nu$nu"
  jaxalign train --config configs/ppo_reward_shaping_tiny.py --workdir "$DIR/${name}" \
    --config.tokenizer="$OUT/mini_tokenizer" --config.data.source="$OUT/mini" \
    --config.model.init_path="$OUT/sft_tiny/export" --config.rl.reward_model_path="$OUT/reward_tiny/export" \
    --config.rl.cost_model_path="$OUT/cost_tiny/export" --config.rl.ppo_reward_shaping.nu="$nu"
  judge "$name" "$DIR/${name}/export"
  methods+=("$name")
done
python experiments/compare_methods.py --dir "$DIR" --methods "${methods[@]}"
