"""
Data pipeline throughput per CPU core: decode + preprocess + tokenize + collate of synthetic pages (pages
rendered to disk beforehand, so rendering is not timed), single process, for Base and Gundam modes.
Target: >= 10 Base samples/s per core, so 8 loader cores outrun one H100.

  python -m scripts.bench_dataloader [--samples 64] [--batch_size 8]
"""
import argparse
import time

import torch

from dataloader import SampleDataset, collate
from scripts.tok_train import load_or_train_tokenizer
from tasks.synthetic import SyntheticPages


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--modes", default="base,gundam")
    parser.add_argument("--seq_len", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the number per core is what scales with loader workers
    tokenizer = load_or_train_tokenizer()
    pages = SyntheticPages(args.samples, seed=2024, sizes=(1000, 1700))  # page-sized scans, mostly above 1024 px
    for i in range(len(pages)):
        pages[i]  # render once, outside the timing
    print(f"{args.samples} synthetic pages (1000-1700 px wide), batch {args.batch_size}, 1 thread")
    for mode in args.modes.split(","):
        dataset = SampleDataset(pages, tokenizer, [mode], args.seq_len + 1)
        t0 = time.perf_counter()
        tokens = 0
        for start in range(0, len(dataset), args.batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + args.batch_size, len(dataset)))], tokenizer.get_bos_token_id())
            tokens += batch["input_ids"].numel()
        dt = time.perf_counter() - t0
        print(f"{mode:>7}: {len(dataset) / dt:6.1f} samples/s per core ({tokens / dt:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
