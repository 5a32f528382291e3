#!/usr/bin/env bash
# The issue-15 meta-training run: starts it, or resumes it with the same command (from run/'s newest full
# checkpoint when this machine has one, else from the committed compact checkpoint in resume/).
#   DATA=../shared/data training_runs/meta_train_v2/run.sh > training_runs/meta_train_v2/run.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=training_runs/meta_train_v2
DATA=${DATA:-../shared/data}
PROCESSES=${PROCESSES:-2}
if compgen -G "$HERE/run/checkpoint-*" > /dev/null; then RESUME=(--resume last)
elif [ -f "$HERE/resume/trainer_state.json" ]; then RESUME=(--resume "$HERE/resume")
else RESUME=(); fi
# --ddp_timeout: process 0 builds the mixed task set (hard distractors by embedding) while the other waits at a
# barrier; on a loaded 2-core machine that took over gloo's default 30 minutes once and killed the run.
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src
LAUNCH=(python -m torch.distributed.run --standalone --nproc_per_node="$PROCESSES" -m regrad_hf.cli)
[ "$PROCESSES" = 1 ] && LAUNCH=(python -m regrad_hf.cli)
exec "${LAUNCH[@]}" train \
  --task_set mixed \
  --squad_file "$DATA/squad_dev_articles_00-39.json" \
  --tofu_file "$DATA/tofu_qa_authors_000-179.jsonl" \
  --hotpotqa_file "$DATA/hotpotqa_dev_distractor_500.jsonl" \
  --documents_per_task 3 --hard_distractors true --max_answer_tokens 128 \
  --init_learner shipped \
  --per_device_train_batch_size $((4 / PROCESSES)) \
  --max_steps 2000 --lr_scheduler_type constant_with_warmup --warmup_steps 10 \
  --learning_rate 4e-4 --step_size_learning_rate 3e-2 \
  --logging_steps 5 --save_strategy steps --save_steps 10 --save_total_limit 3 \
  --eval_strategy steps --eval_steps 20 --eval_tasks_per_source 10 --eval_generate false \
  --eval_cases no_adaptation,regrad --metric_for_best_model eval_regrad_answer_loss --greater_is_better false \
  --compact_checkpoint_dir "$HERE/resume" --output_dir "$HERE/run" \
  --seed 0 --report_to none --use_cpu true --disable_tqdm true --ddp_timeout 10800 \
  "${RESUME[@]}" "$@"
