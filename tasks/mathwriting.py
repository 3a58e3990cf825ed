"""Handwritten formulas (deepcopy/MathWriting-human): Google's MathWriting, human-written, rendered -> LaTeX."""
from tasks.common import PreparedTask
from tasks.latex_formulas import formula_sample


class MathWriting(PreparedTask):
    name, hf_id = "mathwriting", "deepcopy/MathWriting-human"
    val_split = "val"

    @staticmethod
    def to_sample(row, index, image_dir):
        return formula_sample(row["image"], row.get("latex"), index, image_dir)
