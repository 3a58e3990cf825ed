"""
DocBank (liminghao1630/DocBank): 500K arXiv pages with every token's box and layout label.
Files: DocBank_500K_txt.zip (one .txt per page: token, x0, y0, x1, y1, R, G, B, font, label; boxes on a
0-1000 grid) and DocBank_500K_ori_img.zip split in parts .001, .002, ... (joined once on disk).
Tokens in reading order, grouped into blocks of one label, become grounded markdown: titles '#', sections '##'.
Split: every 100th page (by name) is validation, the rest train.
"""
import os
import shutil
import zipfile

from common import atomic_open
from config import DOC_TO_MARKDOWN, data_dir
from dataset import save_image
from grounding import grounded_block
from tasks.common import PreparedTask

MARKDOWN_PREFIX = {"title": "# ", "section": "## "}
REF_TYPE = {"title": "title", "section": "sub_title", "equation": "equation", "table": "table",
            "caption": "image_caption"}


def page_blocks(lines):
    """Lines of a DocBank .txt -> [(label, text, box on 0-1000)], consecutive tokens of one label merged."""
    blocks = []
    for line in lines:
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 10:
            continue
        token, label = fields[0], fields[9].strip()
        if not token.strip() or token.startswith("##LT"):  # ##LTFigure## / ##LTLine##: placeholders, not text
            continue
        x0, y0, x1, y1 = (int(v) for v in fields[1:5])
        if blocks and blocks[-1][0] == label:
            _, words, box = blocks[-1]
            words.append(token)
            box[:] = [min(box[0], x0), min(box[1], y0), max(box[2], x1), max(box[3], y1)]
        else:
            blocks.append((label, [token], [x0, y0, x1, y1]))
    return [(label, " ".join(words), box) for label, words, box in blocks]


class DocBank(PreparedTask):
    name, hf_id = "docbank", "liminghao1630/DocBank"
    val_split = "val"

    def image_zip(self):
        """The image archive comes in byte-split parts: join them once into one zip on disk."""
        parts = [f for f in self.list_files() if f.startswith("DocBank_500K_ori_img.zip.")]
        if not parts:
            raise FileNotFoundError(f"{self.source}: no DocBank_500K_ori_img.zip.* parts")
        joined = os.path.join(data_dir(self.name), "DocBank_500K_ori_img.zip")
        if not os.path.exists(joined):
            with atomic_open(joined, "wb") as out:
                for part in parts:
                    with open(self.file(part), "rb") as f:
                        shutil.copyfileobj(f, out)
        return joined

    def rows(self, split):
        with zipfile.ZipFile(self.file("DocBank_500K_txt.zip")) as texts, zipfile.ZipFile(self.image_zip()) as images:
            pages = {os.path.basename(n)[:-len("_ori.jpg")]: n for n in images.namelist() if n.endswith("_ori.jpg")}
            names = sorted(n for n in texts.namelist() if n.endswith(".txt"))
            for i, name in enumerate(names):
                stem = os.path.basename(name)[:-4]
                in_split = i % 100 != 0 if split == "train" else i % 100 == 0
                if not in_split or stem not in pages:
                    continue
                yield dict(name=stem, lines=texts.read(name).decode("utf-8", "replace").splitlines(),
                           image_bytes=images.read(pages[stem]))

    @staticmethod
    def to_sample(row, index, image_dir):
        blocks = page_blocks(row["lines"])
        if not blocks:
            return None
        response = "\n\n".join(
            grounded_block(REF_TYPE.get(label, "text"), MARKDOWN_PREFIX.get(label, "") + text,
                           [v * 999 // 1000 for v in box])
            for label, text, box in blocks)
        path = save_image(row["image_bytes"], os.path.join(image_dir, f"{row['name']}.jpg"))
        return dict(text=f"<image>\n{DOC_TO_MARKDOWN}", response=response, image_path=path)
