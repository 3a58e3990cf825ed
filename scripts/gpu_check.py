"""
One-GPU check of the real scale: d20 GPT (vocab 65536) + the full DeepEncoder in Base mode on synthetic pages
(rendered beforehand, in parallel), a few steps of stage 1 (everything trains), then of stage 2 from its checkpoint
(SAM frozen, 10% text), packed rows, compiled. Prints per stage: the first step (the compilation is in it), the
steady step time, real tokens/s, images/s, MFU, peak memory, and where a step goes: waiting for data, the encoder,
the GPT and the optimizers (encoder and GPT split by timing each alone, eager, on one fixed batch of the stage's
checkpoint). Past --budget_s it stops between phases with what it has measured. Random weights: no downloads.

  bash scripts/gpu_check.sh                  # on the GPU
  python -m scripts.gpu_check --tiny         # a CPU dry run of the same path with the tiny model
"""
import argparse
import dataclasses
import statistics
import time
from multiprocessing import Pool

import torch

from common import autocast_context
from dataloader import VisionDataLoader
from nano_deepseek_ocr import load_model
from scripts.tok_train import load_or_train_tokenizer
from tasks.synthetic import SyntheticPages
from train import TrainConfig, build_tasks, configure_model, train


def render(args):
    pages, i = args
    pages[i]


def prerender(cfg, workers):
    """Synthetic pages rendered to disk before the clock starts, as a prepared dataset would be."""
    pages = SyntheticPages(cfg.num_synthetic, cfg.seed, cfg.synthetic_kinds.split(","),
                           (cfg.synthetic_min_size, cfg.synthetic_max_size))
    with Pool(max(1, workers)) as pool:
        pool.map(render, [(pages, i) for i in range(len(pages))])


def timed(fn, device, repeats=3):
    fn()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def fixed_batch(cfg, tokenizer):
    return next(iter(VisionDataLoader(build_tasks(cfg, "train", 1), tokenizer, cfg.modes.split(","),
                                      cfg.device_batch_size, cfg.seq_len)))


def encoder_and_gpt_seconds(checkpoint, cfg, device):
    """Forward+backward of one fixed micro-batch by the stage's trained model, eager, the encoder's and the GPT's
    apart."""
    model, tokenizer, _ = load_model(checkpoint, device)
    configure_model(model, dataclasses.replace(cfg, compile=False), device)
    batch = fixed_batch(cfg, tokenizer)
    ids, targets, doc_ids, positions = (batch[k].to(device) for k in ("input_ids", "targets", "doc_ids", "positions"))
    autocast = autocast_context(device)

    def encoder():
        with autocast:
            features = torch.cat(model.encode_images(batch["images"]))
        features.float().square().mean().backward()

    with torch.no_grad(), autocast:
        embeds = model.embed(ids, batch["images"]).detach()

    def gpt():
        with autocast:
            loss = model.gpt(ids, targets, inputs_embeds=embeds, doc_ids=doc_ids, positions=positions)
        loss.backward()
    return timed(encoder, device), timed(gpt, device)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12, help="training steps to time per stage")
    parser.add_argument("--device_batch_size", type=int, default=2, help="rows of seq_len tokens (8 ran out of 140 GB)")
    parser.add_argument("--num_workers", type=int, default=12, help="loader worker processes")
    parser.add_argument("--compile", type=int, default=1, help="1: torch.compile the encoder and the GPT")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: a dry run of the script")
    parser.add_argument("--v2", action="store_true", help="DeepEncoder V2 (DeepSeek-OCR 2's) in its mode without tiles")
    parser.add_argument("--budget_s", type=float, default=540, help="stop between phases past this many seconds")
    args = parser.parse_args()
    t_start = time.perf_counter()
    load_or_train_tokenizer()
    common = dict(model_tag="gpu-check", init_encoder="random", modes="base", num_synthetic=512,
                  synthetic_min_size=1000, synthetic_max_size=1600, device_batch_size=args.device_batch_size,
                  num_iterations=args.steps,
                  warmup_steps=2, eval_every=0, cer_pages=0, sample_count=0, save_every=0, num_workers=args.num_workers,
                  vocab_size=65536, activation_checkpointing=True, compile=bool(args.compile), overwrite=True)
    if args.v2:
        common.update(encoder="v2", modes="v2-base", model_tag="gpu-check-v2")
    if args.tiny:
        common.update(encoder="v2-tiny" if args.v2 else "tiny", depth=2, modes="v2-tiny" if args.v2 else "tiny",
                      vocab_size=0, num_workers=0, device_batch_size=2, synthetic_min_size=512, synthetic_max_size=700,
                      num_synthetic=16)
    stages = (("stage1", dict(seq_len=4096)), ("stage2", dict(seq_len=8192, freeze_sam=True, text_fraction=0.1)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prerender(TrainConfig(**common, **stages[0][1]), args.num_workers)
    rows, init_from = [], ""
    for stage, extra in stages:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s reached: stopping before {stage}", flush=True)
            break
        cfg = TrainConfig(stage=f"{stage}-gpu-check", init_from=init_from, **common, **extra)
        summary = train(cfg)
        init_from = summary["checkpoint"]
        steady = summary["steps"][2:] or summary["steps"]  # the first steps fill the loader's queue
        median = {key: statistics.median(s[key] / (s["dt"] if key in ("tokens", "images") else 1) for s in steady)
                  for key in ("dt", "tokens", "images", "data_s", "opt_s")}
        mfu = statistics.median(s["mfu"] for s in steady) if steady[0]["mfu"] is not None else None
        encoder_s, gpt_s = encoder_and_gpt_seconds(summary["checkpoint"], cfg, device)
        compute = max(median["dt"] - median["data_s"] - median["opt_s"], 0.0)
        shares = [median["data_s"], compute * encoder_s / (encoder_s + gpt_s), compute * gpt_s / (encoder_s + gpt_s),
                  median["opt_s"]]
        rows.append((stage, summary["steps"][0]["dt"], median["dt"], median["tokens"], median["images"],
                     mfu, summary["peak_memory_gib"], [100 * x / median["dt"] for x in shares]))
    print(f"\n{'stage':<8} {'first s':>8} {'step s':>7} {'real tok/s':>11} {'img/s':>7} {'MFU':>6} {'peak GiB':>9} "
          f"{'data':>6} {'encoder':>8} {'GPT':>6} {'optim':>6}")
    for stage, first, dt, tok, img, mfu, mem, (data, enc, gpt_share, opt) in rows:
        mfu = "-" if mfu is None else f"{100 * mfu:.1f}%"
        mem = "-" if mem is None else f"{mem:.1f}"
        print(f"{stage:<8} {first:>8.1f} {dt:>7.3f} {tok:>11,.0f} {img:>7.1f} {mfu:>6} {mem:>9} {data:>5.0f}% "
              f"{enc:>7.0f}% {gpt_share:>5.0f}% {opt:>5.0f}%")


if __name__ == "__main__":
    main()
