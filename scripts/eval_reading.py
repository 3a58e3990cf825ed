"""
Held-out reading check, the way a user reads: pages of each kind rendered afresh from a seed that neither training
nor validation uses (grid pages: a character per feature cell; type: ordinary type, DejaVu Sans or Serif at 44-60 px,
loose layout), saved as PNG files, read by scripts/ocr.py with its defaults, and scored by character error rate
(normalised edit distance per page, averaged).

  python -m scripts.eval_reading [--checkpoint DIR] [--pages 50] [--kinds grid,type]
  python -m scripts.eval_reading --pages 3 --keep pages/     # keeps the pages (grid_000.png + grid_000.txt, ...) to try
"""
import argparse
import contextlib
import io
import os
import random
import tempfile

from common import append_report, run_command
from metrics import normalized_edit_distance
from scripts import ocr
from tasks.synthetic import READING_KINDS


def render_pages(directory, kind, n, seed):
    """n pages of one kind as PNG files, each with its text beside it (.txt) -> {path stem: expected text}."""
    expected = {}
    for i in range(n):
        image, text = READING_KINDS[kind](random.Random(f"heldout-{kind}-{seed}-{i}"))
        stem = os.path.join(directory, f"{kind}_{i:03d}")
        image.save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(text)
        expected[stem] = text
    return expected


def main(argv=None):
    parser = argparse.ArgumentParser(description="held-out CER on freshly rendered reading pages, read by scripts.ocr")
    parser.add_argument("--checkpoint", default=None, help="checkpoint or run directory (default: the most recent run)")
    parser.add_argument("--pages", type=int, default=50, help="pages of each kind")
    parser.add_argument("--kinds", default="grid,type", help=f"comma-separated kinds of page out of {','.join(READING_KINDS)}")
    parser.add_argument("--seed", type=int, default=2026, help="which held-out pages")
    parser.add_argument("--max_tokens", default=None, help="new tokens at most per page (default: scripts.ocr's)")
    parser.add_argument("--keep", default=None, help="a folder to keep the pages and their texts in (default: none)")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in READING_KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; kinds are {','.join(READING_KINDS)}")
    results = {}
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as directory:
        for kind in kinds:
            expected = render_pages(directory, kind, args.pages, args.seed)
            with contextlib.redirect_stdout(io.StringIO()):  # the pages' text: scored here, not shown
                read, _ = ocr.main([stem + ".png" for stem in expected] +
                                   (["--checkpoint", args.checkpoint] if args.checkpoint else []) +
                                   (["--max_tokens", args.max_tokens] if args.max_tokens else []))
            texts = dict(read)
            results[kind] = sum(normalized_edit_distance(texts.get(stem, ""), text)
                                for stem, text in expected.items()) / len(expected)
    lines = [f"- held-out CER on {kind} pages, read by scripts.ocr with its defaults: {cer:.3f} ({args.pages} pages)"
             for kind, cer in results.items()]
    print("\n".join(lines))
    append_report("Reading check (pages rendered afresh)", lines)
    return results


if __name__ == "__main__":
    run_command(main)
