#!/usr/bin/env bash
# The hard variant of mini (jaxalign/data/hard.py: look-alike benign requests, answers that turn
# unsafe late, test-only phrasings) through every method, for several seeds:
#   data (train-split tokenizer) -> per seed: SFT -> reward, cost and moderation models -> PPO,
#   PPO-Lagrangian, reward shaping (nu = 1 and the nu front), Safe GRPO, DPO, SafeDPO, C-DPO,
#   multi-constraint Lagrangian, PPO-Lagrangian on the moderation model (per-token and end-of-answer
#   cost) -> the exact judge per policy (every slice) -> OUT/results.{md,json} + OUT/plane.png
#   (experiments/hard_results.py: mean ± std over the seeds) and the moderation model on the
#   late-turning and look-alike answers (experiments/hard_moderation.py).
#
#   bash experiments/hard.sh                        # results under out/hard/ (make hard)
#   SEEDS=0 METHODS="sft ppo_lag" NUS="" bash experiments/hard.sh   # one seed, two methods, no nu front
#   SMALL=1 OUT=/tmp/h bash experiments/hard.sh     # a few updates per stage (the test's sizes)
#
# Every step is an ordinary `jaxalign` command with the tiny configs (hard-variant lengths as overrides);
# a finished workdir or judge result is reused (FORCE=1 redoes everything). Seed s sets config.seed of
# every stage and the judge's sampling seed; the data is the same for all seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/hard}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"sft ppo ppo_lag ppo_reward_shaping safe_grpo dpo safe_dpo c_dpo multi_lag ppo_lag_moderation ppo_lag_moderation_end"}
NUS=${NUS-"0.1 0.5 2 5"}  # the reward-shaping front; nu = 1 is the ppo_reward_shaping method
ROWS=${ROWS:-3000}
# Every RL method runs the tiny configs' 120 iterations with half their prompts per rollout (16, Safe GRPO
# 4 x 4 answers), so the 3-seed sweep fits on 2 shared cores. Halving the iterations instead (60 x 32) cut
# PPO-Lagrangian's run before lambda decays: look-alike over-refusal 41% vs 27% at 120 x 32 (seed 0).
RL_ITERATIONS=${RL_ITERATIONS:-120}
RL_PROMPTS=${RL_PROMPTS:-16}
SMALL=${SMALL:-0}
FORCE=${FORCE:-0}
mkdir -p "$OUT"
START=$(date +%s)
step() { printf '\n=== %s (%ss)\n' "$*" "$(($(date +%s) - START))"; }
# Reward and cost models are trained when a method or the nu front reads them (every method but SFT, DPO, SafeDPO).
SCORED=0
[ -n "$NUS" ] && SCORED=1
for m in $METHODS; do case $m in sft|dpo|safe_dpo) ;; *) SCORED=1 ;; esac; done

# Hard-variant lengths: prompts <= 28 train / 41 test tokens, answers <= 40 tokens + EOS.
LENGTH=(--config.data.max_length=80)
RL_LENGTH=(--config.rl.prompt_length=48 --config.rl.max_new_tokens=48)
JUDGE=(--max-new-tokens 48 --prompt-length 48)
SFT_STEPS=() SCORE_STEPS=() DPO_STEPS=()
if [ "$SMALL" = 1 ]; then
  ROWS=300 RL_ITERATIONS=2 RL_PROMPTS=8
  SFT_STEPS=(--config.train.num_steps=4) SCORE_STEPS=(--config.train.num_steps=2 --config.train.eval_every=0)
  DPO_STEPS=(--config.train.num_steps=2)
  JUDGE+=(--samples 1)
fi
RL_STEPS=(--config.train.num_steps="$RL_ITERATIONS" --config.data.batch_size="$RL_PROMPTS")

# train NAME CONFIG SEED_DIR ARGS...: `jaxalign train` into SEED_DIR/NAME_tiny (GNU time line into OUT/times.txt).
train() {
  local name=$1 config=$2 dir=$3; shift 3
  if [ "$FORCE" = 1 ]; then rm -rf "$dir/${name}_tiny"; fi
  if [ -d "$dir/${name}_tiny/export" ]; then echo "reusing $dir/${name}_tiny (FORCE=1 redoes it)"; return; fi
  /usr/bin/time -f "TIME $dir/$name %e s %M KB" -a -o "$OUT/times.txt" \
    jaxalign train --config "$config" --workdir "$dir/${name}_tiny" --config.tokenizer="$OUT/tokenizer" \
    --config.data.source="$OUT/data" "$@"
}
# judge NAME SEED_DIR SEED: the exact judge of SEED_DIR/NAME_tiny/export on every test prompt.
judge() {
  if [ "$FORCE" = 1 ]; then rm -rf "$2/judge_$1"; fi
  [ -e "$2/judge_$1/judge.json" ] || jaxalign evaluate judge --model "$2/${1}_tiny/export" --data "$OUT/data" \
    --out "$2/judge_$1" --label "$1" --seed "$3" "${JUDGE[@]}" > /dev/null
}

step "data: the hard variant in the release layout, a tokenizer of its train split"
if [ "$FORCE" = 1 ] || [ ! -d "$OUT/data" ]; then
  rm -rf "$OUT/data" "$OUT/tokenizer"
  jaxalign data mini --variant hard --rows "$ROWS" --out "$OUT/data"
  jaxalign data validate "$OUT/data" > /dev/null
fi
[ -d "$OUT/tokenizer" ] || jaxalign tokenizer --data "$OUT/data" --split train --out "$OUT/tokenizer" --vocab-size 2048

for seed in $SEEDS; do
  dir="$OUT/seed$seed"
  mkdir -p "$dir"
  S=(--config.seed="$seed")
  step "seed $seed: SFT, reward and cost models (when a method reads them), moderation model"
  train sft configs/sft_hard_tiny.py "$dir" "${S[@]}" "${SFT_STEPS[@]}"
  INIT=(--config.model.init_path="$dir/sft_tiny/export")
  if [ "$SCORED" = 1 ]; then
    train reward configs/reward_tiny.py "$dir" "${S[@]}" "${INIT[@]}" "${LENGTH[@]}" "${SCORE_STEPS[@]}"
    train cost configs/cost_tiny.py "$dir" "${S[@]}" "${INIT[@]}" "${LENGTH[@]}" "${SCORE_STEPS[@]}"
  fi
  train moderation configs/moderation_tiny.py "$dir" "${S[@]}" "${INIT[@]}" "${SCORE_STEPS[@]}"
  RL=("${S[@]}" "${INIT[@]}" "${RL_LENGTH[@]}" "${RL_STEPS[@]}" --config.rl.reward_model_path="$dir/reward_tiny/export")
  COST=(--config.rl.cost_model_path="$dir/cost_tiny/export")
  MODERATION=(--config.rl.cost_model_path="$dir/moderation_tiny/export")
  DPO=("${S[@]}" "${INIT[@]}" "${LENGTH[@]}" "${DPO_STEPS[@]}")
  for method in $METHODS; do
    step "seed $seed: $method"
    case $method in
      sft) ;;
      ppo) train ppo configs/ppo_tiny.py "$dir" "${RL[@]}" "${COST[@]}" ;;
      ppo_lag) train ppo_lag configs/ppo_lag_hard_tiny.py "$dir" "${RL[@]}" "${COST[@]}" ;;
      ppo_reward_shaping) train ppo_reward_shaping configs/ppo_reward_shaping_tiny.py "$dir" "${RL[@]}" "${COST[@]}" ;;
      safe_grpo) train safe_grpo configs/safe_grpo_tiny.py "$dir" "${RL[@]}" "${COST[@]}" \
                   --config.data.batch_size=$((RL_PROMPTS / 4)) ;;  # 4 answers per prompt
      dpo) train dpo configs/dpo_tiny.py "$dir" "${DPO[@]}" ;;
      safe_dpo) train safe_dpo configs/safe_dpo_tiny.py "$dir" "${DPO[@]}" ;;
      c_dpo) train c_dpo configs/c_dpo_tiny.py "$dir" "${DPO[@]}" --config.dpo.reward_model_path="$dir/reward_tiny/export" \
               --config.dpo.cost_model_path="$dir/cost_tiny/export" ;;
      multi_lag) train multi_lag configs/multi_lag_tiny.py "$dir" "${RL[@]}" "${MODERATION[@]}" ;;
      ppo_lag_moderation) train ppo_lag_moderation configs/ppo_lag_moderation_tiny.py "$dir" "${RL[@]}" "${MODERATION[@]}" ;;
      ppo_lag_moderation_end) train ppo_lag_moderation_end configs/ppo_lag_moderation_tiny.py "$dir" "${RL[@]}" \
                                "${MODERATION[@]}" --config.rl.ppo_lag.cost_per_token=false ;;
      *) echo "hard.sh: unknown method $method" >&2; exit 2 ;;
    esac
    judge "$method" "$dir" "$seed"
  done
  for nu in $NUS; do
    step "seed $seed: reward shaping nu = $nu"
    train "shaping_nu$nu" configs/ppo_reward_shaping_tiny.py "$dir" "${RL[@]}" "${COST[@]}" --config.rl.ppo_reward_shaping.nu="$nu"
    judge "shaping_nu$nu" "$dir" "$seed"
  done
done

step "results: mean ± std over the seeds, the helpfulness-harmlessness plane"
python experiments/hard_results.py --dir "$OUT" --seeds $SEEDS --methods $METHODS --nus $NUS
python experiments/hard_moderation.py --dir "$OUT" --seeds $SEEDS > /dev/null
printf '\nDone in %ss. Results under %s/: results.md, results.json, plane.png, moderation.json, seed*/judge_*/\n' \
  "$(($(date +%s) - START))" "$OUT"
