"""
Read the 9 test images (data/test_images, one per dataset category) with a trained checkpoint and show
prompt, EXPECTED, GENERATED and EXACT / PARTIAL (normalised edit distance) for each, a summary, and an HTML
page with the summary on top and every image beside its texts (word-level differences highlighted).

  python -m scripts.vision_sample                          # the most recent checkpoint
  python -m scripts.vision_sample --checkpoint DIR --model_step 300 --mode base --max_tokens 512
"""
import argparse
import base64
import difflib
import html
import io
import json
import os
import re
import sys

from checkpoint import learned
from common import append_report, run_command
from config import FREE_OCR, MODES, base_dir
from image_process import load_image, ImageError
from metrics import normalized_edit_distance, exact_match
from scripts.readers import add_reader_args, load_engine
from tasks.synthetic import SyntheticReading

DEFAULT_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "test_images")


def load_test_set(directory):
    path = os.path.join(directory, "expected.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: run `python -m scripts.make_test_images` to create the test images")
    with open(path, encoding="utf-8") as f:
        expected = json.load(f)
    missing = [name for name in expected if not os.path.exists(os.path.join(directory, name))]
    if missing:
        raise SystemExit(f"{directory}: images listed in expected.json are missing: {missing} "
                         "(run `python -m scripts.make_test_images`)")
    return expected


def fresh_pages(trained_on, per_kind=3):
    """Pages of the reading kinds a checkpoint trained on, rendered afresh: beside the nine test images (which the demo
    never saw), what it does read. {name: (image, spec)}; none for a checkpoint that trained on other data."""
    kinds = [k.strip() for on in trained_on if (m := re.match(r"reading pages \((.*)\)", on)) for k in m[1].split(",")]
    pages = {}
    for kind in dict.fromkeys(kinds):
        spec = dict(dataset=f"{kind} page, a kind it trained on", prompt=FREE_OCR)
        for i, page in enumerate(SyntheticReading(per_kind, seed=-1, kind=kind)):  # a seed no run trains on
            pages[f"fresh {kind} page {i + 1}"] = (page["image"], dict(spec, expected=page["response"]))
    return pages


def diff_html(expected, generated):
    """Generated text with what differs from the expected text highlighted, word by word (whitespace kept)."""
    a, b = re.findall(r"\s+|\S+", expected), re.findall(r"\s+|\S+", generated)
    out = []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(html.escape("".join(b[b0:b1])))
        else:
            if a1 > a0:
                out.append(f"<del>{html.escape(''.join(a[a0:a1]))}</del>")
            if b1 > b0:
                out.append(f"<ins>{html.escape(''.join(b[b0:b1]))}</ins>")
    return "".join(out)


def summary_line(rows):
    n_exact = sum(r["exact"] for r in rows)
    mean_ned = sum(r["ned"] for r in rows) / max(1, len(rows))
    return f"{n_exact}/{len(rows)} exact, mean normalised edit distance {mean_ned:.3f}"


def verdict(row):
    return "EXACT" if row["exact"] else f"PARTIAL (edit distance {row['ned']:.3f})"


def write_html(path, rows, title, note=""):
    cells = []
    for r in rows:
        buf = io.BytesIO()
        thumb = r["image"].copy()
        thumb.thumbnail((480, 480))
        thumb.save(buf, format="PNG")
        cells.append(f"""<tr><td><img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"></td><td>
<h3>{html.escape(r['name'])} &middot; {html.escape(r['dataset'])} &middot; {verdict(r)}</h3>
<p><b>prompt</b></p><pre>{html.escape(r['prompt'])}</pre><p><b>expected</b></p><pre>{html.escape(r['expected'])}</pre>
<p><b>generated</b> (<del>missing</del> <ins>extra</ins>)</p><pre>{diff_html(r['expected'], r['generated'])}</pre></td></tr>""")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} td{{vertical-align:top;padding:8px;border-bottom:1px solid #ccc}}
pre{{white-space:pre-wrap;max-width:800px;background:#f6f6f6;padding:6px}} del{{background:#fbb}} ins{{background:#bfb}}</style>
<h1>{html.escape(title)}</h1><p><b>summary: {summary_line(rows)}</b></p><p>{html.escape(note)}</p><table>{''.join(cells)}</table>""")


def main(argv=None):
    parser = argparse.ArgumentParser(description="read the test images with a trained model")
    parser.add_argument("--mode", default=None, choices=list(MODES),
                        help="resolution mode (default: the one the checkpoint trained in)")
    parser.add_argument("--images", default=DEFAULT_IMAGES, help="a folder of test images with its expected.json")
    parser.add_argument("--html", default=None,
                        help="where to write the HTML page (default: <base dir>/vision_sample.html)")
    add_reader_args(parser, max_tokens=512)
    args = parser.parse_args(argv)

    tests = load_test_set(args.images)
    engine, meta, checkpoint, (mode,) = load_engine(args, [args.mode] if args.mode else None)
    trained_on, trained_modes = learned(meta)
    trained = f"trained on {', '.join(trained_on) or 'unknown data'} in {'/'.join(trained_modes)} mode"
    print(f"checkpoint {checkpoint} (step {meta['step']}, {trained}), reading in {mode} mode")
    images, unreadable = {}, []
    for name in tests:  # an image that cannot be read is named and left out; the others are read
        try:
            images[name] = load_image(os.path.join(args.images, name))
        except ImageError as e:
            print(f"skipping {e}", file=sys.stderr)
            unreadable.append(name)
    tests = {name: spec for name, spec in tests.items() if name in images}
    nine = list(tests)
    for name, (image, spec) in fresh_pages(trained_on).items():
        images[name], tests[name] = image, spec
    generated = dict(engine.read_iter([(name, images[name], spec["prompt"]) for name, spec in tests.items()],
                                      mode, args.max_tokens))
    rows = []
    for i, (name, spec) in enumerate(tests.items(), start=1):
        ned = normalized_edit_distance(generated[name], spec["expected"])
        exact = exact_match(generated[name], spec["expected"])
        rows.append(dict(spec, name=name, image=images[name], generated=generated[name], ned=ned, exact=exact))
        print(f"[{i}/{len(tests)}] {spec['dataset']}\nPROMPT: {spec['prompt']}\nEXPECTED: {spec['expected']}\n"
              f"GENERATED: {generated[name]}\nMATCH: {verdict(rows[-1])}\n")
    summaries = [f"the test images: {summary_line([r for r in rows if r['name'] in nine])}"]
    if len(rows) > len(nine):
        summaries.append(f"fresh pages of the kinds it trained on: {summary_line(rows[len(nine):])}")
    print("summary: " + "; ".join(summaries))
    out = args.html or os.path.join(base_dir(), "vision_sample.html")
    write_html(out, rows, f"vision_sample: {checkpoint} step {meta['step']}, {mode} mode", f"The checkpoint was {trained}"
               + (f"; not readable, left out: {', '.join(unreadable)}" if unreadable else ""))
    print(f"wrote {out}")
    append_report("vision_sample", [f"- checkpoint {checkpoint} ({trained}), read in {mode} mode",
                                    f"- {'; '.join(summaries)}" + ("; the test images are kinds it was never shown"
                                                                    if len(rows) > len(nine) else "")]
                  + [f"- {r['dataset']}: {verdict(r)} | `{r['generated'][:100]!r}`" for r in rows]
                  + ([f"- not readable, left out: {', '.join(unreadable)}"] if unreadable else []))
    if unreadable:
        print(f"{len(unreadable)} test image(s) could not be read", file=sys.stderr)
    return rows, unreadable


if __name__ == "__main__":
    sys.exit(1 if run_command(main)[1] else 0)
