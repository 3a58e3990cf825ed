"""Printed formulas (OleehyO/latex-formulas, config cleaned_formulas): a rendered formula -> its LaTeX."""
import os

from config import FORMULA_TO_LATEX, image_prompt
from dataset import save_image
from tasks.common import PreparedTask


def formula_sample(image, latex, index, image_dir):
    """Shared by the printed and handwritten formula tasks: image -> LaTeX with DeepSeek-style prompt."""
    latex = (latex or "").strip()
    if not latex:
        return None
    path = save_image(image, os.path.join(image_dir, f"{index:08d}.png"))
    return dict(text=image_prompt(FORMULA_TO_LATEX), response=latex, image_path=path)


class LatexFormulas(PreparedTask):
    name, hf_id, config_name = "latex_formulas", "OleehyO/latex-formulas", "cleaned_formulas"

    @staticmethod
    def to_sample(row, index, image_dir):
        return formula_sample(row["image"], row.get("latex_formula"), index, image_dir)
