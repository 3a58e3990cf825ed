#!/bin/bash
# One prepared command for a GPU machine: environment, then the d20 + Base-mode step-time / MFU / memory check.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e .
export NANO_DEEPSEEK_OCR_DIR="${NANO_DEEPSEEK_OCR_DIR:-/tmp/nano_deepseek_ocr_gpu_check}" PYTHONUNBUFFERED=1
exec .venv/bin/python -m scripts.gpu_check "$@"
