"""
DocBank (liminghao1630/DocBank): 500K arXiv pages with every token's box and layout label.
Files: DocBank_500K_txt.zip (one .txt per page: token, x0, y0, x1, y1, R, G, B, font, label; boxes on a
0-1000 grid) and DocBank_500K_ori_img.zip split in parts .001, .002, ... (joined once on disk).
The .txt lists tokens line by line across the whole page width, so a two-column page alternates between its
columns: the columns are found first and read one after the other, then tokens of one label become grounded
markdown blocks (titles '#', sections '##'). Split: every 100th page (by name) is validation, the rest train.
"""
import os
import re
import shutil
import zipfile
from collections import Counter

from common import atomic_open
from config import DOC_TO_MARKDOWN, data_dir, image_prompt
from dataset import save_image
from grounding import grounded_block
from tasks.common import PreparedTask

MARKDOWN_PREFIX = {"title": "# ", "section": "## "}
REF_TYPE = {"title": "title", "section": "sub_title", "equation": "equation", "table": "table",
            "caption": "image_caption"}
LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                           "\ufb05": "st", "\ufb06": "st"})
CID = re.compile(r"\(cid:\d+\)")  # pdfminer's code for a glyph it could not map: what it shows depends on the font
PROSE = {"paragraph", "reference", "list", "abstract", "caption", "section", "footer", "author", "title", "date"}
FIGURES = {"table", "equation", "figure"}  # labels whose lines are cells and symbols, not column text


def read_tokens(lines, tally):
    """Lines of a DocBank .txt -> tokens (text, x0, y0, x1, y1, label). Figure / line placeholders are dropped,
    ligatures spelled out and (cid:N) codes removed (a token left empty goes); tally counts what changed."""
    tokens = []
    for line in lines:
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) < 10 or not fields[0].strip() or fields[0].startswith("##LT"):  # ##LTFigure##, ##LTLine##
            continue
        text = fields[0].translate(LIGATURES)
        tally["ligatures spelled out"] += text != fields[0]
        if CID.search(text):
            text = CID.sub("", text)
            tally["(cid:N) codes removed" if text.strip() else "(cid:N) tokens dropped"] += 1
            if not text.strip():
                continue
        tokens.append((text, *(int(v) for v in fields[1:5]), fields[9].strip()))
    return tokens


def text_lines(tokens):
    """The .txt's lines: a token further left than the one before starts the next line across the page."""
    lines = []
    for token in tokens:
        if not lines or token[1] < lines[-1][-1][1] - 5:
            lines.append([])
        lines[-1].append(token)
    return lines


def at_gutter(line, x, margin=10, min_gap=12, near=80):
    """How a line meets a gutter at x: (crosses it, prose ends just left of it, the x where prose starts just right
    of it or None). A token over x, or two tokens closer than min_gap around it, cross it."""
    left = [t for t in line if t[1] + t[3] < 2 * x]
    right = [t for t in line if t[1] + t[3] >= 2 * x]
    last, first = max(left, key=lambda t: t[3], default=None), min(right, key=lambda t: t[1], default=None)
    if any(t[1] < x - margin and t[3] > x + margin for t in line) or (last and first and first[1] - last[3] < min_gap):
        return True, False, None
    ends = bool(last and last[3] >= x - near and last[5] in PROSE)
    return False, ends, first[1] if first and first[1] <= x + near and first[5] in PROSE else None


def column_runs(lines, x, min_lines):
    """Runs of lines that leave a gutter at x open, with the evidence of two columns in each: how many lines end in
    prose just left of it, and start prose just right of it at one shared margin (flush left, within 3 units)."""
    status = [at_gutter(line, x) for line in lines]
    runs, i = [], 0
    while i < len(lines):
        j = i
        while j < len(lines) and not status[j][0]:
            j += 1
        starts = Counter(s[2] for s in status[i:j] if s[2] is not None)
        margin = max((sum(starts[m + d] for d in range(-3, 4)) for m in starts), default=0)
        evidence = min(sum(s[1] for s in status[i:j]), margin)
        if evidence >= min_lines:
            runs.append((i, j, evidence))
        i = max(j, i + 1)
    return runs


def columns(tokens, lines, min_lines=5):
    """[(first line, end line, gutter x)]: the page's two-column regions, best evidence first, at the middle of the
    gutter positions that give that evidence; one stray line across a gutter (tokens pdfminer ran together) does
    not cut a region in two."""
    x_min, x_max = min(t[1] for t in tokens), max(t[3] for t in tokens)
    found = {}
    for x in range(int(x_min + 0.3 * (x_max - x_min)), int(x_min + 0.7 * (x_max - x_min)), 2):
        for run in column_runs(lines, x, min_lines):
            found.setdefault(run, []).append(x)
    chosen, taken = [], set()
    for (i, j, _), xs in sorted(found.items(), key=lambda kv: (-kv[0][2], kv[0][0])):
        if not taken & set(range(i, j)):
            chosen.append([i, j, xs[len(xs) // 2]])
            taken |= set(range(i, j))
    regions = []
    for i, j, x in sorted(chosen):
        if regions and i == regions[-1][1] + 1 and abs(x - regions[-1][2]) < 20 and \
                all(t[5] != "equation" for t in lines[i - 1]):
            regions[-1][1] = j
        else:
            regions.append([i, j, x])
    for region in regions:
        i, j, x = region
        # the rest of a full-width table, equation or abstract that crossed the gutter is not column text
        while i < j and i > 0 and belongs_to(lines[i], lines[i - 1], x, leading=True):
            i += 1
        while j > i and j < len(lines) and belongs_to(lines[j - 1], lines[j], x, leading=False):
            j -= 1
        region[:2] = i, j
    return [r for r in regions if r[0] < r[1]]


def belongs_to(line, neighbour, x, leading):
    """Whether a line at the edge of a two-column region continues the full-width element next to it: table /
    equation / figure rows of its label, or (above the region) a last line wholly left of the gutter."""
    labels = {t[5] for t in line}
    if not labels <= {t[5] for t in neighbour}:
        return False
    return labels <= FIGURES or (leading and all(t[1] + t[3] < 2 * x for t in line))


def reading_order(lines):
    """[(part, token)] in reading order: each two-column region's left column, then its right one; lines outside
    the regions (titles, abstracts, wide figures and tables) in place. Parts keep blocks from spanning columns."""
    tokens = [t for line in lines for t in line]
    ordered, done = [], 0
    for n, (i, j, x) in enumerate(columns(tokens, lines) if tokens else []):
        ordered += [(("page", done), t) for line in lines[done:i] for t in line]
        ordered += [((n, "left"), t) for line in lines[i:j] for t in line if t[1] + t[3] < 2 * x]
        ordered += [((n, "right"), t) for line in lines[i:j] for t in line if t[1] + t[3] >= 2 * x]
        done = j
    return ordered + [(("page", done), t) for line in lines[done:] for t in line]


def page_blocks(lines, tally=None):
    """Lines of a DocBank .txt -> [(label, text, box on 0-1000)] in reading order: consecutive tokens of one label
    in one column merged."""
    tally = Counter() if tally is None else tally
    lines = text_lines(read_tokens(lines, tally))
    ordered = reading_order(lines)
    tally["two-column pages"] += any(part[1] == "left" for part, _ in ordered)
    blocks = []
    for part, (token, x0, y0, x1, y1, label) in ordered:
        if blocks and blocks[-1][:2] == (part, label):
            _, _, words, box = blocks[-1]
            words.append(token)
            box[:] = [min(box[0], x0), min(box[1], y0), max(box[2], x1), max(box[3], y1)]
        else:
            blocks.append((part, label, [token], [x0, y0, x1, y1]))
    return [(label, " ".join(words), box) for _, label, words, box in blocks]


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

    def to_sample(self, row, index, image_dir):
        blocks = page_blocks(row["lines"], self.tally)
        if not blocks:
            return None
        response = "\n\n".join(
            grounded_block(REF_TYPE.get(label, "text"), MARKDOWN_PREFIX.get(label, "") + text,
                           [v * 999 // 1000 for v in box])
            for label, text, box in blocks)
        path = save_image(row["image_bytes"], os.path.join(image_dir, f"{row['name']}.jpg"))
        return dict(text=image_prompt(DOC_TO_MARKDOWN), response=response, image_path=path)
