"""
Generation speed at a tiny config on this machine: decode tokens/s with and without the KV cache, and the
prefill time (image encoding + prompt) per image for each mode. Random weights: speed does not depend on them.

  python -m scripts.bench_generate [--tokens 64] [--depth 4]
"""
import argparse
import time

import torch
from PIL import Image

from image_process import DeepseekOCRProcessor
from nano_deepseek_ocr import NanoDeepseekOCRConfig, build_model, tiny_encoder_configs, gpt_config_for_depth
from tasks.synthetic import corpus
from tokenizer import RustBPETokenizer
from config import MODES, FREE_OCR


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = RustBPETokenizer.train_from_iterator(corpus(1000), 2048)
    sam, clip = tiny_encoder_configs()
    model = build_model(NanoDeepseekOCRConfig(sam, clip, gpt_config_for_depth(args.depth, tokenizer.get_vocab_size(), 4096),
                                              tokenizer.image_token_id)).eval()
    with torch.no_grad():
        model.gpt.lm_head.weight.normal_(0, 0.02)  # non-degenerate logits
    page = Image.new("RGB", (1240, 1754), (255, 255, 255))
    print(f"tiny DeepEncoder + d{args.depth} GPT, {torch.get_num_threads()} threads, {args.tokens} new tokens")
    for mode in MODES:
        item = DeepseekOCRProcessor(mode).process_image(page)
        ids = tokenizer.render_vision_pretraining(f"<image>\n{FREE_OCR}", 1 << 30, [item["num_image_tokens"]])[0]
        t0 = time.perf_counter()
        model.generate([ids], [item], max_new_tokens=1)
        prefill = time.perf_counter() - t0
        line = f"{mode:>7}: {item['num_image_tokens']:4d} slots, prefill {prefill * 1000:7.1f} ms"
        if mode == "base":
            speeds = {}
            for use_cache in (True, False):
                t0 = time.perf_counter()
                out = model.generate([ids], [item], max_new_tokens=args.tokens + 1, use_cache=use_cache)[0]
                speeds[use_cache] = (len(out) - 1) / (time.perf_counter() - t0 - prefill)
            line += (f" | decode {speeds[True]:.1f} tok/s with KV cache, {speeds[False]:.1f} tok/s without "
                     f"({speeds[True] / speeds[False]:.0f}x)")
        print(line)


if __name__ == "__main__":
    main()
