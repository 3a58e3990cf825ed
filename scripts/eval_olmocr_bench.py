"""
olmOCR-bench (allenai/olmOCR-bench, ODC-By): read the first page of every PDF of the chosen categories, write the
candidate folder in the layout its scorer reads (<out>/<pdf folder>/<pdf stem>_pg1_repeat<r>.md; a page that cannot be
read gets an empty file and a line on stderr), then score it with the pinned scorer, olmocr 0.4.27, the code that
scored the published rows (DeepSeek-OCR 75.7, olmOCR 2 82.4, LightOnOCR-2-1B 83.2). Pages render at 144 dpi and are read
with `<|grounding|>Convert the document to markdown.`, as DeepSeek-OCR's own PDF path does.

Prints a table per category and two means: over the 8 groups (the 7 test files and the per-page baseline: the
published headline, with the scorer's bootstrap 95% interval) and over 7 (without headers_footers, as some small-model
rows report). The maths tests render LaTeX with KaTeX in Chromium through Playwright: with no browser (`--browser`,
default Debian's /usr/bin/chromium) they are left out by name and the means are over what was scored.

  pip install -e '.[bench]' && pip install --no-deps olmocr==0.4.27      # the scorer, without olmocr's pipeline
  python -m scripts.eval_olmocr_bench --data <copy of allenai/olmOCR-bench> --out olmocr_candidate
  python -m scripts.eval_olmocr_bench --categories arxiv_math,table_tests --max_pages 50
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import sys
from functools import partial

from common import UserError, append_report, run_command
from config import DOC_TO_MARKDOWN, MODES, base_dir
from engine import document_ngram_rule
from grounding import strip_grounding
from hub import hub_snapshot
from scripts.ocr import render_pdf_page
from scripts.readers import add_reader_args, load_engine, positive_int, read_with_progress

SCORER = "olmocr==0.4.27"
GROUPS_8 = "mean over 8 groups (7 test files + baseline)"
GROUPS_7 = "mean over 7 groups (without headers_footers)"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu"]  # as root, on a machine without a display


def bench_dir(source):
    """The folder holding the test files (*.jsonl) and pdfs/: bench_data/ of a local copy or of the hub's."""
    if source is not None and not os.path.isdir(source):
        raise UserError(f"--data {source}: no such folder (a copy of the allenai/olmOCR-bench dataset was expected)")
    root = source or hub_snapshot("allenai/olmOCR-bench", repo_type="dataset", allow_patterns=["bench_data/*"],
                                  hint="or pass --data with a local copy of the dataset repository")
    for directory in (os.path.join(root, "bench_data"), root):
        if any(n.endswith(".jsonl") for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n))):
            if not os.path.isdir(os.path.join(directory, "pdfs")):
                raise UserError(f"{directory}: test files but no pdfs/ folder beside them")
            return directory
    raise UserError(f"{root}: no olmOCR-bench test files (bench_data/*.jsonl)")


def load_tests(directory, categories=None):
    """{category (test file stem): [test rows]}, of the categories asked for (all by default)."""
    tests = {}
    for name in sorted(n for n in os.listdir(directory) if n.endswith(".jsonl")):
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            tests[name[:-len(".jsonl")]] = [json.loads(line) for line in f if line.strip()]
    unknown = sorted(set(categories or ()) - set(tests))
    if unknown:
        raise UserError(f"--categories: {unknown} not in {directory} (it has {', '.join(tests)})")
    return {c: rows for c, rows in tests.items() if not categories or c in categories}


def pick_pdfs(tests, max_pages=0):
    """{category: [pdf paths relative to pdfs/, first page only]}, the first max_pages of each (0: all)."""
    return {c: list(dict.fromkeys(r["pdf"] for r in rows))[:max_pages or None] for c, rows in tests.items()}


def candidate_file(out, pdf, repeat):
    """Where the scorer looks for a PDF's first page: <out>/<pdf without .pdf>_pg1_repeat<r>.md."""
    return os.path.join(out, f"{os.path.splitext(pdf)[0]}_pg1_repeat{repeat}.md")


def write_candidate(engine, pdfs_dir, pdfs, out, mode, max_tokens, repeats):
    """Read every PDF's first page once per repeat (greedy: the repeats are copies) and write the candidate folder.
    Returns the PDFs that could not be read (their files are empty)."""
    failed = []
    pages = [(pdf, partial(render_pdf_page, os.path.join(pdfs_dir, pdf), 0), DOC_TO_MARKDOWN) for pdf in pdfs]
    texts = {pdf: strip_grounding(text) for pdf, _, text in read_with_progress(
        engine, pages, mode, max_tokens, failed, "olmOCR-bench", **document_ngram_rule(engine.tokenizer))}
    for pdf in pdfs:
        for repeat in range(1, repeats + 1):
            path = candidate_file(out, pdf, repeat)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(texts.get(pdf, ""))
    return failed


def find_browser(executable):
    """Whether Playwright can drive this Chromium (the maths tests need one); the reason when not."""
    try:
        from playwright.sync_api import sync_playwright
        with sync_playwright() as p:
            p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS).close()
        return None
    except Exception as e:  # not installed, no such executable, cannot start
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def scoring_dir(directory, tests, pdfs, out, work):
    """The scorer scores every PDF of its folder: a folder of its own holds the chosen tests (of the chosen PDFs), the
    PDFs (linked) and the candidate (linked as `candidate`)."""
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    for category, rows in tests.items():
        chosen = set(pdfs[category])
        with open(os.path.join(work, f"{category}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["pdf"] in chosen)
        for pdf in chosen:
            os.makedirs(os.path.join(work, "pdfs", os.path.dirname(pdf)), exist_ok=True)
            os.symlink(os.path.abspath(os.path.join(directory, "pdfs", pdf)), os.path.join(work, "pdfs", pdf))
    os.symlink(os.path.abspath(out), os.path.join(work, "candidate"))
    return work


def run_scorer(work, browser):
    """The pinned scorer on a scoring folder -> its printed output. Playwright is pointed at `browser` (the scorer
    launches Playwright's own Chromium, which cannot be downloaded without a network)."""
    from olmocr.bench import benchmark
    from playwright.sync_api._generated import BrowserType
    launch = BrowserType.launch
    BrowserType.launch = lambda self, **kw: launch(self, **dict(dict(executable_path=browser, args=CHROMIUM_ARGS), **kw))
    argv, buffer = sys.argv, io.StringIO()
    try:
        sys.argv = ["olmocr.bench.benchmark", "--dir", work, "--candidate", "candidate"]
        with contextlib.redirect_stdout(buffer):
            benchmark.main()
    finally:
        sys.argv, BrowserType.launch = argv, launch
    return buffer.getvalue()


def parse_scores(output):
    """{group: (passed, total)} and the headline's 95% interval (low, high) in %, from the scorer's printed output."""
    groups = {m.group(1).removesuffix(".jsonl"): (int(m.group(2)), int(m.group(3))) for m in re.finditer(
        r"^\s+(\S+)\s*: [\d.]+% \((\d+)/(\d+) tests\)$", output, re.M)}
    ci = re.search(r"95% CI: \[([\d.]+)%, ([\d.]+)%\]", output)
    return groups, (float(ci.group(1)), float(ci.group(2))) if ci else None


def summary_lines(groups, ci, skipped):
    """A line per group, then both means (only what was scored: the skipped groups are named)."""
    rates = {g: 100 * p / t for g, (p, t) in groups.items() if t}
    lines = [f"| {g} | {p}/{t} | {rates[g]:.1f}% |" for g, (p, t) in sorted(groups.items()) if t]
    partial_note = f" (over what was scored; left out: {'; '.join(skipped)})" if skipped else ""
    seven = [r for g, r in rates.items() if g != "headers_footers"]
    lines.append(f"- {GROUPS_8}: {sum(rates.values()) / max(1, len(rates)):.1f}"
                 + (f" (95% CI {ci[0]:.1f} to {ci[1]:.1f})" if ci else "") + partial_note)
    lines.append(f"- {GROUPS_7}: {sum(seven) / max(1, len(seven)):.1f}{partial_note}")
    return ["| group | passed | rate |", "|---|---|---|"] + lines


def main(argv=None):
    parser = argparse.ArgumentParser(description="olmOCR-bench: the candidate folder, scored by olmocr 0.4.27")
    parser.add_argument("--data", default=None, help="a local copy of allenai/olmOCR-bench (default: download)")
    parser.add_argument("--mode", default=None, choices=list(MODES),
                        help="resolution mode (default: the one the checkpoint trained in)")
    parser.add_argument("--categories", default=None, help="comma-separated test files to run (default: all seven)")
    parser.add_argument("--max_pages", type=int, default=0, help="read only the first N PDFs of each category (0: all)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="files per page (greedy: copies)")
    parser.add_argument("--out", default=None, help="the candidate folder (default: <base dir>/eval/olmocr_bench)")
    parser.add_argument("--browser", default="/usr/bin/chromium", help="Chromium for the maths tests (KaTeX)")
    add_reader_args(parser, max_tokens=4096)
    args = parser.parse_args(argv)
    directory = bench_dir(args.data)
    tests = load_tests(directory, args.categories.split(",") if args.categories else None)
    pdfs = pick_pdfs(tests, args.max_pages)
    engine, meta, checkpoint, (mode,) = load_engine(args, [args.mode] if args.mode else None)
    out = args.out or base_dir("eval", "olmocr_bench")
    failed = write_candidate(engine, os.path.join(directory, "pdfs"), [p for ps in pdfs.values() for p in ps], out,
                             mode, args.max_tokens, args.repeats)
    print(f"candidate folder: {out} ({sum(map(len, pdfs.values()))} PDFs, {len(failed)} unreadable)", file=sys.stderr)
    lines = [f"- {sum(map(len, pdfs.values()))} PDFs, {mode} mode, checkpoint {checkpoint}; candidate folder {out}"]
    try:
        importlib.import_module("olmocr.bench.benchmark")  # the scorer is an optional extra
    except ImportError as e:
        lines.append(f"- not scored: the scorer is not installed ({e.name}); `pip install -e '.[bench]' && pip install "
                     f"--no-deps {SCORER}`, then run this again")
        print("\n".join(lines))
        return None, failed
    skipped, browser_problem = [], None
    if any(r["type"] == "math" for rows in tests.values() for r in rows):
        browser_problem = find_browser(args.browser)
    if browser_problem:  # the scorer renders every maths reference when it loads the tests: they go, by name
        for category, rows in tests.items():
            n = sum(r["type"] == "math" for r in rows)
            if n:
                tests[category] = [r for r in rows if r["type"] != "math"]
                skipped.append(f"{n} maths tests of {category} (no browser: {browser_problem})")
    work = scoring_dir(directory, tests, pdfs, out, os.path.join(base_dir("eval"), "olmocr_bench_scoring"))
    try:
        groups, ci = parse_scores(run_scorer(work, args.browser))
        lines += summary_lines(groups, ci, skipped)
    except (Exception, SystemExit) as e:  # a PDF it cannot open, its own checks: said, the candidate folder stays
        groups, ci = {}, None
        lines.append(f"- not scored: the scorer stopped ({type(e).__name__}: {str(e).strip()[:200]}); the candidate "
                     f"folder is complete, `python -m olmocr.bench.benchmark --dir {work}` scores it")
    print("\n".join(lines))
    append_report(f"olmOCR-bench ({mode})", lines)
    return (groups, ci, skipped), failed


if __name__ == "__main__":
    sys.exit(1 if run_command(main)[1] else 0)
