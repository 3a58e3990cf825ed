"""
Download and prepare the nine datasets (and SmolTalk) once, before a multi-GPU run, so the ranks do not race
to prepare them. Each task streams its source, writes images to disk and samples.jsonl; an interrupted
preparation resumes where it stopped.

  python -m scripts.prepare_data --max_samples=50000
"""
import argparse

from tasks.chartqa import ChartQA
from tasks.docbank import DocBank
from tasks.figureqa import FigureQA
from tasks.latex_formulas import LatexFormulas
from tasks.llava_cc3m import LlavaCC3M
from tasks.mathwriting import MathWriting
from tasks.olmocr import OlmOCR
from tasks.plotqa import PlotQA
from tasks.pubtables import PubTables
from tasks.smoltalk import SmolTalk
from train import split_of

VISION_TASKS = [DocBank, OlmOCR, LlavaCC3M, PlotQA, ChartQA, FigureQA, PubTables, LatexFormulas, MathWriting]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="prepare the training datasets")
    parser.add_argument("--max_samples", type=int, default=0, help="per dataset; 0 = all")
    parser.add_argument("--only", default="", help="comma-separated task names, e.g. chartqa,plotqa")
    args = parser.parse_args()
    wanted = set(filter(None, args.only.split(",")))
    for cls in VISION_TASKS:
        if not wanted or cls.name in wanted:
            for split in ("train", "val"):
                print(f"{cls.name} {split}: {len(split_of(cls, split, args.max_samples or None)):,} samples")
    if not wanted or "smoltalk" in wanted:
        print(f"smoltalk: {len(SmolTalk('train', args.max_samples or None)):,} conversations")
