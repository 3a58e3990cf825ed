"""ChartQA (HuggingFaceM4/ChartQA): a chart and a question about it -> the first label."""
import os

from config import image_prompt
from dataset import save_image
from tasks.common import PreparedTask


class ChartQA(PreparedTask):
    name, hf_id = "chartqa", "HuggingFaceM4/ChartQA"
    val_split = "val"

    @staticmethod
    def to_sample(row, index, image_dir):
        labels = row.get("label") or []
        if not labels or not str(labels[0]).strip():
            return None
        path = save_image(row["image"], os.path.join(image_dir, f"{index:08d}.png"))
        return dict(text=image_prompt(f"Question: {row['query'].strip()}"), response=str(labels[0]).strip(),
                    image_path=path)
