"""
DeepSeek-OCR's compression study, offline: synthetic document pages read with "Free OCR." in Tiny / Small /
Base, binned by ground-truth text tokens; per bin the compression ratio (text tokens per vision feature) and
Fox-style precision. Prints a table and saves a plot (precision against compression, one line per mode).

  python -m scripts.eval_compression [--checkpoint DIR] [--pages 200] [--modes tiny,small,base]
"""
import argparse
import os
import sys

from PIL import Image, ImageDraw
from tqdm import tqdm

from common import append_report, run_command
from config import base_dir
from engine import add_reader_args, load_engine
from image_process import load_image, vision_features
from metrics import fox_scores
from tasks.synthetic import SyntheticPages, font

COLOURS = [(200, 40, 40), (40, 90, 200), (30, 150, 60), (200, 130, 0), (120, 40, 160)]


def run(engine, pages, modes, max_tokens):
    """[{mode, text_tokens, vision_features, precision}] for every page and mode."""
    samples = [pages[i] for i in range(len(pages))]
    rows = []
    for mode in modes:
        stream = ((i, load_image(s["image_path"]), s["text"]) for i, s in enumerate(samples))
        for i, answer in tqdm(engine.read_iter(stream, mode, max_tokens), total=len(samples), desc=mode, unit="page",
                              file=sys.stderr):
            truth = samples[i]["response"]
            rows.append(dict(mode=mode, text_tokens=len(engine.tokenizer.encode(truth)),
                             vision_features=vision_features(mode), precision=fox_scores(answer, truth)["precision"]))
    return rows


def binned(rows, modes, width):
    """{mode: [(bin low, mean compression, mean precision, pages)]} over text-token bins of `width`."""
    out = {}
    for mode in modes:
        bins = {}
        for r in (r for r in rows if r["mode"] == mode):
            bins.setdefault(r["text_tokens"] // width * width, []).append(r)
        out[mode] = [(lo, sum(r["text_tokens"] / r["vision_features"] for r in b) / len(b), sum(r["precision"] for r in b) / len(b), len(b))
                     for lo, b in sorted(bins.items())]
    return out


def plot(curves, path):
    """Precision (%) against compression ratio, drawn with Pillow."""
    W, H, m = 900, 600, 70
    image = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(image)
    f = font(16)
    xmax = max([c for pts in curves.values() for _, c, _, _ in pts] + [1.0]) * 1.1

    def sx(x):
        return m + (W - 2 * m) * x / xmax

    def sy(y):
        return H - m - (H - 2 * m) * y / 100
    d.line((m, H - m, W - m, H - m), fill=(0, 0, 0), width=2)
    d.line((m, m, m, H - m), fill=(0, 0, 0), width=2)
    for y in range(0, 101, 20):
        d.text((m - 40, sy(y) - 8), str(y), font=f, fill=(0, 0, 0))
    for k in range(6):
        d.text((sx(xmax * k / 5) - 10, H - m + 8), f"{xmax * k / 5:.1f}", font=f, fill=(0, 0, 0))
    d.text((W // 2 - 140, H - 30), "compression (text tokens per vision token)", font=f, fill=(0, 0, 0))
    d.text((10, 20), "precision (%)", font=f, fill=(0, 0, 0))
    for i, (mode, pts) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [(sx(c), sy(100 * p)) for _, c, p, _ in pts]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=3)
        for x, y in xy:
            d.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
        d.text((W - m - 150, m + 24 * i), f"{mode} ({vision_features(mode)} tokens)", font=f, fill=colour)
    image.save(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="compression study on synthetic pages")
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--modes", default="tiny,small,base")
    parser.add_argument("--bin_width", type=int, default=100)
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--out", default=None, help="where to save the plot (default: <base dir>/compression.png)")
    add_reader_args(parser, max_tokens=1024)
    args = parser.parse_args(argv)
    engine, meta, checkpoint = load_engine(args)
    modes = args.modes.split(",")
    pages = SyntheticPages(args.pages, seed=args.seed, kinds=("document",), sizes=(768, 1024), doc_styles=("free",))
    curves = binned(run(engine, pages, modes, args.max_tokens), modes, args.bin_width)
    lines = ["| text tokens | " + " | ".join(f"{m}: compression, precision (pages)" for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for k, (lo, *_rest) in enumerate(curves[modes[0]]):
        lines.append(f"| {lo}-{lo + args.bin_width} | " + " | ".join(
            f"{curves[m][k][1]:.1f}x, {100 * curves[m][k][2]:.1f}% ({curves[m][k][3]})" for m in modes) + " |")
    path = plot(curves, args.out or os.path.join(base_dir(), "compression.png"))
    print(f"compression study: {len(pages)} synthetic pages, checkpoint {checkpoint}")
    print("\n".join(lines) + f"\nplot: {path}")
    append_report("Compression study (synthetic pages)", lines + [f"- plot: {path}"])
    return curves


if __name__ == "__main__":
    run_command(main)
