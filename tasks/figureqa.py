"""FigureQA (vikhyatk/figureqa): a synthetic figure with yes/no questions -> one sample per question, answered Yes or
No."""
import os

from config import image_prompt
from dataset import save_image
from tasks.common import PreparedTask

YES = {"1", "yes", "true"}
NO = {"0", "no", "false"}


class FigureQA(PreparedTask):
    name, hf_id = "figureqa", "vikhyatk/figureqa"

    @staticmethod
    def to_sample(row, index, image_dir):
        pairs = [(qa["question"].strip(), str(qa["answer"]).strip().lower()) for qa in row.get("qa") or []]
        pairs = [(q, "Yes" if a in YES else "No") for q, a in pairs if q and a in YES | NO]
        if not pairs:
            return None
        path = save_image(row["image"], os.path.join(image_dir, f"{index:08d}.png"))
        return [dict(text=image_prompt(q), response=a, image_path=path) for q, a in pairs]
