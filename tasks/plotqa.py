"""PlotQA (achang/plot_qa): a scientific plot -> its description with the data, for DeepSeek-OCR's 'Parse the
figure.'"""
import os

from config import PARSE_FIGURE, image_prompt
from dataset import save_image
from tasks.common import PreparedTask


class PlotQA(PreparedTask):
    name, hf_id = "plotqa", "achang/plot_qa"
    val_split = "validation"

    @staticmethod
    def to_sample(row, index, image_dir):
        text = (row.get("text") or "").strip()
        if not text:
            return None
        path = save_image(row["image"], os.path.join(image_dir, f"{index:08d}.png"))
        return dict(text=image_prompt(PARSE_FIGURE), response=text, image_path=path)
