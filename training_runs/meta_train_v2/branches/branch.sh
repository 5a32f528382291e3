#!/usr/bin/env bash
# usage: branch.sh NAME [extra train options]; a 40-step branch from meta_train_v2 step 60 (fresh optimiser, data_seed 1)
# Run it with the virtualenv that has regrad-hf installed active (its python and torch.distributed.run).
set -euo pipefail
NAME=$1; shift
cd "$(dirname "$0")/../../.."
OUT=/tmp/dev/arm_$NAME; mkdir -p $OUT; cp /tmp/dev/tasks/tasks_*.jsonl $OUT/
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src
D=../shared/data
python -m torch.distributed.run --standalone --nproc_per_node=2 -m regrad_hf.cli train \
  --task_set mixed --squad_file $D/squad_dev_articles_00-39.json --tofu_file $D/tofu_qa_authors_000-179.jsonl \
  --hotpotqa_file $D/hotpotqa_dev_distractor_500.jsonl \
  --documents_per_task 3 --hard_distractors true --max_answer_tokens 128 \
  --init_learner training_runs/meta_train_v2/resume \
  --per_device_train_batch_size 2 --max_steps 40 --lr_scheduler_type constant_with_warmup --warmup_steps 5 \
  --logging_steps 5 --save_strategy steps --save_steps 40 \
  --eval_strategy steps --eval_steps 40 --eval_tasks_per_source 10 --eval_generate false --eval_before false \
  --eval_cases no_adaptation,regrad --output_dir $OUT --seed 0 --data_seed 1 --report_to none --use_cpu true \
  --disable_tqdm true --ddp_timeout 10800 "$@" > $OUT/log.txt 2>&1
python - <<PY
import json; r=json.load(open('$OUT/training_record.json'))
print('$NAME', {k: round(v,4) for k,v in r['metrics_after'].items() if 'loss' in k or 'signal' in k or 'step_size' in k})
print('$NAME train loss', [round(e['loss'],3) for e in r['log_history'] if 'loss' in e])
PY
