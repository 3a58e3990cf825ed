"""
Data pipeline throughput on synthetic pages rendered beforehand (so rendering is not timed), Base and Gundam:
  per core:     decode + preprocess + tokenize + pack in one process, one thread;
  loader:       VisionDataLoader with --workers processes (views move as uint8, as in training).
Target: >= 70 Base images/s per GPU with <= 12 workers.

  python -m scripts.bench_dataloader [--samples 64] [--workers 2]
"""
import argparse
import time

import torch

from dataloader import SampleDataset, VisionDataLoader, pack
from scripts.tok_train import load_or_train_tokenizer
from tasks.synthetic import SyntheticPages


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64, help="samples to load per measurement")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--modes", default="base,gundam", help="comma-separated modes to measure")
    parser.add_argument("--seq_len", type=int, default=8192, help="tokens per packed row")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the per-core number is what scales with loader workers
    tokenizer = load_or_train_tokenizer()
    pages = SyntheticPages(args.samples, seed=2024, sizes=(1000, 1700))  # page-sized scans, mostly above 1024 px
    for i in range(len(pages)):
        pages[i]  # render once, outside the timing
    print(f"{args.samples} synthetic pages (1000-1700 px wide), rows of {args.seq_len} tokens")
    for mode in args.modes.split(","):
        dataset = SampleDataset(pages, tokenizer, [mode], args.seq_len + 1)
        t0 = time.perf_counter()
        samples = [dataset[i] for i in range(len(dataset))]
        pack(samples, len(samples), args.seq_len, tokenizer.get_bos_token_id())
        print(f"{mode:>7}: {len(samples) / (time.perf_counter() - t0):6.1f} samples/s per core")
        it = iter(VisionDataLoader(pages, tokenizer, mode, batch_size=4, seq_len=args.seq_len,
                                   num_workers=args.workers))
        next(it)  # start the workers
        t0, images = time.perf_counter(), 0
        while images < 2 * args.samples:
            images += len(next(it)["images"])
        print(f"{'':>7}  loader, {args.workers} workers: {images / (time.perf_counter() - t0):6.1f} images/s")


if __name__ == "__main__":
    main()
