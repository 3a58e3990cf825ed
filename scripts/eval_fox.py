"""
Fox benchmark (ucaslcl/Fox_benchmark_data), English page OCR, as DeepSeek-OCR reports it: prompt
"<image>\\nFree OCR." in Tiny (64 vision tokens) and Small (100) modes, Fox's own precision (see metrics.py),
pages binned by ground-truth text tokens (600-700 ... 1200-1300) with the compression ratio of each bin.
Predictions are saved in Fox's output format (image, label = ground truth, answer = model output) as pages
finish; a page that cannot be read is reported and left out.

  python -m scripts.eval_fox [--checkpoint DIR] [--modes tiny,small] [--data focus_benchmark_test.zip or dir]
"""
import argparse
import json
import os
import sys
import zipfile

from common import UserError, append_report, atomic_open, run_command
from config import FREE_OCR, base_dir
from scripts.readers import add_reader_args, load_engine, modes_arg, read_with_progress
from hub import hub_file
from image_process import load_image, num_image_slots, vision_features
from metrics import fox_scores

BINS = [(600, 700), (700, 800), (800, 900), (900, 1000), (1000, 1100), (1100, 1200), (1200, 1300)]
# DeepSeek-OCR's published precision (%) at 64 / 100 vision tokens
PAPER = {(600, 700): (96.5, 98.5), (1000, 1100): (79.3, 91.5), (1200, 1300): (59.1, 87.1)}


def load_pages(source=None):
    """[(image name, load() -> RGB image, ground truth)] for English page OCR, from Fox's zip (downloaded) or an
    extracted folder. Images are read only when load() is called."""
    if source is not None and not os.path.exists(source):
        raise UserError(f"--data {source}: no such file or folder (Fox's focus_benchmark_test.zip or its extracted "
                        "folder was expected)")
    source = source or hub_file("ucaslcl/Fox_benchmark_data", "focus_benchmark_test.zip", repo_type="dataset",
                                hint="or pass --data with the zip or its extracted folder")
    if os.path.isdir(source):
        extracted = os.path.exists(os.path.join(source, "en_page_ocr.json"))
        root = source if extracted else os.path.join(source, "focus_benchmark_test")
        if not os.path.exists(os.path.join(root, "en_page_ocr.json")):
            raise UserError(f"--data {source}: no en_page_ocr.json in it or in its focus_benchmark_test/ (Fox's "
                            "focus_benchmark_test.zip, or the folder it extracts to, was expected)")
        with open(os.path.join(root, "en_page_ocr.json"), encoding="utf-8") as f:
            entries = json.load(f)
        return [(e["image"], lambda p=os.path.join(root, "en_pdf_png", e["image"]): load_image(p),
                 e["conversations"][1]["value"]) for e in entries]
    try:
        with zipfile.ZipFile(source) as z:
            entries = json.loads(z.read("focus_benchmark_test/en_page_ocr.json"))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:
        raise UserError(f"--data {source}: not Fox's focus_benchmark_test.zip ({type(e).__name__}: {e})") from None

    def load(name):
        with zipfile.ZipFile(source) as z:
            return load_image(z.read(f"focus_benchmark_test/en_pdf_png/{name}"), name)
    return [(e["image"], lambda n=e["image"]: load(n), e["conversations"][1]["value"]) for e in entries]


def evaluate(engine, pages, modes, max_tokens, out_dir):
    """Read every page in every mode; each mode's predictions are saved as its pages finish. -> ({mode: rows}, names
    of the pages that could not be read)."""
    os.makedirs(out_dir, exist_ok=True)
    results, unreadable = {}, set()
    for mode in modes:
        failed, rows = [], []
        truths = {name: truth for name, _, truth in pages}
        prompted = [(name, load, FREE_OCR) for name, load, _ in pages]
        for name, image, answer in read_with_progress(engine, prompted, mode, max_tokens, failed, f"Fox {mode}"):
            truth = truths[name]
            rows.append(dict(image=name, label=truth, answer=answer, mode=mode,
                             text_tokens=len(engine.tokenizer.encode(truth)),
                             vision_tokens=num_image_slots(image.width, image.height, mode),
                             **fox_scores(answer, truth)))
            with atomic_open(os.path.join(out_dir, f"fox_en_page_{mode}.json"), encoding="utf-8") as f:
                json.dump(sorted(rows, key=lambda r: r["image"]), f, indent=1, ensure_ascii=False)
        if failed:
            print(f"Fox {mode}: {len(failed)} page(s) could not be read: {', '.join(failed)}", file=sys.stderr)
        unreadable.update(failed)
        results[mode] = sorted(rows, key=lambda r: r["image"])
    return results, sorted(unreadable)


def table(results):
    """Paper-style table: per text-token bin, pages, compression (text tokens / q*q vision features) and precision
    per mode, over the pages read in every mode."""
    modes = list(results)
    features = {m: vision_features(m) for m in modes}
    columns = " | ".join(f"{m} ({features[m]} tok): compression, precision" for m in modes)
    lines = [f"| text tokens | pages | {columns} | paper 64 / 100 |",
             "|---|---|" + "---|" * len(modes) + "---|"]
    by_image = {m: {r["image"]: r for r in results[m]} for m in modes}
    read_in_all = [r for r in results[modes[0]] if all(r["image"] in by_image[m] for m in modes)]
    for lo, hi in BINS + [(0, 10 ** 9)]:
        names = [r["image"] for r in read_in_all if lo <= r["text_tokens"] < hi]
        if not names:
            continue
        cells = []
        for m in modes:
            comp = sum(by_image[m][n]["text_tokens"] for n in names) / len(names) / features[m]
            prec = 100 * sum(by_image[m][n]["precision"] for n in names) / len(names)
            cells.append(f"{comp:.1f}x, {prec:.1f}%")
        paper = "/".join(map(str, PAPER[(lo, hi)])) if (lo, hi) in PAPER else "-"
        label = "all" if hi == 10 ** 9 else f"{lo}-{hi}"
        lines.append(f"| {label} | {len(names)} | " + " | ".join(cells) + f" | {paper} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fox English page OCR")
    parser.add_argument("--modes", type=modes_arg, default=None,
                        help="comma-separated modes (the paper: tiny,small; default: those the checkpoint trained in)")
    parser.add_argument("--data", default=None,
                        help="focus_benchmark_test.zip or its extracted folder (default: download)")
    parser.add_argument("--max_pages", type=int, default=0, help="read only the first N pages (0: all)")
    parser.add_argument("--out", default=None, help="folder for the predictions (default: <base dir>/eval/fox)")
    add_reader_args(parser, max_tokens=2048)
    args = parser.parse_args(argv)
    pages = load_pages(args.data)[:args.max_pages or None]
    engine, meta, checkpoint, modes = load_engine(args, args.modes)
    out_dir = args.out or base_dir("eval", "fox")
    results, unreadable = evaluate(engine, pages, modes, args.max_tokens, out_dir)
    lines = table(results) + ([f"- not readable, left out: {', '.join(unreadable)}"] if unreadable else [])
    print(f"Fox English page OCR, {len(pages)} pages, checkpoint {checkpoint} (text tokens counted with our tokenizer)")
    print("\n".join(lines))
    append_report("Fox (English page OCR)", lines)
    return results, unreadable


if __name__ == "__main__":
    sys.exit(1 if run_command(main)[1] else 0)
