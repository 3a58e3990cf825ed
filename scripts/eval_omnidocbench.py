"""
OmniDocBench (opendatalab/OmniDocBench): write one markdown file per page, named after the page image, in the
layout the official end-to-end scorer reads, then score it with the official tool:

  git clone https://github.com/opendatalab/OmniDocBench && cd OmniDocBench
  # configs/end2end.yaml: ground_truth.data_path = <OmniDocBench.json>, prediction.data_path = <our markdown dir>
  python pdf_validation.py --config configs/end2end.yaml

Also prints a quick built-in score: normalised edit distance of the page text (layout blocks joined in reading
order, whitespace collapsed) against our markdown with the markup stripped. Not the official number.

  python -m scripts.eval_omnidocbench [--checkpoint DIR] [--mode base] [--data DIR] [--max_pages N]
"""
import argparse
import html
import json
import os
import re
import sys
from functools import partial

from common import UserError, append_report, run_command
from config import DOC_TO_MARKDOWN, MODES, base_dir
from engine import document_ngram_rule
from grounding import strip_grounding
from hub import hub_snapshot
from image_process import load_image
from metrics import normalized_edit_distance
from scripts.readers import add_reader_args, load_engine, read_with_progress

def load_pages(source=None, max_pages=0):
    """(OmniDocBench.json path, [(page dict, image path)]) from a local copy or the hub; images are opened later."""
    if source is not None and not os.path.isdir(source):
        raise UserError(f"--data {source}: no such folder (a copy of the OmniDocBench dataset repository was expected)")
    root = source or hub_snapshot("opendatalab/OmniDocBench", repo_type="dataset",
                                  allow_patterns=["OmniDocBench.json", "images/*"],
                                  hint="or pass --data with a local copy of the dataset repository")
    path = os.path.join(root, "OmniDocBench.json")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: --data must be a copy of the OmniDocBench dataset repository")
    with open(path, encoding="utf-8") as f:
        pages = json.load(f)[:max_pages or None]
    return path, [(p, os.path.join(root, "images", os.path.basename(p["page_info"]["image_path"]))) for p in pages]


def plain(text):
    """Text without markdown / HTML / grounding markup, entities decoded, whitespace collapsed, for the quick score
    (applied to both sides alike)."""
    text = html.unescape(re.sub(r"<[^>]+>", " ", strip_grounding(text)))
    text = re.sub(r"^#+\s*|^\s*[-*]\s+|\*\*|__", "", text, flags=re.M)
    return " ".join(text.split())


def block_text(block):
    """A layout block's ground truth: a table's HTML (its cells, as we write tables; its LaTeX could never match),
    an equation's LaTeX, any other block's text."""
    if block.get("category_type") == "table":
        return block.get("html") or ""
    return block.get("text") or block.get("latex") or ""


def page_text(page):
    """The page's ground-truth text: its layout blocks in reading order ('abandon' blocks such as page numbers
    skipped)."""
    blocks = [b for b in page.get("layout_dets", [])
              if b.get("category_type") != "abandon" and b.get("order") is not None]
    return plain(" ".join(block_text(b) for b in sorted(blocks, key=lambda b: b["order"])))


def predict(engine, pages, mode, max_tokens, out_dir):
    """Write <image stem>.md for every page as it finishes; a page that cannot be read is reported and left out.
    Returns ([(page, markdown)] in the pages' order, names of the pages that could not be read)."""
    os.makedirs(out_dir, exist_ok=True)
    by_name = {os.path.basename(image_path): page for page, image_path in pages}
    outputs, failed = {}, []
    prompted = [(os.path.basename(image_path), partial(load_image, image_path), DOC_TO_MARKDOWN)
                for _, image_path in pages]
    for name, _, text in read_with_progress(engine, prompted, mode, max_tokens, failed, "OmniDocBench",
                                            **document_ngram_rule(engine.tokenizer)):
        outputs[name] = strip_grounding(text)
        with open(os.path.join(out_dir, os.path.splitext(name)[0] + ".md"), "w", encoding="utf-8") as f:
            f.write(outputs[name])
    return [(by_name[name], outputs[name]) for name in by_name if name in outputs], failed


def quick_scores(outputs):
    """Mean normalised edit distance of page text, overall and by page language."""
    by_language = {}
    for page, markdown in outputs:
        language = page["page_info"].get("page_attribute", {}).get("language", "unknown")
        by_language.setdefault(language, []).append(normalized_edit_distance(plain(markdown), page_text(page)))
    scores = {lang: sum(v) / len(v) for lang, v in by_language.items()}
    scores["all"] = sum(sum(v) for v in by_language.values()) / max(1, sum(len(v) for v in by_language.values()))
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description="OmniDocBench predictions for the official scorer, and a quick score")
    parser.add_argument("--mode", default=None, choices=list(MODES),
                        help="resolution mode (default: the one the checkpoint trained in)")
    parser.add_argument("--data", default=None, help="a local copy of the dataset repository (default: download)")
    parser.add_argument("--max_pages", type=int, default=0, help="read only the first N pages (0: all)")
    parser.add_argument("--out", default=None, help="folder for the markdown (default: <base dir>/eval/omnidocbench)")
    add_reader_args(parser, max_tokens=4096)
    args = parser.parse_args(argv)
    gt_path, pages = load_pages(args.data, args.max_pages)
    engine, meta, checkpoint, (mode,) = load_engine(args, [args.mode] if args.mode else None)
    out_dir = args.out or base_dir("eval", "omnidocbench", mode)
    outputs, unreadable = predict(engine, pages, mode, args.max_tokens, out_dir)
    scores = quick_scores(outputs)
    lines = [f"- {len(outputs)} of {len(pages)} pages, {mode} mode, checkpoint {checkpoint}; "
             f"markdown in {out_dir}",
             "- quick text edit distance (not the official metric): " +
             ", ".join(f"{k} {v:.3f}" for k, v in scores.items()),
             "- paper (official end2end, EN overall edit distance): Tiny 0.386, Small 0.221, Base 0.137, Large 0.138, "
             "Gundam 0.127",
             f"- official score: in OmniDocBench/, set configs/end2end.yaml ground_truth.data_path={gt_path} and "
             f"prediction.data_path={out_dir}, then `python pdf_validation.py --config configs/end2end.yaml`"]
    lines += [f"- not readable, left out: {', '.join(unreadable)}"] if unreadable else []
    print("\n".join(lines))
    append_report(f"OmniDocBench ({mode})", lines)
    return scores, unreadable


if __name__ == "__main__":
    sys.exit(1 if run_command(main)[1] else 0)
