#!/bin/bash
# One prepared command for a GPU machine: the d20 + Base-mode step time / MFU / memory / phase check.
# A machine with its own CUDA torch runs it as it is (GPU machines may have no network to install one);
# otherwise a local venv with the pinned torch.
set -euo pipefail
cd "$(dirname "$0")/.."
export NANO_DEEPSEEK_OCR_DIR="${NANO_DEEPSEEK_OCR_DIR:-/tmp/nano_deepseek_ocr_gpu_check}" PYTHONUNBUFFERED=1
if python3 -c "import torch, tiktoken, rustbpe, safetensors, PIL; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_check: the machine's torch $(python3 -c 'import torch; print(torch.__version__)'), PYTHONPATH=."
  PYTHONPATH=. exec python3 -m scripts.gpu_check "$@"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e . || { echo "gpu_check: cannot install into .venv (no network?) and the machine's python lacks torch with CUDA, tiktoken, rustbpe, safetensors or Pillow" >&2; exit 1; }
exec .venv/bin/python -m scripts.gpu_check "$@"
