"""
Renders data/test_images/: one image per dataset category, each with exactly the text its expected output
says (the text and the drawing come from the same values), and writes expected.json
(file -> dataset, prompt, expected, source). Deterministic; tests re-render and compare.

  python -m scripts.make_test_images [--out data/test_images]
"""
import argparse
import json
import math
import os
import random

from PIL import Image, ImageDraw

from config import DOC_TO_MARKDOWN, MARKDOWN_NO_GROUNDING, PARSE_FIGURE, FORMULA_TO_LATEX
from grounding import grounded_block
from tasks.synthetic import Page, font, draw_chart

SYMBOLS = {"alpha": "\u03b1", "beta": "\u03b2", "pi": "\u03c0", "theta": "\u03b8", "sigma": "\u03c3", "cdot": "\u00b7",
           "pm": "\u00b1"}


class Box:
    """A piece of typeset formula: an ink mask and its baseline (ascent above, descent below)."""
    def __init__(self, image, ascent):
        self.image, self.ascent = image, ascent
        self.descent = image.height - ascent


def glyphs(text, size, hand):
    f = font(size, "serif")
    ascent, descent = f.getmetrics()
    image = Image.new("L", (max(1, math.ceil(f.getlength(text))) + 4, ascent + descent), 0)
    ImageDraw.Draw(image).text((2, 0), text, font=f, fill=255)
    if hand:  # handwriting: each glyph run tilts and wanders a little, strokes thicken
        image = image.rotate(hand.uniform(-9, 9), resample=Image.BICUBIC, expand=False)
        shifted = Image.new("L", image.size, 0)
        shifted.paste(image, (hand.randint(-1, 1), hand.randint(-2, 2)))
        image = shifted
    return Box(image, ascent)


def hcat(boxes):
    ascent = max(b.ascent for b in boxes)
    descent = max(b.descent for b in boxes)
    image = Image.new("L", (sum(b.image.width for b in boxes), ascent + descent), 0)
    x = 0
    for b in boxes:
        image.paste(b.image, (x, ascent - b.ascent))
        x += b.image.width
    return Box(image, ascent)


def parse_group(s, i):
    """s[i] == '{': return the group's content and the index after its closing brace."""
    depth, j = 0, i
    while True:
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1:j], j + 1
        j += 1


def typeset(s, size, hand=None):
    """A small LaTeX subset typeset like a printed (or, with `hand`, handwritten) formula:
    \\frac{}{}, \\sqrt{}, ^{}, _{}, \\alpha-style symbols, everything else as text."""
    boxes, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num, i = parse_group(s, i + 5)
            den, i = parse_group(s, i)
            top, bottom = typeset(num, int(size * 0.8), hand), typeset(den, int(size * 0.8), hand)
            width = max(top.image.width, bottom.image.width) + 8
            bar = max(2, size // 14)
            image = Image.new("L", (width, top.image.height + bottom.image.height + bar + 6), 0)
            image.paste(top.image, ((width - top.image.width) // 2, 0))
            ImageDraw.Draw(image).rectangle((2, top.image.height + 3, width - 3, top.image.height + 3 + bar), fill=255)
            image.paste(bottom.image, ((width - bottom.image.width) // 2, top.image.height + bar + 6))
            boxes.append(Box(image, top.image.height + 3 + bar // 2 + int(size * 0.3)))
        elif s.startswith("\\sqrt", i):
            inner, i = parse_group(s, i + 5)
            body = typeset(inner, size, hand)
            lead = int(size * 0.6)
            image = Image.new("L", (body.image.width + lead + 4, body.image.height + 6), 0)
            image.paste(body.image, (lead + 2, 6))
            d, h, w = ImageDraw.Draw(image), image.height, max(2, size // 14)
            d.line([(0, h * 0.6), (lead * 0.35, h - 2), (lead, 2), (image.width - 1, 2)], fill=255, width=w)
            boxes.append(Box(image, body.ascent + 6))
        elif s[i] in "^_":
            if s[i + 1] == "{":
                script, j = parse_group(s, i + 1)
            else:
                script, j = s[i + 1], i + 2
            small = typeset(script, int(size * 0.6), hand)
            base = boxes.pop() if boxes else Box(Image.new("L", (1, size), 0), size)
            raise_by = int(base.ascent * 0.55) if s[i] == "^" else -int(size * 0.25)
            ascent = max(base.ascent, small.ascent + raise_by)
            descent = max(base.descent, small.descent - raise_by)
            image = Image.new("L", (base.image.width + small.image.width, ascent + descent), 0)
            image.paste(base.image, (0, ascent - base.ascent))
            image.paste(small.image, (base.image.width, ascent - raise_by - small.ascent))
            boxes.append(Box(image, ascent))
            i = j
        elif s[i] == "\\":
            j = i + 1
            while j < len(s) and s[j].isalpha():
                j += 1
            boxes.append(glyphs(SYMBOLS.get(s[i + 1:j], s[i + 1:j]), size, hand))
            i = j
        else:
            j = i
            while j < len(s) and s[j] not in "\\^_" and not (hand and j > i):  # handwriting: one glyph at a time
                j += 1
            boxes.append(glyphs(s[i:j], size, hand))
            i = j
    return hcat(boxes) if boxes else Box(Image.new("L", (1, size), 0), size)


def formula_image(latex, size, hand=None, ink=(0, 0, 0), paper=(255, 255, 255)):
    box = typeset(latex, size, hand)
    image = Image.new("RGB", (box.image.width + 80, box.image.height + 80), paper)
    image.paste(Image.new("RGB", box.image.size, ink), (40, 40), box.image)
    return image


def document_page():
    page = Page(random.Random(0), 800, 1000)
    body, head, sub = font(22, "serif"), font(34, "bold"), font(27, "bold")
    page.text_block("title", "Reading Pages with Small Models", head, "# Reading Pages with Small Models")
    page.text_block("sub_title", "1 Introduction", sub, "## 1 Introduction")
    intro = ("Optical character recognition turns the image of a page into text. A compact vision encoder "
             "compresses the page into a few hundred tokens, and a language model reads them back.")
    page.text_block("text", intro, body, intro)
    page.text_block("sub_title", "2 Method", sub, "## 2 Method")
    method = "We train the encoder and the decoder together on rendered pages, then on scanned documents."
    page.text_block("text", method, body, method)
    expected = "\n\n".join(grounded_block(kind, md, [v * 999 / s for v, s in zip(box, (800, 1000, 800, 1000))])
                           for kind, md, box in page.blocks)
    return page.image, expected


def markdown_page():
    page = Page(random.Random(1), 800, 900)
    body, head, sub = font(24), font(34, "bold"), font(28, "bold")
    page.text_block("title", "Weekly Notes", head, "# Weekly Notes")
    page.text_block("sub_title", "Tasks", sub, "## Tasks")
    for item in ("Render the test pages.", "Train the tiny model.", "Compare the outputs."):
        page.text_block("text", item, body, f"- {item}", bullet="\u2022 ")
    closing = "All three tasks finished on time."
    page.text_block("text", closing, body, closing)
    return page.image, "\n\n".join(md for _, md, _ in page.blocks)


def photo():
    """A drawn outdoor scene; the caption names exactly what is drawn."""
    image = Image.new("RGB", (640, 480))
    d = ImageDraw.Draw(image)
    for y in range(300):  # sky gradient
        d.line((0, y, 640, y), fill=(110 + y // 6, 170 + y // 8, 235))
    d.rectangle((0, 300, 640, 480), fill=(60, 150, 60))
    d.ellipse((500, 40, 580, 120), fill=(250, 215, 40))
    d.rectangle((200, 200, 400, 340), fill=(190, 40, 40))
    d.polygon([(180, 200), (300, 110), (420, 200)], fill=(120, 60, 40))
    d.rectangle((280, 260, 320, 340), fill=(40, 70, 190))
    return image, "a red house with a blue door on green grass under a yellow sun"


def chart(title, labels, values, kind, colours, show_values):
    page = Page(random.Random(2), 800, 600)
    draw_chart(page, title, labels, values, kind, colours, show_values)
    return page.image, page.blocks[-1][1]


def table():
    rows = [["A", "71.2", "90.1"], ["B", "68.4", "88.7"], ["C", "75.9", "92.3"]]
    fnt = font(26)
    image = Image.new("RGB", (620, 300), (255, 255, 255))
    d = ImageDraw.Draw(image)
    x, w, h = 30, 180, 56
    d.rectangle((x, 30, x + 3 * w, 30 + 4 * h), outline=(0, 0, 0), width=2)
    d.line((x + w, 30, x + w, 30 + 4 * h), fill=(0, 0, 0), width=2)
    d.line((x + 2 * w, 30 + h, x + 2 * w, 30 + 4 * h), fill=(0, 0, 0), width=2)  # "Score" spans two columns
    for r in range(1, 4):
        d.line((x, 30 + r * h, x + 3 * w, 30 + r * h), fill=(0, 0, 0), width=2)
    d.text((x + 12, 45), "Method", font=fnt, fill=(0, 0, 0))
    d.text((x + w + (2 * w - d.textlength("Score", font=fnt)) / 2, 45), "Score", font=fnt, fill=(0, 0, 0))
    for r, row in enumerate(rows, start=1):
        for c, cell in enumerate(row):
            d.text((x + c * w + 12, 45 + r * h), cell, font=fnt, fill=(0, 0, 0))
    expected = ('<table><tr><td>Method</td><td colspan="2">Score</td></tr>'
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
    return image, expected


FRUIT = (["Apples", "Pears", "Plums", "Figs"], [34, 21, 48, 12])
BARS = (["Red", "Blue", "Green"], [55, 80, 30])


def test_images():
    """[(file, dataset, prompt, expected, image)] -- the single source of the test set."""
    doc, doc_text = document_page()
    md, md_text = markdown_page()
    fruit = chart("Fruit Sales", *FRUIT, "bar", ((90, 140, 60),), True)[0]
    colours = ((200, 40, 40), (40, 70, 200), (40, 160, 60))
    bars = chart("Bars", *BARS, "bar", colours, False)[0]
    tallest = BARS[0][BARS[1].index(max(BARS[1]))]
    rain, rain_text = chart("Rainfall (mm)", ["2019", "2020", "2021", "2022", "2023"], [81, 64, 97, 72, 88], "line",
                            ((30, 90, 170),), True)
    printed = r"\frac{a+b}{2} = \sqrt{x^{2}+1}"
    handwritten = r"y = \alpha x^{2} - 3"
    return [
        ("docbank.png", "docbank", DOC_TO_MARKDOWN, doc_text, doc),
        ("olmocr.png", "olmocr", MARKDOWN_NO_GROUNDING, md_text, md),
        ("llava_cc3m.png", "llava_cc3m", "Provide a brief description of the given image.", *reversed(photo())),
        ("plotqa.png", "plotqa", PARSE_FIGURE, rain_text, rain),
        ("chartqa.png", "chartqa", "Question: Which fruit has the highest sales?",
         FRUIT[0][FRUIT[1].index(max(FRUIT[1]))], fruit),
        ("figureqa.png", "figureqa", "Is Blue the maximum?", "Yes" if tallest == "Blue" else "No", bars),
        ("pubtables.png", "pubtables", MARKDOWN_NO_GROUNDING, *reversed(table())),
        ("latex_formulas.png", "latex_formulas", FORMULA_TO_LATEX, printed, formula_image(printed, 44)),
        ("mathwriting.png", "mathwriting", FORMULA_TO_LATEX, handwritten,
         formula_image(handwritten, 48, random.Random(7), ink=(20, 30, 90), paper=(250, 248, 240))),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--out", default=os.path.join(root, "data", "test_images"), help="folder for the images and expected.json")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    expected = {}
    for file, dataset, prompt, text, image in test_images():
        image.save(os.path.join(args.out, file))
        expected[file] = dict(dataset=dataset, prompt=prompt, expected=text,
                              source="rendered by scripts/make_test_images.py")
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2, ensure_ascii=False)
    print(f"wrote {len(expected)} images and expected.json to {args.out}")


if __name__ == "__main__":
    main()
