"""
DeepSeek-OCR's grounding format, written for training data and parsed for drawing and scoring:
  <|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>\\n<the block's text>
with boxes on a 0-999 grid of the image.
"""
import ast
import re

GROUNDING = re.compile(r"<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>", re.S)


def grounded_block(kind, markdown, box):
    """One block of grounded output: its type, its box on the 0-999 grid, then its text."""
    return f"<|ref|>{kind}<|/ref|><|det|>[{[int(v) for v in box]}]<|/det|>\n{markdown}"


def grounding_boxes(text, width, height):
    """[(label, (x1, y1, x2, y2) in pixels)] from grounded output. Corners come back ordered (x1 <= x2, y1 <= y2)
    whatever order the model wrote them in; malformed coordinates are skipped."""
    boxes = []
    for label, coords in GROUNDING.findall(text):
        try:
            for x1, y1, x2, y2 in ast.literal_eval(coords.strip()):
                x1, x2 = sorted((float(x1) / 999 * width, float(x2) / 999 * width))
                y1, y2 = sorted((float(y1) / 999 * height, float(y2) / 999 * height))
                boxes.append((label, (x1, y1, x2, y2)))
        except (ValueError, SyntaxError, TypeError):
            continue
    return boxes


def strip_grounding(text):
    """The text without its <|ref|>..<|/ref|><|det|>..<|/det|> annotations (markdown for scoring)."""
    return re.sub(GROUNDING.pattern + r"\n?", "", text, flags=re.S)
