"""
What the stages train on: the nine datasets with their weights (DocBank and olmOCR x2) plus ~10% text in stage 2,
or the offline synthetic pages; and each dataset's train / validation split.
"""
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
    """A dataset's train or validation part; those without a validation split hold out their last 2% (up to 500)."""
    if split == "train" or cls.val_split:
        return cls(split="train" if split == "train" else cls.val_split, max_samples=max_samples, source=source)
    task = cls(split="train", max_samples=max_samples, source=source)
    n_val = min(500, max(1, len(task) // 50))
    if split == "train":
        task.stop = len(task) - n_val
    else:
        task.start = len(task) - n_val
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
        pages = SyntheticReading(count, seed_pages) if data == "reading" else \
            SyntheticPages(**dict(synthetic, num_samples=count, seed=seed_pages))
        tasks = [(pages, 1.0)]
        text = SyntheticChat(count, seed_pages)
    elif data == "real":
        tasks = [(split_of(cls, split, max_samples or None), w) for cls, w in VISION_TASKS]
        text = SmolTalk("train" if split == "train" else "test", max_samples=max_samples or None)
    else:
        raise ValueError(f"--data must be reading, synthetic or real, got {data!r}")
    if text_fraction > 0:
        tasks.append((text, text_fraction / (1 - text_fraction) * sum(w for _, w in tasks)))
    return VisionTaskMixture([t for t, _ in tasks], [w for _, w in tasks], num_samples=num_samples, seed=seed)
