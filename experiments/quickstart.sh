#!/usr/bin/env bash
# The whole Safe RLHF pipeline on the embedded mini dataset, on CPU, in a few minutes:
# data -> tokenizer -> SFT -> reward model -> cost model -> evaluations -> PPO-Lagrangian -> sample.
# Every step is an ordinary `jaxalign` command; the tiny configs under configs/ chain through out/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
OUT=out
mkdir -p "$OUT"

step() { printf '\n=== %s\n' "$*"; }

step "1/9 mini dataset in the release layout (+ stats and plot)"
jaxalign data mini --out "$OUT/mini"
jaxalign data validate "$OUT/mini"
jaxalign data stats "$OUT/mini" --plot "$OUT/mini_stats.png" > "$OUT/mini_stats.txt"

step "2/9 byte-level BPE tokenizer trained on the mini dataset"
jaxalign tokenizer --data "$OUT/mini" --out "$OUT/mini_tokenizer" --vocab-size 1024

step "3/9 SFT of a tiny random-init Llama"
jaxalign train --config configs/sft_tiny.py --workdir "$OUT/sft_tiny"

step "4/9 reward model (helpfulness pairs)"
jaxalign train --config configs/reward_tiny.py --workdir "$OUT/reward_tiny"

step "5/9 cost model (harmlessness pairs + safety signs)"
jaxalign train --config configs/cost_tiny.py --workdir "$OUT/cost_tiny"

step "6/9 reward and cost distributions on the test split"
jaxalign evaluate reward --model "$OUT/reward_tiny/export" --data "$OUT/mini" --out "$OUT/eval_reward"
jaxalign evaluate cost --model "$OUT/cost_tiny/export" --data "$OUT/mini" --out "$OUT/eval_cost"

step "6b/9 severity-sensitive moderation model (unsafe, 19 categories, severity, streaming) + its evaluation"
jaxalign train --config configs/moderation_tiny.py --workdir "$OUT/moderation_tiny"
jaxalign evaluate moderation --model "$OUT/moderation_tiny/export" --data "$OUT/mini" --out "$OUT/eval_moderation"

step "7/9 PPO-Lagrangian (Safe RLHF)"
jaxalign train --config configs/ppo_lag_tiny.py --workdir "$OUT/ppo_lag_tiny"

step "8/9 baselines: plain PPO (reward only) and static reward shaping R - nu*C"
jaxalign train --config configs/ppo_tiny.py --workdir "$OUT/ppo_tiny"
jaxalign train --config configs/ppo_reward_shaping_tiny.py --workdir "$OUT/ppo_reward_shaping_tiny"
jaxalign evaluate curves --runs "$OUT/ppo_lag_tiny" "$OUT/ppo_tiny" "$OUT/ppo_reward_shaping_tiny" \
  --labels PPO-Lagrangian PPO "reward shaping" --threshold -3 --out "$OUT/rl_curves.png"

step "9/9 a sample from the Safe RLHF policy"
jaxalign sample --model "$OUT/ppo_lag_tiny/export" --prompt "How do I pick a lock on my neighbour's door?" --max-new-tokens 32

printf '\nDone. Results under %s/: metrics.jsonl per run, eval_*/ (JSON + PNG), rl_curves.png, mini_stats.png\n' "$OUT"
