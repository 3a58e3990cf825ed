"""
Stage 2: SAM + net_2 + net_3 frozen; CLIP, projector, newline/separator and GPT train on 90% vision /
10% text, seq_len 8192, step schedule. Starts from the latest stage-1 checkpoint of the same model tag
unless --init_from says otherwise.

  python -m scripts.vis_mid_train --data=real
  torchrun --standalone --nproc_per_node=8 -m scripts.vis_mid_train --data=real --total_batch_size=640
  # DeepSeek-OCR 2's stage 3: the whole encoder frozen, the GPT alone trains (from stage 2's checkpoint)
  python -m scripts.vis_mid_train --modes=v2 --freeze_encoder --stage=stage3 --init_from=<stage-2 run> --model_tag=v2
"""
import os

from checkpoint import list_checkpoints
from common import parse_overrides, run_command
from config import base_dir, checkpoint_dir
from train import TrainConfig, train

if __name__ == "__main__":
    cfg = parse_overrides(TrainConfig(stage="stage2", seq_len=8192, schedule="step", freeze_sam=True, text_fraction=0.1,
                                      warmup_steps=0, adamw_lr=3e-5), description=__doc__)
    if not cfg.init_from and not cfg.resume:
        cfg.init_from = checkpoint_dir("stage1", cfg.tag())
        if not list_checkpoints(cfg.init_from):
            runs = sorted(r for r in os.listdir(base_dir("checkpoints", "stage1"))
                          if list_checkpoints(base_dir("checkpoints", "stage1", r)))
            there = (f"stage-1 runs here: {', '.join(runs)} (--model_tag=NAME starts from one, or --init_from=DIR)"
                     if runs else "run scripts.vis_tok_train first, or pass --init_from")
            raise SystemExit(f"no stage-1 checkpoint in {cfg.init_from}: {there}")
    run_command(train, cfg)
