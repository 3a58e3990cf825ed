"""olmOCR-bench: the candidate folder in the layout the scorer reads, and the pinned scorer (olmocr 0.4.27) on
hand-written markdown for a fixture of our own in the benchmark's layout (no row of the real benchmark)."""
import json
import os

import pytest
from PIL import Image, ImageDraw

from scripts import eval_olmocr_bench as bench

TESTS = {  # test file -> rows; table_tests point into pdfs/tables/, as the real benchmark's do
    "arxiv_math": [dict(pdf="arxiv_math/eq.pdf", page=1, id="eq_math", type="math", math="x^{2} + y^{2} = z^{2}"),
                   dict(pdf="arxiv_math/eq.pdf", page=1, id="eq_present", type="present", text="Pythagoras")],
    "headers_footers": [dict(pdf="headers_footers/doc.pdf", page=1, id="doc_absent", type="absent", text="Page 7"),
                        dict(pdf="headers_footers/doc.pdf", page=1, id="doc_present", type="present", text="Body text")],
    "table_tests": [dict(pdf="tables/grid.pdf", page=1, id="grid_cell", type="table", cell="42", up="Count", left="Pears"),
                    dict(pdf="tables/grid.pdf", page=1, id="grid_order", type="order", before="Fruit", after="Total"),
                    dict(pdf="tables/grid.pdf", page=1, id="grid_baseline", type="baseline")],
}


@pytest.fixture
def bench_data(tmp_path):
    root = tmp_path / "olmOCR-bench" / "bench_data"
    for category, rows in TESTS.items():
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{category}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for pdf in {r["pdf"] for r in rows}:
            page = Image.new("RGB", (400, 500), "white")
            ImageDraw.Draw(page).text((20, 20), pdf, fill="black")
            (root / "pdfs" / os.path.dirname(pdf)).mkdir(parents=True, exist_ok=True)
            page.save(root / "pdfs" / pdf)
    return root.parent


def test_the_candidate_folder_is_what_the_scorer_reads(overfit_run, bench_data, tmp_path, capsys):
    _, summary = overfit_run
    (bench_data / "bench_data" / "pdfs" / "headers_footers" / "doc.pdf").write_bytes(b"%PDF-1.4 broken")  # unreadable
    out = tmp_path / "candidate"
    _, failed = bench.main(["--data", str(bench_data), "--checkpoint", summary["checkpoint"], "--mode", "tiny",
                            "--max_tokens", "6", "--repeats", "2", "--out", str(out),
                            "--categories", "headers_footers,table_tests"])
    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert files == ["headers_footers/doc_pg1_repeat1.md", "headers_footers/doc_pg1_repeat2.md",
                     "tables/grid_pg1_repeat1.md", "tables/grid_pg1_repeat2.md"]
    assert failed == ["headers_footers/doc.pdf"] and (out / "headers_footers" / "doc_pg1_repeat1.md").read_text() == ""
    printed = capsys.readouterr()
    assert "doc.pdf" in printed.err and "Traceback" not in printed.err
    assert "- not scored: " in printed.out  # the scorer cannot open the broken PDF either (or is not installed): said
    assert (out / "tables" / "grid_pg1_repeat1.md").read_text() == (out / "tables" / "grid_pg1_repeat2.md").read_text()


def test_unknown_categories_and_missing_data_are_one_line(bench_data, tmp_path):
    from common import UserError
    with pytest.raises(UserError, match=r"--categories: \['tables'\] not in .* \(it has arxiv_math, headers_footers"):
        bench.load_tests(bench.bench_dir(str(bench_data)), ["tables"])
    with pytest.raises(UserError, match="no such folder"):
        bench.bench_dir(str(tmp_path / "nowhere"))


def write(out, pdf, text):
    path = bench.candidate_file(str(out), pdf, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_the_pinned_scorer_passes_and_fails_what_it_should(bench_data, tmp_path):
    pytest.importorskip("olmocr.bench.benchmark", reason="the scorer is the optional extra: pip install -e '.[bench]' "
                                                        "&& pip install --no-deps olmocr==0.4.27")
    directory = bench.bench_dir(str(bench_data))
    tests = bench.load_tests(directory)
    browser_problem = bench.find_browser("/usr/bin/chromium")
    if browser_problem:  # as the runner does: the maths test goes, and is named
        tests["arxiv_math"] = [r for r in tests["arxiv_math"] if r["type"] != "math"]
    out = tmp_path / "candidate"
    write(out, "arxiv_math/eq.pdf", "Pythagoras wrote it down.\n\n$$x^{2}+y^{2}=z^{2}$$\n")
    write(out, "headers_footers/doc.pdf", "Body text of the page.\n\nPage 7\n")  # the footer that should not be there
    write(out, "tables/grid.pdf", "Fruit prices\n\n<table><tr><th></th><th>Count</th></tr><tr><td>Pears</td><td>42</td>"
                                  "</tr></table>\n\nTotal: 42\n")
    work = bench.scoring_dir(directory, tests, bench.pick_pdfs(tests), str(out), str(tmp_path / "scoring"))
    groups, ci = bench.parse_scores(bench.run_scorer(work, "/usr/bin/chromium"))
    expected = {"arxiv_math": (1 if browser_problem else 2, 1 if browser_problem else 2), "headers_footers": (1, 2),
                "table_tests": (3, 3), "baseline": (2, 2)}  # the scorer adds a baseline test for the PDFs without one
    assert groups == expected, groups
    assert ci is not None and 0 <= ci[0] <= ci[1] <= 100
    lines = bench.summary_lines(groups, ci, ["1 maths tests of arxiv_math (no browser)"] if browser_problem else [])
    means = [line for line in lines if line.startswith("- mean")]
    rates = [100.0, 50.0, 100.0, 100.0]
    assert means[0].startswith(f"- {bench.GROUPS_8}: {sum(rates) / 4:.1f} (95% CI")
    assert means[1].startswith(f"- {bench.GROUPS_7}: {100.0:.1f}")
    assert ("left out: 1 maths tests" in means[0]) == bool(browser_problem)
