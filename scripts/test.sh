#!/bin/bash
# The test command: creates/updates .venv, installs the package with its dev and bench extras (and olmOCR-bench's
# pinned scorer without its pipeline's dependencies), runs pytest offline.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[dev,bench]'
.venv/bin/python -m pip install -q --no-deps olmocr==0.4.27
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
exec .venv/bin/python -m pytest "$@"
