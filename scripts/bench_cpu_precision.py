"""
fp32 against bf16 on this CPU, side by side: the rate of a 512x1024 by 1024x1024 matmul, and the demo's training step
(tiny encoder, d4 GPT, 4 rows of 512 tokens of reading pages: forward, backward, optimizers), the two precisions
interleaved in one process so the machine's load falls on both alike. Says whether compute_dtype would pick bf16 here.

  python -m scripts.bench_cpu_precision [--steps 6] [--threads 1]
"""
import argparse
import time

import torch

from common import compute_dtype, cpu_has_bf16
from dataloader import VisionDataLoader
from nano_deepseek_ocr import ModelSources, new_model
from scripts.tok_train import load_or_train_tokenizer
from tasks.synthetic import SyntheticReading


def matmul_rate(dtype, repeats=20):
    a, b = torch.randn(512, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 512 * 1024 * 1024 * repeats / (time.perf_counter() - t0) / 1e9


def main():
    parser = argparse.ArgumentParser(description="fp32 against bf16 on this CPU: matmul rates and the demo's step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per precision (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"native bf16 (avx512_bf16 / amx_bf16): {cpu_has_bf16()}; compute_dtype picks {compute_dtype('cpu')}")
    print(f"matmul 512x1024 @ 1024x1024, {args.threads} thread(s): fp32 {matmul_rate(torch.float32):.0f} GFLOP/s, "
          f"bf16 {matmul_rate(torch.bfloat16):.0f} GFLOP/s")
    load_or_train_tokenizer(2048)
    torch.manual_seed(0)
    model, tokenizer = new_model(ModelSources(encoder="tiny", depth=4, init_encoder="random"), 512)
    optimizers = model.setup_optimizers(vision_lr=1e-4)
    batches = iter(VisionDataLoader(SyntheticReading(10_000, seed=0), tokenizer, ["tiny"], 4, 512))
    times = {"fp32": [], "bf16": []}
    for step in range(2 * (args.steps + 1)):  # fp32 and bf16 in turn, the first of each a warm-up
        precision = "bf16" if step % 2 else "fp32"
        batch = next(batches)
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = model.batch_loss(batch)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if step >= 2:
            times[precision].append(time.perf_counter() - t0)
    fp32, bf16 = (sum(t) / len(t) for t in times.values())
    print(f"demo step (4 x 512 tokens), {args.threads} thread(s): fp32 {fp32:.2f} s, bf16 {bf16:.2f} s, "
          f"{fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
