"""The parsers on real dataset files: the samples in ../shared/realdata (others' data, never copied here). Skipped
where that folder is absent."""
import os

import pytest

from scripts import eval_omnidocbench, prepare_data
from tasks.docbank import DocBank
from tasks.figureqa import FigureQA
from tasks.mixture import split_of
from tasks.olmocr import OlmOCR

REALDATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                        "realdata")
pytestmark = pytest.mark.skipif(not os.path.isdir(REALDATA), reason=f"no real data samples at {REALDATA}")


@pytest.fixture(autouse=True)
def own_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANO_DEEPSEEK_OCR_DIR", str(tmp_path / "base"))


def both_splits(cls):
    train, val = (split_of(cls, split, None, os.path.join(REALDATA, cls.name)) for split in ("train", "val"))
    return [train[i] for i in range(len(train))], [val[i] for i in range(len(val))]


def test_docbank_pages_read_column_by_column(capsys):
    prepare_data.main(["--only=docbank", f"--source=docbank={os.path.join(REALDATA, 'docbank')}"])
    assert "docbank train: 10 samples" in capsys.readouterr().out
    train, val = both_splits(DocBank)
    assert len(train) == 10 and len(val) == 1
    responses = [s["response"] for s in train + val]
    assert not any("\ufb01" in r or "(cid:" in r for r in responses)  # ligatures spelled out, glyph codes gone
    report = next(r for s, r in zip(train + val, responses) if "final_report_3" in s["image_path"])
    # the left column's sentence is whole, the right column's table comes after it
    assert "With Exponent Box Encoding in the worst case, we need eight more mantissas" in report
    assert report.index("IV. SYSTEM MODEL") < report.index("TABLE VI") < report.index("V. SIMULATION RESULTS")


def test_figureqa_holds_out_whole_figures():
    train, val = both_splits(FigureQA)
    assert len(train) + len(val) == 202 and val
    assert not {s["image_path"] for s in train} & {s["image_path"] for s in val}
    assert {s["response"] for s in train + val} == {"Yes", "No"}


def test_olmocr_without_eval_files_holds_out_a_page(capsys):
    train, val = both_splits(OlmOCR)
    assert len(train) == 1 and len(val) == 1 and train[0]["image_path"] != val[0]["image_path"]
    assert "has no {subset}_eval.parquet" in capsys.readouterr().out


def test_omnidocbench_tables_are_scored_on_their_cells():
    _, pages = eval_omnidocbench.load_pages(os.path.join(REALDATA, "omnidocbench"))
    assert len(pages) == 8 and all(os.path.exists(image) for _, image in pages)
    texts = [eval_omnidocbench.page_text(page) for page, _ in pages]
    with_tables = [t for (page, _), t in zip(pages, texts) if any(b["category_type"] == "table" for b in page["layout_dets"])]
    assert with_tables and all("tabular" not in t and "\\hline" not in t for t in with_tables)
    assert any("Soxtec Soxhlet PLE" in t for t in with_tables)
