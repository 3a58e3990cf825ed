"""
DeepSeek-OCR's compression study, offline: synthetic document pages read with "Free OCR." in Tiny / Small /
Base, binned by ground-truth text tokens; per bin the compression ratio (text tokens per vision feature) and
Fox-style precision. Prints a table and saves a plot (precision against compression, one line per mode).

  python -m scripts.eval_compression [--checkpoint DIR] [--pages 200] [--modes tiny,small,base]
"""
import argparse
import os
import sys
from functools import partial

from common import append_report, line_plot, run_command
from config import base_dir
from scripts.readers import add_reader_args, load_engine, modes_arg, read_with_progress
from image_process import load_image, vision_features
from metrics import fox_scores
from tasks.synthetic import SyntheticPages


def run(engine, pages, modes, max_tokens, failed=None):
    """[{mode, text_tokens, vision_features, precision}] for every page and mode; pages that cannot be read are
    named on stderr and added to `failed`."""
    samples = [pages[i] for i in range(len(pages))]
    rows, failed = [], [] if failed is None else failed
    for mode in modes:
        prompted = [(i, partial(load_image, s["image_path"]), s["text"]) for i, s in enumerate(samples)]
        for i, _, answer in read_with_progress(engine, prompted, mode, max_tokens, failed, mode):
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
        out[mode] = [(lo, sum(r["text_tokens"] / r["vision_features"] for r in b) / len(b),
                      sum(r["precision"] for r in b) / len(b), len(b)) for lo, b in sorted(bins.items())]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="compression study on synthetic pages")
    parser.add_argument("--pages", type=int, default=200, help="synthetic document pages to read")
    parser.add_argument("--modes", type=modes_arg, default=None,
                        help="comma-separated modes (the study: tiny,small,base; default: those the checkpoint trained in)")
    parser.add_argument("--bin_width", type=int, default=100, help="text tokens per bin")
    parser.add_argument("--seed", type=int, default=777, help="which synthetic pages")
    parser.add_argument("--out", default=None, help="where to save the plot (default: <base dir>/compression.png)")
    add_reader_args(parser, max_tokens=1024)
    args = parser.parse_args(argv)
    engine, meta, checkpoint, modes = load_engine(args, args.modes)
    pages = SyntheticPages(args.pages, seed=args.seed, kinds=("document",), sizes=(768, 1024), doc_styles=("free",))
    unreadable = []
    curves = binned(run(engine, pages, modes, args.max_tokens, unreadable), modes, args.bin_width)
    lines = ["| text tokens | " + " | ".join(f"{m}: compression, precision (pages)" for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for k, (lo, *_rest) in enumerate(curves[modes[0]]):
        lines.append(f"| {lo}-{lo + args.bin_width} | " + " | ".join(
            f"{curves[m][k][1]:.1f}x, {100 * curves[m][k][2]:.1f}% ({curves[m][k][3]})" for m in modes) + " |")
    path = line_plot({f"{m} ({vision_features(m)} tokens)": [(c, 100 * p) for _, c, p, _ in curves[m]] for m in modes},
                     args.out or os.path.join(base_dir(), "compression.png"),
                     "compression (text tokens per vision token)", "precision (%)")
    print(f"compression study: {len(pages)} synthetic pages, checkpoint {checkpoint}")
    print("\n".join(lines) + f"\nplot: {path}")
    append_report("Compression study (synthetic pages)", lines + [f"- plot: {path}"])
    return curves, unreadable


if __name__ == "__main__":
    sys.exit(1 if run_command(main)[1] else 0)
