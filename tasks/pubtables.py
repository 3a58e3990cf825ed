"""
PubTables-1M structure (bsmock/pubtables-1m): cropped table images, PASCAL VOC boxes for rows, columns and
spanning cells, and the words in each table with their boxes. Rows x columns give the cell grid, words go to
the cell holding their centre, spanning cells become rowspan/colspan: the table as HTML.
"""
import json
import os
import tarfile
import xml.etree.ElementTree as ET

from config import MARKDOWN_NO_GROUNDING, data_dir, image_prompt
from dataset import save_image, extract_tar_once
from tasks.common import PreparedTask


def table_html(xml_bytes, words):
    objects = [(o.findtext("name"), [float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
               for o in ET.fromstring(xml_bytes).iter("object")]
    rows = sorted((b for n, b in objects if n == "table row"), key=lambda b: b[1])
    cols = sorted((b for n, b in objects if n == "table column"), key=lambda b: b[0])
    if not rows or not cols:
        return None

    def centre_in(lo, hi, boxes, axis):
        return [i for i, b in enumerate(boxes) if lo <= (b[axis] + b[axis + 2]) / 2 <= hi]
    owner, spans = {}, {}  # grid cell -> the cell it merges into; anchor cell -> (rowspan, colspan)
    for b in (b for n, b in objects if n == "table spanning cell"):
        rs, cs = centre_in(b[1], b[3], rows, 1), centre_in(b[0], b[2], cols, 0)
        if len(rs) * len(cs) > 1:
            spans[(rs[0], cs[0])] = (len(rs), len(cs))
            owner.update({(r, c): (rs[0], cs[0]) for r in rs for c in cs})
    cells = {}
    for w in words:
        x, y = (w["bbox"][0] + w["bbox"][2]) / 2, (w["bbox"][1] + w["bbox"][3]) / 2
        r = next((i for i, b in enumerate(rows) if b[1] <= y <= b[3]), None)
        c = next((i for i, b in enumerate(cols) if b[0] <= x <= b[2]), None)
        if r is not None and c is not None:
            cells.setdefault(owner.get((r, c), (r, c)), []).append(w)
    html = ["<table>"]
    for r in range(len(rows)):
        html.append("<tr>")
        for c in range(len(cols)):
            if owner.get((r, c), (r, c)) != (r, c):
                continue  # inside a spanning cell drawn earlier
            order = sorted(cells.get((r, c), []),
                           key=lambda w: (w.get("block_num", 0), w.get("line_num", 0), w["bbox"][0]))
            rowspan, colspan = spans.get((r, c), (1, 1))
            attrs = (f' rowspan="{rowspan}"' if rowspan > 1 else "") + (f' colspan="{colspan}"' if colspan > 1 else "")
            html.append(f"<td{attrs}>" + " ".join(w["text"] for w in order) + "</td>")
        html.append("</tr>")
    return "".join(html + ["</table>"])


class PubTables(PreparedTask):
    name, hf_id = "pubtables", "bsmock/pubtables-1m"
    val_split = "val"

    def rows(self, split):
        part = {"train": "Train", "val": "Val", "validation": "Val", "test": "Test"}[split]
        words_dir = extract_tar_once(self.file("PubTables-1M-Structure_Table_Words.tar.gz"),
                                     os.path.join(data_dir(self.name), "words"))
        with tarfile.open(self.file(f"PubTables-1M-Structure_Annotations_{part}.tar.gz")) as tf:
            annotations = {os.path.basename(m.name)[:-4]: tf.extractfile(m).read()
                           for m in tf if m.isfile() and m.name.endswith(".xml")}
        with tarfile.open(self.file(f"PubTables-1M-Structure_Images_{part}.tar.gz"), "r|gz") as tf:  # streamed: 22 GB
            for member in tf:
                stem = os.path.splitext(os.path.basename(member.name))[0]
                words_path = os.path.join(words_dir, f"{stem}_words.json")
                if member.isfile() and stem in annotations and os.path.exists(words_path):
                    with open(words_path) as f:
                        words = json.load(f)
                    yield dict(name=stem, xml=annotations[stem], words=words, image_bytes=tf.extractfile(member).read())

    @staticmethod
    def to_sample(row, index, image_dir):
        html = table_html(row["xml"], row["words"])
        if html is None:
            return None
        path = save_image(row["image_bytes"], os.path.join(image_dir, f"{row['name']}.jpg"))
        return dict(text=image_prompt(MARKDOWN_NO_GROUNDING), response=html, image_path=path)
