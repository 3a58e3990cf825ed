"""
fp32 against bf16 on this CPU, side by side: the rate of a 512x1024 by 1024x1024 matmul, and the demo's training step
(tiny encoder, d4 GPT, 4 rows of 512 tokens of reading pages: forward, backward, optimizers), the two precisions
interleaved in one process so the machine's load falls on both alike. Says whether compute_dtype would pick bf16 here;
--profile then prints where two steps in the compute dtype spend their time, kernel by kernel (torch.profiler).

  python -m scripts.bench_cpu_precision [--steps 6] [--threads 1] [--profile]
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
    parser.add_argument("--profile", action="store_true", help="then profile two steps in the compute dtype")
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

    def step(bf16):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = model.batch_loss(next(batches))
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    times = {"fp32": [], "bf16": []}
    for i in range(2 * (args.steps + 1)):  # fp32 and bf16 in turn, the first of each a warm-up
        precision = "bf16" if i % 2 else "fp32"
        t0 = time.perf_counter()
        step(precision == "bf16")
        if i >= 2:
            times[precision].append(time.perf_counter() - t0)
    fp32, bf16 = (sum(t) / len(t) for t in times.values())
    print(f"demo step (4 x 512 tokens), {args.threads} thread(s): fp32 {fp32:.2f} s, bf16 {bf16:.2f} s, "
          f"{fp32 / bf16:.2f}x")
    if args.profile:
        bf16 = compute_dtype("cpu") == torch.bfloat16
        with torch.profiler.profile(record_shapes=True) as prof:
            for _ in range(2):
                step(bf16)
        print(f"two steps in {'bf16' if bf16 else 'fp32'}, by kernel and shape:")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20,
                                                                max_name_column_width=40, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
