"""
OCR your own images with a trained checkpoint. Prints the text of each image; when the output carries
grounding (<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>, boxes on a 0-999 grid of the image), also
writes a copy of the image with the boxes drawn.

  python -m scripts.ocr page.png scan.jpg --mode base --prompt "Free OCR."
  python -m scripts.ocr page.png --prompt "<|grounding|>Convert the document to markdown." --out boxes/
"""
import argparse
import ast
import os
import re

from PIL import ImageDraw

from checkpoint import load_for_inference
from config import MODES, FREE_OCR
from image_process import load_image, ImageError
from metrics import strip_grounding
from nano_deepseek_ocr import ocr

GROUNDING = re.compile(r"<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>", re.S)


def grounding_boxes(text, width, height):
    """[(label, (x1, y1, x2, y2) in pixels)] from grounded output; malformed coordinates are skipped."""
    boxes = []
    for label, coords in GROUNDING.findall(text):
        try:
            for x1, y1, x2, y2 in ast.literal_eval(coords.strip()):
                boxes.append((label, (x1 / 999 * width, y1 / 999 * height, x2 / 999 * width, y2 / 999 * height)))
        except (ValueError, SyntaxError, TypeError):
            continue
    return boxes


def draw_boxes(image, boxes):
    image = image.copy()
    draw = ImageDraw.Draw(image)
    for i, (label, box) in enumerate(boxes):
        colour = [(220, 40, 40), (40, 120, 220), (30, 160, 60), (200, 120, 0)][i % 4]
        draw.rectangle(box, outline=colour, width=3)
        draw.text((box[0] + 3, max(0, box[1] - 14)), label, fill=colour)
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description="read text out of images with a trained nano-deepseek-ocr checkpoint")
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--mode", default="base", choices=list(MODES))
    parser.add_argument("--prompt", default=FREE_OCR)
    parser.add_argument("--checkpoint", default=None, help="checkpoint or run directory (default: the most recent run)")
    parser.add_argument("--max_tokens", type=int, default=2048)
    parser.add_argument("--out", default=None, help="directory for the images with boxes (default: next to each image)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    model, tokenizer, _, autocast, _ = load_for_inference(args.checkpoint, device=args.device)
    results = []
    for path in args.paths:
        try:
            image = load_image(path)
        except ImageError as e:
            print(f"skipping {e}")
            continue
        with autocast:
            text = ocr(model, tokenizer, [image], args.prompt, args.mode, args.max_tokens,
                       no_repeat_ngram_size=20, ngram_window=90)[0]
        print(f"===== {path}\n{strip_grounding(text)}")
        boxes = grounding_boxes(text, image.width, image.height)
        if boxes:
            out_dir = args.out or os.path.dirname(os.path.abspath(path))
            os.makedirs(out_dir, exist_ok=True)
            out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_boxes.png")
            draw_boxes(image, boxes).save(out)
            print(f"({len(boxes)} boxes drawn -> {out})")
        results.append((path, text))
    return results


if __name__ == "__main__":
    main()
