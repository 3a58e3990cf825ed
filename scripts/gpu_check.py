"""
One-GPU check of the real scale: d20 GPT (vocab 65536) + the full DeepEncoder in Base mode on synthetic pages,
a few steps of stage 1 (everything trains) and of stage 2 (SAM frozen, 10% text). Prints step time, tokens/s,
images/s, MFU and peak memory, as a table at the end. About 5 minutes on an H100 (random weights: no downloads).

  python -m scripts.gpu_check                # on the GPU
  python -m scripts.gpu_check --tiny         # a CPU dry run of the same path with the tiny model
"""
import argparse
import statistics

from scripts.tok_train import load_or_train_tokenizer
from train import TrainConfig, train


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--device_batch_size", type=int, default=4)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    load_or_train_tokenizer()
    common = dict(model_tag="gpu-check", init_encoder="random", modes="base", num_synthetic=512, synthetic_min_size=1000,
                  synthetic_max_size=1600, device_batch_size=args.device_batch_size, num_iterations=args.steps, warmup_steps=2,
                  eval_every=0, sample_count=0, save_every=0, num_workers=8, vocab_size=65536, activation_checkpointing=True)
    if args.tiny:
        common.update(encoder="tiny", depth=2, modes="tiny", vocab_size=0, num_workers=0, device_batch_size=2,
                      synthetic_min_size=512, synthetic_max_size=700)
    rows = []
    for stage, extra in (("stage1", dict(seq_len=4096)), ("stage2", dict(seq_len=8192, freeze_sam=True, text_fraction=0.1))):
        summary = train(TrainConfig(stage=f"{stage}-gpu-check", **common, **extra))
        steady = summary["steps"][2:] or summary["steps"]  # the first steps warm up kernels and loader workers
        medians = {key: statistics.median(s[key] for s in steady) if steady[0][key] is not None else None
                   for key in ("dt", "tokens_per_s", "images_per_s", "mfu")}
        rows.append((stage, *medians.values(), summary["peak_memory_gib"]))
    print(f"\n{'stage':<8} {'step s':>8} {'tok/s':>10} {'img/s':>8} {'MFU':>7} {'peak GiB':>9}")
    for stage, dt, tok, img, mfu, mem in rows:
        print(f"{stage:<8} {dt:>8.3f} {tok:>10,.0f} {img:>8.1f} {'-' if mfu is None else f'{100 * mfu:.1f}%':>7} "
              f"{'-' if mem is None else f'{mem:.1f}':>9}")


if __name__ == "__main__":
    main()
