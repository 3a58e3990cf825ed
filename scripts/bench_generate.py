"""
Generation speed through the engine, random weights (speed does not depend on them): batch-1 latency (encode +
prefill, then ms per decoded token) and pages/s through continuous batching at larger batches, per mode, with
DeepSeek's n-gram rule on (20-grams, window 90). Every page decodes exactly --new_tokens tokens (no stop token).

  python -m scripts.bench_generate                                               # tiny model, this CPU
  python -m scripts.bench_generate --depth 20 --encoder full --device cuda      # the d20 figures of issue 11
  python -m scripts.bench_generate --depth 20 --encoder v2 --device cuda        # DeepEncoder V2: modes v2-base,v2
"""
import argparse
import time

import torch
from PIL import Image

from common import autodetect_device_type
from config import FREE_OCR, image_prompt
from deepencoder.encoder import ENCODERS, encoder_configs
from engine import Engine
from gpt import gpt_config_for_depth
from image_process import DeepseekOCRProcessor
from nano_deepseek_ocr import NanoDeepseekOCRConfig, build_model, reading_copy
from scripts.tok_train import train_tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=4, help="GPT depth (20: d20)")
    parser.add_argument("--encoder", default="tiny", choices=ENCODERS, help="which encoder, at which size")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: the best there is)")
    parser.add_argument("--vocab_size", type=int, default=0, help="GPT rows (65536: d20's true cost); 0: tokenizer's")
    parser.add_argument("--modes", default=None,
                        help="comma-separated modes (default: base,gundam; v2: v2-base,v2; v2-tiny: v2-tiny)")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens decoded per page")
    parser.add_argument("--batch_sizes", default="8", help="continuous-batching slot counts to measure")
    parser.add_argument("--pages", type=int, default=16, help="pages per throughput measurement")
    args = parser.parse_args()
    device = torch.device(args.device or autodetect_device_type())
    torch.manual_seed(0)
    tokenizer = train_tokenizer(2048, num_docs=1000)
    modes = args.modes or {"v2": "v2-base,v2", "v2-tiny": "v2-tiny"}.get(args.encoder, "base,gundam")
    gpt = gpt_config_for_depth(args.depth, max(args.vocab_size, tokenizer.get_vocab_size()), 4096)
    sam, clip, qwen2 = encoder_configs(args.encoder)
    model = build_model(NanoDeepseekOCRConfig(sam, clip, gpt, tokenizer.image_token_id, qwen2), device).eval()
    with torch.no_grad():
        model.gpt.lm_head.weight.normal_(0, 0.02)  # non-degenerate logits
    model = reading_copy(model)  # in the compute dtype, as the reading scripts run it
    page = Image.new("RGB", (1240, 1754), (255, 255, 255))  # an A4 page at 150 dpi: Gundam tiles it 2 x 3
    ngram = dict(no_repeat_ngram_size=20, ngram_window=90, stop_tokens=[])

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - t0

    print(f"{args.encoder} DeepEncoder + d{args.depth} GPT (vocab {gpt.vocab_size}) on {device}, "
          f"{args.new_tokens} new tokens per page, n-gram rule on")
    print(f"{'mode':>7} {'slots':>6} {'batch':>6} {'prefill ms':>11} {'ms/token':>9} {'tokens/s':>10} {'pages/s':>8}")
    for mode in modes.split(","):
        item = DeepseekOCRProcessor(mode).process_image(page)
        ids = tokenizer.render_for_completion(image_prompt(FREE_OCR), [item.slots])
        # batch 1: the prefill (images encoded, prompt run) and the decode steps, each timed by itself
        engine = Engine(model, tokenizer, batch_size=1)
        engine.generate([ids], [item], max_new_tokens=args.new_tokens, **ngram)  # warm-up: kernels, cache, CUDA graph
        prefill = min(timed(lambda: engine.prefill(torch.tensor([0], device=device), [ids], [item]))[1]
                      for _ in range(3))
        per_token = timed(lambda: [engine.step() for _ in range(args.new_tokens)])[1] / args.new_tokens
        total = prefill + args.new_tokens * per_token
        print(f"{mode:>7} {item.slots:>6} {1:>6} {prefill * 1000:>11.1f} {per_token * 1000:>9.2f} "
              f"{1 / per_token:>10,.0f} {1 / total:>8.2f}")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            engine = Engine(model, tokenizer, batch_size=batch)
            engine.generate([ids] * batch, [item] * batch, max_new_tokens=2, **ngram)
            outs, dt = timed(lambda: engine.generate([ids] * args.pages, [item] * args.pages, args.new_tokens, **ngram))
            tokens = sum(len(o) for o in outs)
            print(f"{mode:>7} {item.slots:>6} {batch:>6} {'':>11} {'':>9} {tokens / dt:>10,.0f} "
                  f"{args.pages / dt:>8.2f}")


if __name__ == "__main__":
    main()
