"""
LLaVA-CC3M-Pretrain-595K (liuhaotian/LLaVA-CC3M-Pretrain-595K): chat.json + images.zip.
The human turn (without its <image> marker) is the prompt, the gpt turn the response.
"""
import json
import os
import zipfile

from config import image_prompt
from dataset import save_image
from tasks.common import PreparedTask


class LlavaCC3M(PreparedTask):
    name, hf_id = "llava_cc3m", "liuhaotian/LLaVA-CC3M-Pretrain-595K"

    def rows(self, split):
        with open(self.file("chat.json"), encoding="utf-8") as f:
            chat = json.load(f)
        with zipfile.ZipFile(self.file("images.zip")) as z:
            entries = {os.path.basename(n): n for n in z.namelist() if not n.endswith("/")}
            for row in chat:
                entry = entries.get(os.path.basename(row.get("image", "")))
                yield dict(row, image_bytes=z.read(entry) if entry else None)

    @staticmethod
    def to_sample(row, index, image_dir):
        turns = {t["from"]: t["value"] for t in row.get("conversations", [])}
        prompt = turns.get("human", "").replace("<image>", "").strip()
        response = turns.get("gpt", "").strip()
        if not (row["image_bytes"] and prompt and response):
            return None
        path = save_image(row["image_bytes"], os.path.join(image_dir, os.path.basename(row["image"])))
        return dict(text=image_prompt(prompt), response=response, image_path=path)
