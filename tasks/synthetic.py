"""
Synthetic pages rendered with Pillow, with ground truth exact by construction: documents (markdown),
tables (HTML), bar/line charts (data as a table) and formulas (LaTeX-like text). Seeded: the same
(seed, index) always gives the same page and text. Needs no download: the default data for the CPU demo
and the tests, and a warm-up mixture at any scale. Images are rendered once to disk, on first use.
"""
import json
import os
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common import atomic_open
from config import (FREE_OCR, MARKDOWN_NO_GROUNDING, DOC_TO_MARKDOWN, PARSE_FIGURE, FORMULA_TO_LATEX, data_dir,
                    image_prompt)
from grounding import grounded_block
from tasks.common import Task

WORDS = """the of and to in is that for it as was with be by on not he this are or his from at which but have an they
you were her she there been one all we their has would when if so no will more can who its out into time only some
could new them man these two may first then do any like my now over such our made most after also did many before
must through back years where much your way well down should because each just those people how too little state good
very make world still own see men work long here between both life being under never day same another know while last
might great old year off come since against go came right used take three states himself few house use during without
again place around however home small found thought went say part once general high upon school every does got united
left number course war until always away something fact though water less public put think almost hand enough far took
head yet government system better set told nothing night end why called didn't eyes find going look asked later knew
point next city give group toward young days let room president side social given present several order national
possible rather second face per among form important often things looked early white case large become felt need big
open become children begin data model paper method results table figure section value image text page line study
analysis field level report light river market north south river garden letter window morning music
story change""".split()
CATEGORIES = ["Alpha", "Beta", "Gamma", "Delta", "North", "South", "East", "West", "Red", "Blue", "Green", "Q1", "Q2",
              "Q3", "Q4", "2019", "2020", "2021", "2022", "2023", "Mon", "Tue", "Wed", "Thu", "Fri"]
SYMBOLS = ["x", "y", "z", "a", "b", "c", "n", "k", r"\alpha", r"\beta", r"\theta", r"\lambda", r"\pi"]
KINDS = ("document", "table", "chart", "formula")


def font(size, style="sans"):
    """DejaVu when installed, else Pillow's bundled font: either way a scalable TrueType font."""
    name = {"sans": "DejaVuSans.ttf", "bold": "DejaVuSans-Bold.ttf", "serif": "DejaVuSerif.ttf",
            "mono": "DejaVuSansMono.ttf"}[style]
    try:
        return ImageFont.truetype(name, size)
    except OSError:
        return ImageFont.load_default(size=size)


def sentence(rng, lo=5, hi=12):
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def title(rng, lo=2, hi=5):
    return " ".join(rng.choice(WORDS).capitalize() for _ in range(rng.randint(lo, hi)))


def formula(rng, depth=0):
    """A random LaTeX-like expression; rendered as its literal text."""
    a, b = rng.choice(SYMBOLS), rng.choice(SYMBOLS)
    choices = [f"{a}^{{{rng.randint(2, 9)}}}", f"{a}_{{{rng.choice('ijkn')}}}", rf"\frac{{{a}}}{{{b}}}",
               rf"\sqrt{{{a}}}", f"{rng.randint(2, 99)}{a}", f"({a} + {b})"]
    term = rng.choice(choices)
    if depth < 2 and rng.random() < 0.6:
        return f"{term} {rng.choice(['+', '-', '='])} {formula(rng, depth + 1)}"
    return term


def wrap(draw, text, fnt, width):
    """Greedy word wrap to a pixel width."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=fnt) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def html_table(rows):
    return "<table>" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>"


class Page:
    """Draws blocks top to bottom and remembers each block's box (for grounding output)."""
    def __init__(self, rng, width, height):
        self.width, self.height = width, height
        self.image = Image.new("RGB", (width, height), (255, 255, 255))
        self.draw = ImageDraw.Draw(self.image)
        self.margin = int(width * rng.uniform(0.05, 0.1))
        self.y = self.margin
        self.spacing = rng.uniform(1.15, 1.5)
        self.blocks = []  # (type, markdown, box)

    def text_block(self, kind, text, fnt, markdown, bullet=""):
        width = self.width - 2 * self.margin - int(self.draw.textlength(bullet, font=fnt))
        lines = wrap(self.draw, text, fnt, width)
        line_h = int(fnt.size * self.spacing)
        if self.y + line_h * len(lines) > self.height - self.margin:
            return False
        top = self.y
        for i, line in enumerate(lines):
            x = self.margin
            if bullet and i == 0:
                self.draw.text((x, self.y), bullet, font=fnt, fill=(0, 0, 0))
            self.draw.text((x + int(self.draw.textlength(bullet, font=fnt)), self.y), line, font=fnt, fill=(0, 0, 0))
            self.y += line_h
        self.blocks.append((kind, markdown, (self.margin, top, self.width - self.margin, self.y)))
        self.y += int(fnt.size * 0.6)
        return True


def render_document(rng, width, height):
    page = Page(rng, width, height)
    base = max(12, int(width / rng.uniform(32, 44)))
    body = font(base, rng.choice(["sans", "serif"]))
    head = title(rng)
    page.text_block("title", head, font(int(base * 1.6), "bold"), f"# {head}")
    for _ in range(rng.randint(1, 3)):
        sub = title(rng)
        if not page.text_block("sub_title", sub, font(int(base * 1.25), "bold"), f"## {sub}"):
            break
        if rng.random() < 0.35:
            for _ in range(rng.randint(2, 4)):
                item = sentence(rng, 3, 7)
                if not page.text_block("text", item, body, f"- {item}", bullet="\u2022 "):
                    break
        else:
            para = " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
            page.text_block("text", para, body, para)
    return page


def render_table(rng, width, height):
    page = Page(rng, width, height)
    n_rows, n_cols = rng.randint(3, 6), rng.randint(2, 4)
    header = [title(rng, 1, 1) for _ in range(n_cols)]
    rows = [header] + [[rng.choice(CATEGORIES)] + [str(rng.randint(0, 999)) for _ in range(n_cols - 1)]
                       for _ in range(n_rows - 1)]
    fnt = font(max(12, int(width / rng.uniform(28, 36))), rng.choice(["sans", "serif", "mono"]))
    cell_w = (width - 2 * page.margin) // n_cols
    cell_h = int(fnt.size * 2.0)
    top = page.y
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            x0, y0 = page.margin + c * cell_w, top + r * cell_h
            page.draw.rectangle((x0, y0, x0 + cell_w, y0 + cell_h), outline=(0, 0, 0), width=1)
            page.draw.text((x0 + 6, y0 + (cell_h - fnt.size) // 2), cell, font=fnt, fill=(0, 0, 0))
    box = (page.margin, top, page.margin + n_cols * cell_w, top + n_rows * cell_h)
    page.blocks.append(("table", html_table(rows), box))
    return page


def draw_chart(page, name, labels, values, kind="bar", colours=((70, 110, 180),), show_values=True):
    """A bar or line chart with a title, category labels and (optionally) value labels, filling the page."""
    width, height = page.width, page.height
    fnt = font(max(12, int(width / 36)))
    page.draw.text((page.margin, page.y), name, font=font(int(fnt.size * 1.4), "bold"), fill=(0, 0, 0))
    x0, y0 = page.margin + fnt.size, page.y + int(fnt.size * 3)
    x1, y1 = width - page.margin, height - page.margin - int(fnt.size * 2)
    page.draw.line((x0, y1, x1, y1), fill=(0, 0, 0), width=2)
    page.draw.line((x0, y0, x0, y1), fill=(0, 0, 0), width=2)
    slot = (x1 - x0) / len(values)
    points = []
    for i, (label, value) in enumerate(zip(labels, values)):
        cx = x0 + slot * (i + 0.5)
        vy = y1 - (y1 - y0 - fnt.size * 2) * value / max(values)
        points.append((cx, vy))
        page.draw.text((cx - page.draw.textlength(label, font=fnt) / 2, y1 + 4), label, font=fnt, fill=(0, 0, 0))
        if show_values:
            page.draw.text((cx - page.draw.textlength(str(value), font=fnt) / 2, vy - fnt.size - 4), str(value),
                           font=fnt, fill=(0, 0, 0))
    if kind == "bar":
        for i, (cx, vy) in enumerate(points):
            page.draw.rectangle((cx - slot * 0.3, vy, cx + slot * 0.3, y1), fill=colours[i % len(colours)])
    else:
        page.draw.line(points, fill=colours[0], width=3)
        for cx, vy in points:
            page.draw.ellipse((cx - 4, vy - 4, cx + 4, vy + 4), fill=colours[0])
    response = f"{name}\n" + html_table([[label, str(value)] for label, value in zip(labels, values)])
    page.blocks.append(("image", response, (page.margin, page.margin, width - page.margin, height - page.margin)))
    return page


def render_chart(rng, width, height):
    page = Page(rng, width, height)
    n = rng.randint(3, 6)
    labels = rng.sample(CATEGORIES, n)
    values = [rng.randint(1, 99) for _ in range(n)]
    colour = tuple(rng.randint(30, 200) for _ in range(3))
    return draw_chart(page, title(rng, 1, 3), labels, values, rng.choice(["bar", "line"]), (colour,))


def render_formula(rng, width, height):
    page = Page(rng, width, height)
    text = formula(rng)
    fnt = font(max(14, int(width / rng.uniform(20, 30))), rng.choice(["mono", "serif", "sans"]))
    while page.draw.textlength(text, font=fnt) > width - 2 * page.margin and fnt.size > 10:
        fnt = font(fnt.size - 2, "mono")
    page.y = (height - fnt.size) // 2
    page.text_block("equation", text, fnt, text)
    return page


RENDERERS = dict(document=render_document, table=render_table, chart=render_chart, formula=render_formula)


DOC_STYLES = ("markdown", "free", "grounding")


def make_sample(seed, index, kinds=KINDS, sizes=(512, 1024), doc_styles=DOC_STYLES):
    """-> (PIL page, prompt, response), all determined by (seed, index). Documents are read in one of doc_styles:
    markdown, free (plain text, DeepSeek's 'Free OCR.') or grounding (markdown with block boxes)."""
    rng = random.Random(f"synthetic-{seed}-{index}")
    kind = kinds[rng.randrange(len(kinds))]
    width = rng.randint(*sizes)
    height = width if kind in ("chart", "formula") else int(width * rng.uniform(1.0, 1.414))
    if kind == "formula":
        height = width // 2
    page = RENDERERS[kind](rng, width, height)
    blocks = page.blocks
    if kind == "document":
        style = doc_styles[rng.randrange(len(doc_styles))]
        if style == "markdown":
            prompt, response = MARKDOWN_NO_GROUNDING, "\n\n".join(md for _, md, _ in blocks)
        elif style == "free":
            prompt, response = FREE_OCR, "\n\n".join(md.lstrip("#- ").strip() for _, md, _ in blocks)
        else:
            scale = (999 / page.width, 999 / page.height) * 2
            prompt, response = DOC_TO_MARKDOWN, "\n\n".join(
                grounded_block(kind_, md, [v * s for v, s in zip(box, scale)]) for kind_, md, box in blocks)
    elif kind == "table":
        prompt, response = MARKDOWN_NO_GROUNDING, blocks[0][1]
    elif kind == "chart":
        prompt, response = PARSE_FIGURE, blocks[0][1]
    else:
        prompt, response = FORMULA_TO_LATEX, blocks[0][1]
    image = page.image
    if rng.random() < 0.3:  # a slightly skewed scan
        image = image.rotate(rng.uniform(-1.0, 1.0), resample=Image.BICUBIC, fillcolor=(255, 255, 255))
    if rng.random() < 0.5:  # light sensor noise
        noise = np.random.default_rng(rng.randrange(2 ** 32)).normal(0, rng.uniform(2, 8),
                                                                     (image.height, image.width, 1))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    return image, prompt, response


class SyntheticPages(Task):
    def __init__(self, num_samples=1000, seed=0, kinds=KINDS, sizes=(512, 1024), doc_styles=DOC_STYLES, **kwargs):
        super().__init__(**kwargs)
        self.num_samples, self.seed = num_samples, seed
        self.kinds, self.sizes, self.doc_styles = tuple(kinds), tuple(sizes), tuple(doc_styles)
        name = f"seed{seed}-{'-'.join(self.kinds)}-{sizes[0]}-{sizes[1]}-{'-'.join(self.doc_styles)}"
        self.image_dir = data_dir(os.path.join("synthetic", name))

    def num_examples(self):
        return self.num_samples

    def get_example(self, index):
        meta_path = os.path.join(self.image_dir, f"{index:07d}.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                return json.load(f)
        return self.render(index)

    def render(self, index):
        """Make page `index` and store it (again, when the stored one was damaged): the same page every time."""
        path = os.path.join(self.image_dir, f"{index:07d}.png")
        meta_path = path[:-4] + ".json"
        image, prompt, response = make_sample(self.seed, index, self.kinds, self.sizes, self.doc_styles)
        sample = dict(text=image_prompt(prompt), response=response, image_path=path)
        with atomic_open(path, "wb") as f:  # loader workers may render the same page
            image.save(f, format="PNG")
        with atomic_open(meta_path) as f:  # written last: its presence means the page is complete
            json.dump(sample, f)
        return sample


def reading_lines(rng, lines=3, width=8, min_chars=20):
    """`lines` lines of at most `width` characters, min_chars in all: random letter strings and numbers separated by
    spaces. No prior to learn (dictionary words slowed learning 8x at step 200): the page is the only way to it."""
    def item():
        if rng.random() < 0.5:
            return str(rng.randint(0, 10 ** rng.randint(1, 4) - 1))
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 5)))

    def line():
        while True:
            text = item()
            while True:
                more = item()
                if len(text) + 1 + len(more) > width:
                    break
                text += " " + more
            if len(text) >= width - 2:
                return text
    while True:
        text = [line() for _ in range(lines)]
        if sum(map(len, text)) >= min_chars:
            return text


def render_reading(rng, size=512):
    """A page of reading_lines() in a large monospace font, one character per 64 px column and one line per two
    64 px rows: each character sits in its own cell of the Tiny mode's 8 x 8 feature grid (64 px each)."""
    lines = reading_lines(rng, lines=size // 160, width=size // 64)
    fnt = font(100, "mono")
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(lines):
        for k, ch in enumerate(text):
            draw.text((64 * k + 4, 64 + 128 * i), ch, font=fnt, fill=(0, 0, 0))
    return image, "\n".join(lines)


def cut_to_fit(line, fits):
    """The line cut back a word at a time (a character at a time once one word is left) until fits(line): a line
    always fits the page."""
    while not fits(line):
        line = line.rsplit(" ", 1)[0] if " " in line else line[:-1]
    return line


def render_type(rng, size=512, lines=3):
    """Ordinary type: `lines` lines of random letter strings and numbers (about 15 characters each) in DejaVu Sans or
    Serif at 44-60 px, a left margin of 8-40 px, lines 1.6-2.2 font sizes apart: proportional glyphs wherever they
    fall, about two characters to a cell of the Tiny mode's feature grid."""
    px = rng.randint(44, 60)
    fnt = font(px, rng.choice(("sans", "serif")))
    margin, pitch = rng.randint(8, 40), rng.uniform(1.6, 2.2) * px
    top = rng.randint(8, max(8, int(size - pitch * (lines - 1) - 1.3 * px)))
    text = []
    for _ in range(lines):
        line = " ".join(reading_lines(rng, lines=1, width=rng.randint(13, 17), min_chars=1))
        text.append(cut_to_fit(line, lambda s: fnt.getlength(s) <= size - margin - 4))
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(text):
        draw.text((margin, top + pitch * i), line, font=fnt, fill=(0, 0, 0))
    return image, "\n".join(text)


def render_bridge(rng, size=512, lines=3, difficulty=None):
    """Pages between grid and type, at a difficulty d (drawn uniformly in [0, 1] unless given): d = 0 lays out a grid
    page (monospace 100 px, a character per 64 px cell, lines on fixed rows), d = 1 a type page (44-60 px type, loose
    layout); in between the type shrinks, the lines and the margin drift, and the font is proportional with
    probability d. A curriculum's middle: a model that reads grid pages keeps looking while the type changes."""
    d = rng.random() if difficulty is None else difficulty
    px = round(100 + d * (rng.randint(44, 60) - 100))
    mono = rng.random() >= d
    fnt = font(px, "mono" if mono else rng.choice(("sans", "serif")))
    advance = 64 + d * (fnt.getlength("0") - 64)  # monospace: the grid's 64 px cell shrinking to the font's own
    pitch = 128 + d * (rng.uniform(1.6, 2.2) * px - 128)
    margin = round(4 + d * (rng.randint(8, 40) - 4))
    top = round(64 + d * (rng.randint(8, max(8, int(size - pitch * (lines - 1) - 1.3 * px))) - 64))

    def right_edge(line):
        return margin + (advance * (len(line) - 1) + fnt.getlength("0") if mono else fnt.getlength(line))
    text = []
    for _ in range(lines):
        line = " ".join(reading_lines(rng, lines=1, width=round(8 + d * (rng.randint(13, 17) - 8)), min_chars=1))
        text.append(cut_to_fit(line, lambda s: right_edge(s) <= size))
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(text):
        for k, piece in enumerate(line if mono else [line]):  # monospace glyphs at the advance; type as set
            draw.text((margin + advance * k, top + pitch * i), piece, font=fnt, fill=(0, 0, 0))
    return image, "\n".join(text)


READING_KINDS = {"grid": render_reading, "type": render_type, "bridge": render_bridge}


class SyntheticReading(Task):
    """
    Pages of plain text lines made on the fly where they are loaded and never stored: a stream too large to
    memorise. kind: "grid" (render_reading: one character per feature cell), "type" (render_type: ordinary type) or
    "bridge" (render_bridge: anywhere between the two).
    (seed, index) fixes each page, so another seed is a held-out set.
    """
    def __init__(self, num_samples=1_000_000, seed=0, size=512, kind="grid", **kwargs):
        super().__init__(**kwargs)
        self.num_samples, self.seed, self.size, self.kind = num_samples, seed, size, kind

    def num_examples(self):
        return self.num_samples

    def get_example(self, index):
        rng = random.Random(f"reading-{self.seed}-{index}" if self.kind == "grid" else f"{self.kind}-{self.seed}-{index}")
        image, text = READING_KINDS[self.kind](rng, self.size)
        return dict(text=image_prompt(FREE_OCR), response=text, image=image, kind=self.kind)


def corpus(num_docs=2000, seed=0):
    """Text for training a tokenizer offline: the responses synthetic pages produce."""
    for i in range(num_docs):
        rng = random.Random(f"corpus-{seed}-{i}")
        kind = rng.choice(KINDS)
        if kind == "document":
            yield "\n\n".join([f"# {title(rng)}"] + [" ".join(sentence(rng) for _ in range(3)) for _ in range(3)])
        elif kind == "table":
            yield html_table([[title(rng, 1, 1), str(rng.randint(0, 999))] for _ in range(4)])
        elif kind == "chart":
            values = [rng.choice(CATEGORIES), str(rng.randint(1, 99))]
            yield f"{title(rng)}\n" + html_table([["Category", "Value"], values])
        else:
            yield formula(rng)


class SyntheticChat(Task):
    """Offline stand-in for SmolTalk: short seeded conversations (arithmetic, spelling), for stage 2 in the demo."""
    def __init__(self, num_samples=1000, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.num_samples, self.seed = num_samples, seed

    def num_examples(self):
        return self.num_samples

    def get_example(self, index):
        rng = random.Random(f"chat-{self.seed}-{index}")
        if rng.random() < 0.5:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            question, answer = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        else:
            word = rng.choice(WORDS)
            question, answer = f"Spell the word '{word}' backwards.", word[::-1]
        return dict(messages=[dict(role="user", content=question), dict(role="assistant", content=answer)])
