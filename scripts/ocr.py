"""
OCR your own pages with a trained checkpoint: image files, directories of them, PDFs and multi-page TIFF / GIF
files (every page). Pages stream through the engine (continuous batching); each page's text goes to stdout, in the
order of the inputs, and with --out to <out>/<name>.md (a PDF's or TIFF's pages to <name>_page001.md, ...; a name an
earlier input already took gets _2, _3, ...: every input its own file). When the
output carries grounding (boxes on a 0-999 grid), a copy of the page with the boxes drawn is written beside the
markdown. The mode defaults to the one the checkpoint trained in. Problems go to stderr; the exit status is 1 when
any input could not be read (the other pages are still read). Under torchrun the pages are split across the ranks.

  python -m scripts.ocr page.png > page.md
  python -m scripts.ocr scans/ paper.pdf --mode base --out ocr_out/
  python -m scripts.ocr page.png --prompt "<|grounding|>Convert the document to markdown." --out boxes/
  torchrun --standalone --nproc_per_node=8 -m scripts.ocr pdfs/ --out ocr_out/
"""
import argparse
import os
import sys

from PIL import ImageDraw

from common import exit_with_launcher, get_dist_info, run_command
from config import MODES, FREE_OCR
from engine import document_ngram_rule
from grounding import grounding_boxes, strip_grounding
from image_process import ImageError, frame_count, load_image, prepare_image
from scripts.readers import add_reader_args, load_engine, read_with_progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def pages_of(path):
    """[(page name, load())] for a file or a directory (its images and PDFs, sorted); PDFs give one entry per page."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS + (".pdf",)))
        return [page for n in names for page in pages_of(os.path.join(path, n))]
    stem = os.path.splitext(path)[0]
    if not path.lower().endswith(".pdf"):
        frames = frame_count(path)  # a multi-page TIFF (or GIF): every frame is a page, as a PDF's pages are
        if frames == 1:
            return [(stem, lambda: load_image(path))]
        return [(f"{stem}_page{i + 1:03d}", lambda i=i: load_image(path, frame=i)) for i in range(frames)]
    import pypdfium2 as pdfium
    try:
        count = len(pdfium.PdfDocument(path))
    except Exception as e:  # not a PDF, encrypted, damaged...
        raise ImageError(f"{path}: cannot open PDF ({type(e).__name__}: {e})") from e
    return [(f"{stem}_page{i + 1:03d}", lambda i=i: render_pdf_page(path, i)) for i in range(count)]


def render_pdf_page(path, index, dpi=144):
    import pypdfium2 as pdfium
    try:
        image = pdfium.PdfDocument(path)[index].render(scale=dpi / 72).to_pil()
    except Exception as e:
        raise ImageError(f"{path} page {index + 1}: cannot render ({type(e).__name__}: {e})") from e
    return prepare_image(image, f"{path} page {index + 1}")


def draw_boxes(image, boxes):
    image = image.copy()
    draw = ImageDraw.Draw(image)
    for i, (label, box) in enumerate(boxes):
        colour = [(220, 40, 40), (40, 120, 220), (30, 160, 60), (200, 120, 0)][i % 4]
        draw.rectangle(box, outline=colour, width=3)
        draw.text((box[0] + 3, max(0, box[1] - 14)), label, fill=colour)
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description="read text out of images and PDFs with a trained checkpoint")
    parser.add_argument("paths", nargs="+", help="image files, directories of them, PDFs")
    parser.add_argument("--mode", default=None, choices=list(MODES),
                        help="resolution mode (default: the one the checkpoint trained in)")
    parser.add_argument("--prompt", default=FREE_OCR, help="what to ask of every page")
    parser.add_argument("--out", default=None, help="directory for <name>.md per page (a name an earlier input took "
                        "gets _2, _3, ...) and the images with boxes")
    add_reader_args(parser, max_tokens=2048)
    args = parser.parse_args(argv)
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp:
        exit_with_launcher()

    # every input is looked at before the model loads: a typo fails in a second, not after the load
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out}: a file, not a directory")
    failures, pages = 0, []
    for path in args.paths:
        try:
            if not os.path.exists(path):
                raise ImageError(f"{path}: no such file or directory")
            found = pages_of(path)
            if not found:
                print(f"skipping {path}: no images or PDFs in it (its subfolders are not searched: name them)",
                      file=sys.stderr)
            pages += found
        except ImageError as e:
            print(f"skipping {e}", file=sys.stderr)
            failures += 1
    pages = list(zip(unique([name for name, _ in pages]), [load for _, load in pages]))
    out_names = dict(zip([name for name, _ in pages], unique([os.path.basename(name) for name, _ in pages])))
    pages = pages[rank::world_size]
    if not pages:
        raise SystemExit(1 if failures else "no pages to read")
    if world_size > 1 and args.device is None:
        args.device = f"cuda:{local_rank}"
    engine, _, checkpoint, (mode,) = load_engine(args, [args.mode] if args.mode else None)
    print(f"reading {len(pages)} page(s)", file=sys.stderr)

    # pages are decoded only as slots free up (one that fails is reported and the others go on); they finish in any
    # order, and stdout takes each as soon as every page before it is out (or failed)
    results, failed, finished = [], [], {}
    ngram = document_ngram_rule(engine.tokenizer)
    prompted = [(name, load, args.prompt) for name, load in pages]
    waiting = [name for name, _ in pages]

    def show(all_done=False):
        while waiting and (waiting[0] in finished or waiting[0] in failed or all_done):
            name = waiting.pop(0)
            if name in finished:
                print((f"===== {name}\n" if len(pages) > 1 else "") + strip_grounding(finished.pop(name)), flush=True)
    try:
        for name, image, text in read_with_progress(engine, prompted, mode, args.max_tokens, failed, **ngram):
            finished[name] = text
            show()
            write_outputs(args.out, out_names[name], name, image, text)
            results.append((name, text))
    except KeyboardInterrupt:  # what was read is out already; the rest is not a traceback
        print(f"\ninterrupted after {len(results)} of {len(pages)} pages", file=sys.stderr)
        raise SystemExit(130)
    show(all_done=True)
    failures += len(failed)
    if failures:
        print(f"{failures} input(s) could not be read", file=sys.stderr)
    return results, failures


def unique(names):
    """The names in order, one taken before getting _2, _3, ...: every input its own key and its own output file."""
    taken, out = set(), []
    for name in names:
        n, k = name, 1
        while n in taken:
            k += 1
            n = f"{name}_{k}"
        taken.add(n)
        out.append(n)
    return out


def write_outputs(out, out_name, name, image, text):
    """<out>/<out_name>.md, and the page with its grounding boxes drawn when it has some (beside the input without
    --out)."""
    out_stem = os.path.join(out, out_name) if out else None
    if out_stem:
        os.makedirs(out, exist_ok=True)
        with open(out_stem + ".md", "w", encoding="utf-8") as f:
            f.write(strip_grounding(text))
    boxes = grounding_boxes(text, image.width, image.height)
    if boxes:
        boxes_path = (out_stem or name) + "_boxes.png"
        draw_boxes(image, boxes).save(boxes_path)
        print(f"({len(boxes)} boxes drawn -> {boxes_path})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(1 if run_command(main)[1] else 0)
