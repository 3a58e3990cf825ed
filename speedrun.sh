#!/bin/bash
# The whole pipeline, at the scale this machine allows (SCALE=demo|full to choose):
#   demo (no GPU): tiny encoder + tiny GPT on synthetic pages, a tokenizer trained offline, both stages, then
#                  vision_sample. About 10 minutes on 2 CPU cores.
#   full (N GPUs): nanochat base GPT (NANOCHAT_GPT) + SAM/CLIP, data preparation, stage 1 and stage 2 under
#                  torchrun, vision_sample and the evals.
# Everything lands in $NANO_DEEPSEEK_OCR_DIR (default ~/.cache/nano_deepseek_ocr); the report in ./report.md.
set -euo pipefail
cd "$(dirname "$0")"
export NANO_DEEPSEEK_OCR_DIR="${NANO_DEEPSEEK_OCR_DIR:-$HOME/.cache/nano_deepseek_ocr}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

# ---- environment: a local venv with the pinned torch ----
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e .
source .venv/bin/activate

NGPU=$( (nvidia-smi -L 2>/dev/null || true) | grep -c GPU || true)
SCALE="${SCALE:-$([ "$NGPU" -gt 0 ] && echo full || echo demo)}"
mkdir -p "$NANO_DEEPSEEK_OCR_DIR"
REPORT="$NANO_DEEPSEEK_OCR_DIR/report.md"
printf "# nano-deepseek-ocr speedrun report\n\n- date: %s\n- scale: %s, GPUs: %s\n- commit: %s\n" \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$SCALE" "$NGPU" "$(git rev-parse --short HEAD 2>/dev/null || echo none)" > "$REPORT"
START=$(date +%s)
echo "speedrun: scale=$SCALE, $NGPU GPU(s), base dir $NANO_DEEPSEEK_OCR_DIR"

if [ "$SCALE" = "demo" ]; then
  DEMO="--encoder=tiny --depth=4 --model_tag=demo --modes=tiny --seq_len=512 --device_batch_size=8 --num_workers=1 \
        --num_synthetic=48 --synthetic_kinds=formula,chart,table --synthetic_max_size=768 --eval_batches=2 --sample_count=4"
  python -m scripts.tok_train --vocab_size=2048
  # a randomly initialised SAM collapses under AdamW above ~3e-5 (encoder similarity -> 1): keep the vision lr low
  python -m scripts.vis_tok_train $DEMO --init_encoder=random --vision_lr=1e-5 --num_iterations=300 --warmup_steps=20 \
         --eval_every=150 --save_every=150
  python -m scripts.vis_mid_train $DEMO --vision_lr=1e-5 --num_iterations=80 --step_milestones=0.75 \
         --eval_every=80 --save_every=80
  python -m scripts.vision_sample --mode=tiny --max_tokens=128
elif [ "$SCALE" = "full" ]; then
  NANOCHAT_GPT="${NANOCHAT_GPT:-sampathchanda/nanochat-d20}"   # a nanochat base checkpoint: local dir or HF repo
  MAX_SAMPLES="${MAX_SAMPLES:-0}"                               # per dataset; 0 = everything
  RUN="${WANDB_RUN:-dummy}"
  TORCHRUN="torchrun --standalone --nproc_per_node=$NGPU"
  COMMON="--init_gpt=$NANOCHAT_GPT --model_tag=full --data=real --max_samples=$MAX_SAMPLES --modes=base --run=$RUN \
          --activation_checkpointing=true --device_batch_size=4 --num_workers=8"
  python -m scripts.prepare_data --max_samples="$MAX_SAMPLES"
  $TORCHRUN -m scripts.vis_tok_train $COMMON --total_batch_size=$((NGPU * 32)) --num_iterations=4000 --eval_every=500
  $TORCHRUN -m scripts.vis_mid_train $COMMON --total_batch_size=$((NGPU * 16)) --num_iterations=2000 --eval_every=500
  python -m scripts.vision_sample --mode=base
  python -m scripts.eval_fox --modes=tiny,small
  python -m scripts.eval_omnidocbench --mode=base --max_pages="${OMNIDOC_PAGES:-200}"
  python -m scripts.eval_compression --pages=200
else
  echo "SCALE must be demo or full, got $SCALE" >&2
  exit 1
fi

printf "\n## Wall time\n\n- %d min %d s\n" $(( ($(date +%s) - START) / 60 )) $(( ($(date +%s) - START) % 60 )) >> "$REPORT"
cp "$REPORT" report.md
echo "speedrun done in $(( $(date +%s) - START )) s; report: report.md"
