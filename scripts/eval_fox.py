"""
Fox benchmark (ucaslcl/Fox_benchmark_data), English page OCR, as DeepSeek-OCR reports it: prompt
"<image>\\nFree OCR." in Tiny (64 vision tokens) and Small (100) modes, Fox's own precision (see metrics.py),
pages binned by ground-truth text tokens (600-700 ... 1200-1300) with the compression ratio of each bin.
Predictions are saved in Fox's output format (image, label = ground truth, answer = model output).

  python -m scripts.eval_fox [--checkpoint DIR] [--modes tiny,small] [--data focus_benchmark_test.zip or dir]
"""
import argparse
import json
import os
import zipfile

from PIL import Image

from checkpoint import load_for_inference
from common import append_report
from config import FREE_OCR, MODES, base_dir
from dataset import hub_file
from image_process import num_image_slots, prepare_image
from metrics import fox_scores
from nano_deepseek_ocr import ocr

BINS = [(600, 700), (700, 800), (800, 900), (900, 1000), (1000, 1100), (1100, 1200), (1200, 1300)]
# DeepSeek-OCR's published precision (%) at 64 / 100 vision tokens
PAPER = {(600, 700): (96.5, 98.5), (1000, 1100): (79.3, 91.5), (1200, 1300): (59.1, 87.1)}


def load_pages(source=None):
    """[(image name, PIL image, ground truth)] for English page OCR from Fox's zip (downloaded) or an extracted folder."""
    source = source or hub_file("ucaslcl/Fox_benchmark_data", "focus_benchmark_test.zip", repo_type="dataset")
    if os.path.isdir(source):
        root = source if os.path.exists(os.path.join(source, "en_page_ocr.json")) else os.path.join(source, "focus_benchmark_test")
        with open(os.path.join(root, "en_page_ocr.json"), encoding="utf-8") as f:
            entries = json.load(f)
        return [(e["image"], Image.open(os.path.join(root, "en_pdf_png", e["image"])), e["conversations"][1]["value"]) for e in entries]
    with zipfile.ZipFile(source) as z:
        entries = json.loads(z.read("focus_benchmark_test/en_page_ocr.json"))
        return [(e["image"], Image.open(z.open(f"focus_benchmark_test/en_pdf_png/{e['image']}")).copy(), e["conversations"][1]["value"])
                for e in entries]


def evaluate(model, tokenizer, pages, modes, autocast, max_tokens, out_dir):
    """Run, save predictions per mode, score. Returns {mode: [per-page dict]}."""
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for mode in modes:
        rows = []
        for name, image, truth in pages:
            image = prepare_image(image, name)
            with autocast:
                answer = ocr(model, tokenizer, [image], FREE_OCR, mode, max_tokens)[0]
            rows.append(dict(image=name, label=truth, answer=answer, mode=mode, text_tokens=len(tokenizer.encode(truth)),
                             vision_tokens=num_image_slots(image.width, image.height, mode), **fox_scores(answer, truth)))
        with open(os.path.join(out_dir, f"fox_en_page_{mode}.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1, ensure_ascii=False)
        results[mode] = rows
    return results


def table(results):
    """Paper-style table: per text-token bin, pages, compression (text tokens / q*q vision features) and precision per mode."""
    modes = list(results)
    features = {m: (MODES[m]["base_size"] // 64) ** 2 for m in modes}
    columns = " | ".join(f"{m} ({features[m]} tok): compression, precision" for m in modes)
    lines = [f"| text tokens | pages | {columns} | paper 64 / 100 |",
             "|---|---|" + "---|" * len(modes) + "---|"]
    first = results[modes[0]]
    for lo, hi in BINS + [(0, 10 ** 9)]:
        idx = [i for i, r in enumerate(first) if lo <= r["text_tokens"] < hi]
        if not idx:
            continue
        cells = []
        for m in modes:
            comp = sum(results[m][i]["text_tokens"] for i in idx) / len(idx) / features[m]
            prec = 100 * sum(results[m][i]["precision"] for i in idx) / len(idx)
            cells.append(f"{comp:.1f}x, {prec:.1f}%")
        paper = "/".join(map(str, PAPER[(lo, hi)])) if (lo, hi) in PAPER else "-"
        lines.append(f"| {'all' if hi == 10 ** 9 else f'{lo}-{hi}'} | {len(idx)} | " + " | ".join(cells) + f" | {paper} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fox English page OCR")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--modes", default="tiny,small")
    parser.add_argument("--data", default=None, help="focus_benchmark_test.zip or its extracted folder (default: download)")
    parser.add_argument("--max_pages", type=int, default=0)
    parser.add_argument("--max_tokens", type=int, default=2048)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    model, tokenizer, meta, autocast, checkpoint = load_for_inference(args.checkpoint, device=args.device)
    pages = load_pages(args.data)[:args.max_pages or None]
    out_dir = args.out or base_dir("eval", "fox")
    results = evaluate(model, tokenizer, pages, args.modes.split(","), autocast, args.max_tokens, out_dir)
    lines = table(results)
    print(f"Fox English page OCR, {len(pages)} pages, checkpoint {checkpoint} (text tokens counted with our tokenizer)")
    print("\n".join(lines))
    append_report("Fox (English page OCR)", lines)
    return results


if __name__ == "__main__":
    main()
