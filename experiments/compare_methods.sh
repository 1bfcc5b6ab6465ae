#!/usr/bin/env bash
# The methods compared on mini, after the quickstart (its SFT, reward and cost models and tokenizer):
# PPO, PPO-Lagrangian, Safe GRPO, DPO, SafeDPO, C-DPO, IPO, SimPO, KTO and single-preference PPO, each judged by the
# exact judge, then one table and one scatter plot (OUT/comparison.md, OUT/comparison.png).
#
#   bash experiments/quickstart.sh && bash experiments/compare_methods.sh      # OUT=out
# A finished workdir or judge result is reused (jaxalign train is then a no-op and its time is the no-op's).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out}
COMMON=(--config.tokenizer="$OUT/mini_tokenizer" --config.data.source="$OUT/mini" --config.model.init_path="$OUT/sft_tiny/export")
SCORES_RL=(--config.rl.reward_model_path="$OUT/reward_tiny/export" --config.rl.cost_model_path="$OUT/cost_tiny/export")
SCORES_DPO=(--config.dpo.reward_model_path="$OUT/reward_tiny/export" --config.dpo.cost_model_path="$OUT/cost_tiny/export")
: > "$OUT/times.txt"
judge() {  # name model_dir
  [ -e "$OUT/judge_$1/judge.json" ] || jaxalign evaluate judge --model "$2" --data "$OUT/mini" --out "$OUT/judge_$1" \
    --label "$1" --max-new-tokens 40 --prompt-length 32 > /dev/null
}
run() {  # name config args...: train (GNU time: wall seconds and peak RSS into OUT/times.txt), then judge
  local name=$1 config=$2; shift 2
  /usr/bin/time -f "TIME $name %e s %M KB" -a -o "$OUT/times.txt" \
    jaxalign train --config "$config" --workdir "$OUT/${name}_tiny" "${COMMON[@]}" "$@"
  judge "$name" "$OUT/${name}_tiny/export"
}
judge sft "$OUT/sft_tiny/export"
run dpo configs/dpo_tiny.py
run safe_dpo configs/safe_dpo_tiny.py
run c_dpo configs/c_dpo_tiny.py "${SCORES_DPO[@]}"
run ipo configs/ipo_tiny.py
run simpo configs/simpo_tiny.py
run kto configs/kto_tiny.py
python experiments/mini_single.py --mini "$OUT/mini" --out "$OUT/mini_single" > /dev/null
jaxalign train --config configs/reward_single_tiny.py --workdir "$OUT/reward_single_tiny" "${COMMON[@]}" \
  --config.data.source="$OUT/mini_single"
run safe_grpo configs/safe_grpo_tiny.py "${SCORES_RL[@]}"
run ppo_single configs/ppo_single_tiny.py "${SCORES_RL[@]}" --config.rl.reward_model_path="$OUT/reward_single_tiny/export"
run ppo_lag configs/ppo_lag_tiny.py "${SCORES_RL[@]}"
run ppo configs/ppo_tiny.py "${SCORES_RL[@]}"
python experiments/compare_methods.py --dir "$OUT" --times "$OUT/times.txt" \
  --methods sft ppo ppo_lag safe_grpo dpo safe_dpo c_dpo ipo simpo kto ppo_single
