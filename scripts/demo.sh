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

[[ -f $OUT/data/manifest.json ]] || python data/make_synthetic.py --out $OUT/data
[[ -f $OUT/base/config.json ]] || python scripts/make_tiny_model.py --out $OUT/base
[[ -f $OUT/sft/model.safetensors ]] || python sft.py --model_name $OUT/base --dataset_name $OUT/data \
  --output_dir $OUT/sft --num_train_epochs 2 --per_device_train_batch_size 32 --learning_rate 3e-3 "${CPU[@]}"

RM_ARGS="--num_train_epochs 8 --per_device_train_batch_size 16 --per_device_eval_batch_size 64 --learning_rate 1e-3 ${CPU[*]}"
DATA=$OUT/data SFT=$OUT/sft RUN=$OUT/ser MAX_LOOPS=3 CONTINUE=0 RM_ARGS="$RM_ARGS" \
  FILTER_ARGS="--status1_min_pairs 100 --status2_min_pairs 100" PY=python bash scripts/ser_loop.sh

# the comparison: an RM trained on every human label of the pool
[[ -f $OUT/rm_full/eval_results.json ]] || python rm_training.py --model_name $OUT/sft --dataset_name $OUT/data \
  --train_subset data/reward_full --output_dir $OUT/rm_full $RM_ARGS

python scripts/ser_report.py --run $OUT/ser --full_rm $OUT/rm_full --demo_dir $OUT
echo "demo: finished in $(( $(date +%s) - start )) s; see $OUT/report.md and $OUT/summary.json"
