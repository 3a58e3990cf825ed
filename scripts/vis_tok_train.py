"""
Stage 1: train the vision tokenizer side. Everything trains (SAM, compressor, CLIP, projector,
newline/separator, GPT) on vision data only, seq_len 4096, warmup + cosine.

  python -m scripts.vis_tok_train --init_gpt=<nanochat dir or repo> --data=real
  torchrun --standalone --nproc_per_node=8 -m scripts.vis_tok_train --init_gpt=... --data=real --total_batch_size=1280
  # CPU toy: a tokenizer, then a tiny model from random initialisation on reading pages (a minute: the loss falls
  # from 7.6 to about 4.4; reading takes the demo's 300 steps, speedrun.sh)
  python -m scripts.tok_train --vocab_size=2048
  python -m scripts.vis_tok_train --encoder=tiny --depth=4 --modes=tiny --init_encoder=random --data=reading \
      --seq_len=512 --num_iterations=12 --warmup_steps=10 --vision_lr=1e-4 --eval_every=12 --eval_batches=1 \
      --cer_pages=4
"""
from common import parse_overrides, run_command
from train import TrainConfig, train

if __name__ == "__main__":
    run_command(train, parse_overrides(TrainConfig(stage="stage1", seq_len=4096, schedule="cosine", freeze_sam=False,
                                                   text_fraction=0.0), description=__doc__))
