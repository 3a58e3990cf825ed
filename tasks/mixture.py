"""
What the stages train on: the nine datasets with their weights (DocBank and olmOCR x2) plus ~10% text in stage 2,
or the offline synthetic pages; and each dataset's train / validation split.
"""
import hashlib
import os

from common import print0
from dataset import MissingSplit
from tasks.chartqa import ChartQA
from tasks.common import VisionTaskMixture
from tasks.docbank import DocBank
from tasks.figureqa import FigureQA
from tasks.latex_formulas import LatexFormulas
from tasks.llava_cc3m import LlavaCC3M
from tasks.mathwriting import MathWriting
from tasks.olmocr import OlmOCR
from tasks.plotqa import PlotQA
from tasks.pubtables import PubTables
from tasks.smoltalk import SmolTalk
from tasks.synthetic import SyntheticChat, SyntheticPages, SyntheticReading

VISION_TASKS = [(DocBank, 2.0), (OlmOCR, 2.0), (LlavaCC3M, 1.0), (PlotQA, 1.0), (ChartQA, 1.0), (FigureQA, 1.0),
                (PubTables, 1.0), (LatexFormulas, 1.0), (MathWriting, 1.0)]


def split_of(cls, split, max_samples, source=None):
    """A dataset's train or validation part: its own validation split where it has one (and this copy of it holds
    it: the validation split is prepared first to know), else whole images held out of train (see hold_out)."""
    if cls.val_split:
        try:
            val = cls(split=cls.val_split, max_samples=max_samples, source=source)
            return val if split != "train" else cls(split="train", max_samples=max_samples, source=source)
        except MissingSplit as e:
            if split != "train":
                print0(f"{cls.name}: {e}; holding out part of train for validation instead")
    return hold_out(cls(split="train", max_samples=max_samples, source=source), split)


def hold_out(task, split):
    """The train or validation part of a dataset without a validation split: validation is whole images (a figure
    with all its questions, a page), about 2% of them (1 to 500), chosen by a hash of the image file's name, so the
    two parts never share an image and the choice does not change between runs."""
    images = sorted({s["image_path"] for s in task.samples},
                    key=lambda p: hashlib.sha256(os.path.basename(p).encode()).hexdigest())
    n_val = min(500, max(1, len(images) // 50)) if len(images) > 1 else 0
    held = set(images[:n_val])
    task.samples = [s for s in task.samples if (s["image_path"] in held) == (split != "train")]
    return task


def mixture(data, split, seed, num_samples=None, text_fraction=0.0, max_samples=0, synthetic=None):
    """
    The training or validation mixture. data: "reading" (SyntheticReading: plain text lines rendered on the fly,
    an endless stream), "synthetic" (SyntheticPages with the `synthetic` keyword arguments) or "real" (the nine
    datasets); synthetic validation pages come from a seed training never uses. num_samples: the mixture's length
    (None: all the examples); text_fraction: the share of text-only conversations.
    """
    if data in ("reading", "synthetic"):
        seed_pages = seed if split == "train" else seed + 1  # validation pages differ from the training pages
        count = num_samples or synthetic["num_samples"]
        if data == "reading":
            tasks = [(SyntheticReading(count, seed_pages, kind=kind), w) for kind, w in synthetic.get("reading", [("grid", 1)])]
        else:
            pages = {k: v for k, v in synthetic.items() if k != "reading"}
            tasks = [(SyntheticPages(**dict(pages, num_samples=count, seed=seed_pages)), 1.0)]
        text = SyntheticChat(count, seed_pages)
    elif data == "real":
        tasks = [(split_of(cls, split, max_samples or None), w) for cls, w in VISION_TASKS]
        text = SmolTalk("train" if split == "train" else "test", max_samples=max_samples or None)
    else:
        raise ValueError(f"--data must be reading, synthetic or real, got {data!r}")
    if text_fraction > 0:
        tasks.append((text, text_fraction / (1 - text_fraction) * sum(w for _, w in tasks)))
    return VisionTaskMixture([t for t, _ in tasks], [w for _, w in tasks], num_samples=num_samples, seed=seed)
