#!/bin/bash
# Everything a GPU session checks and measures, in one call that fits a 10-minute device command: the tests of the
# CUDA-only paths (tests/test_cuda.py and the CUDA cases of the others), the d20 + Base step time, MFU, memory and
# phases (gpu_check; the first step holds the compilation), the same with DeepEncoder V2 (--v2), the d20 decode latency
# and pages/s, and SAM's attention three ways (time, exactness, determinism by default and in deterministic mode).
# Each part has its own time limit, so one that runs long leaves the others their share (about 13 minutes in all: two
# device commands); tables land in $OUT (or /tmp/gpu_session) as they finish.
#   bash scripts/gpu_session.sh            # on the GPU machine (PYTHONPATH=. with its own torch)
#   bash scripts/gpu_session.sh --tiny     # the same calls on the CPU at toy sizes, to check the script itself
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NANO_DEEPSEEK_OCR_DIR="${NANO_DEEPSEEK_OCR_DIR:-/tmp/nano_deepseek_ocr_gpu_session}"
if [ "${1:-}" = "--tiny" ]; then
  # SAM's attention runs at full size on the CPU too (minutes, not seconds): it gets a longer limit
  CHECK="--tiny --steps 3 --budget_s 120"; ATTN="--views 1 --repeats 1"; ATTN_S=300; GEN="--depth 2 --encoder tiny --new_tokens 8 --pages 4"
else
  CHECK="--budget_s 210"; ATTN="--views 2 --repeats 3"; ATTN_S=30
  GEN="--depth 20 --encoder full --device cuda --vocab_size 65536"
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/versions.txt"
timeout 130 python3 -m pytest -q -n 0 -p no:cacheprovider -rs tests/test_cuda.py tests/test_vlm.py -k cuda 2>&1 \
  | tee "$OUT/cuda_tests.txt"
timeout 280 python3 -m scripts.gpu_check $CHECK 2>&1 | tee "$OUT/gpu_check.txt" | grep -v "^step "
timeout 200 python3 -m scripts.gpu_check $CHECK --v2 2>&1 | tee "$OUT/gpu_check_v2.txt" | grep -v "^step "
timeout 100 python3 -m scripts.bench_generate $GEN 2>&1 | tee "$OUT/generate.txt"
timeout $ATTN_S python3 -m scripts.bench_sam_attention $ATTN 2>&1 | tee "$OUT/sam_attention.txt"
timeout $ATTN_S python3 -m scripts.bench_sam_attention $ATTN --deterministic 2>&1 | tee -a "$OUT/sam_attention.txt"
echo "gpu_session: tables in $OUT"
