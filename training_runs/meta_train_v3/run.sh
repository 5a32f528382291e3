#!/usr/bin/env bash
# The issue-29 meta-training run: starts it, or resumes it with the same command (from run/'s newest full checkpoint
# when this machine has one, else from the committed compact checkpoint in resume/).
#   training_runs/meta_train_v3/run.sh > training_runs/meta_train_v3/run.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=training_runs/meta_train_v3
PROCESSES=${PROCESSES:-2}
export OMP_NUM_THREADS=$((2 / PROCESSES)) TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src
[ -f "$HERE/groups_train.jsonl.gz" ] || .venv/bin/python "$HERE/build_data.py"
if [ "$PROCESSES" = 1 ]; then exec .venv/bin/python "$HERE/train.py" "$@"; fi
exec .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node="$PROCESSES" "$HERE/train.py" "$@"
