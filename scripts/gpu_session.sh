#!/bin/bash
# Everything a GPU session measures, in one call that fits a 10-minute device command: the d20 + Base step time,
# MFU, memory and phases (gpu_check, compile time on its own line), SAM's attention three ways (time, exactness,
# determinism), and the d20 decode latency and pages/s. Each part has its own time limit, so one that runs long
# leaves the others their share; tables land in $OUT (or /tmp/gpu_session) as they finish.
#   bash scripts/gpu_session.sh            # on the GPU machine (PYTHONPATH=. with its own torch)
#   bash scripts/gpu_session.sh --tiny     # the same calls on the CPU at toy sizes, to check the script itself
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 NANO_DEEPSEEK_OCR_DIR="${NANO_DEEPSEEK_OCR_DIR:-/tmp/nano_deepseek_ocr_gpu_session}"
if [ "${1:-}" = "--tiny" ]; then
  # SAM's attention runs at full size on the CPU too (minutes, not seconds): it gets a longer limit
  CHECK="--tiny --steps 3 --budget_s 120"; ATTN="--views 1 --repeats 1"; ATTN_S=300; GEN="--depth 2 --encoder tiny --new_tokens 8 --pages 4"
else
  CHECK="--budget_s 300"; ATTN="--views 2 --repeats 3"; ATTN_S=60; GEN="--depth 20 --encoder full --device cuda"
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/versions.txt"
timeout 360 python3 -m scripts.gpu_check $CHECK 2>&1 | tee "$OUT/gpu_check.txt" | grep -v "^step "
timeout $ATTN_S python3 -m scripts.bench_sam_attention $ATTN 2>&1 | tee "$OUT/sam_attention.txt"
timeout 150 python3 -m scripts.bench_generate $GEN 2>&1 | tee "$OUT/generate.txt"
echo "gpu_session: tables in $OUT"
