#!/usr/bin/env bash
# The whole SER pipeline on CPU, on the synthetic task with a tiny model (`make demo`).
# Re-running skips the stages that finished. Everything lands in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_DIR=${WANDB_DIR:-runs/demo} TOKENIZERS_PARALLELISM=false
OUT=runs/demo
CPU=(--use_cpu True --bf16 False --gradient_checkpointing False --report_to none --save_strategy no --disable_tqdm True)
mkdir -p $OUT
start=$(date +%s)

# The tiny model departs from the paper's RM defaults (LoRA r 8, lr 2e-5, 2 + 5 epochs): a 100k-parameter
# model trained from scratch learns with all weights, a large learning rate and more epochs.
RM_ARGS="--use_lora False --per_device_train_batch_size 16 --per_device_eval_batch_size 64 --learning_rate 1e-3 ${CPU[*]}"
force=(); if [[ ${FORCE:-0} == 1 ]]; then force=(--force); fi
python -m ser.run_config --run $OUT "${force[@]}" DEMO=synthetic RM_ARGS="$RM_ARGS" SEED_EPOCHS=8 LOOP_EPOCHS=8 \
  MAX_LOOPS=3 CONTINUE=0 PPO_STEPS=80

[[ -f $OUT/data/manifest.json ]] || python data/make_synthetic.py --out $OUT/data
[[ -f $OUT/base/config.json ]] || python scripts/make_tiny_model.py --out $OUT/base
# each check is a stage's last write: sft.py writes run_args.json after the model and tokenizer
[[ -f $OUT/sft/run_args.json ]] || python sft.py --model_name $OUT/base --dataset_name $OUT/data \
  --output_dir $OUT/sft --num_train_epochs 2 --per_device_train_batch_size 32 --learning_rate 3e-3 "${CPU[@]}"

DATA=$OUT/data SFT=$OUT/sft RUN=$OUT/ser MAX_LOOPS=3 CONTINUE=0 SEED_EPOCHS=8 LOOP_EPOCHS=8 RM_ARGS="$RM_ARGS" \
  FILTER_ARGS="--status1_min_pairs 100 --status2_min_pairs 100" PY=python bash scripts/ser_loop.sh

# the comparison: an RM trained on every human label of the pool
[[ -f $OUT/rm_full/eval_results.json ]] || python rm_training.py --model_name $OUT/sft --dataset_name $OUT/data \
  --train_subset data/reward_full --output_dir $OUT/rm_full --num_train_epochs 8 $RM_ARGS

# PPO of the SFT policy against the final SER RM, then SFT vs PPO on held-out prompts
FINAL_RM=$(python -c "import json; print(json.load(open('$OUT/ser/loops.json'))['final_rm'])")
[[ -f $OUT/ppo/policy/model.safetensors ]] || python ppo/ppo.py --model_name $OUT/sft \
  --reward_model_name "$FINAL_RM" --dataset_name $OUT/data --output_dir $OUT/ppo --log_with wandb \
  --steps 80 --batch_size 32 --mini_batch_size 8 --gradient_accumulation_steps 1 --ppo_epochs 4 \
  --learning_rate 3e-3 --init_kl_coef 0.1 --output_max_length 24 --save_freq 40 \
  --gold synthetic --eval_reward_model $OUT/rm_full
[[ -f $OUT/ppo/eval_policy.json ]] || python ppo/evaluate.py --base_model $OUT/sft --policy $OUT/ppo/policy \
  --reward_model_name "$FINAL_RM" --dataset_name $OUT/data --gold synthetic --samples_per_prompt 16 \
  --output $OUT/ppo/eval_policy.json

python scripts/ser_report.py --run $OUT/ser --full_rm $OUT/rm_full --demo_dir $OUT --policy_eval $OUT/ppo/eval_policy.json \
  --ppo_log $OUT/ppo/log.jsonl
echo "demo: finished in $(( $(date +%s) - start )) s; see $OUT/report.md and $OUT/summary.json"
