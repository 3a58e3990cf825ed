"""The nine dataset transformations on fixtures in each dataset's real layout, the synthetic task, mixtures, the loader."""
import hashlib
import io
import json
import os
import random
import re
import tarfile
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value
from PIL import Image, ImageDraw

from config import DOC_TO_MARKDOWN, FORMULA_TO_LATEX, MARKDOWN_NO_GROUNDING, PARSE_FIGURE
from dataloader import VisionDataLoader
from common import UserError
from tasks.chartqa import ChartQA
from tasks.common import Task, VisionTaskMixture
from tasks.docbank import DocBank, page_blocks
from tasks.figureqa import FigureQA
from tasks.latex_formulas import LatexFormulas
from tasks.llava_cc3m import LlavaCC3M
from tasks.mathwriting import MathWriting
from tasks.mixture import VISION_TASKS, split_of
from tasks.olmocr import OlmOCR
from tasks.plotqa import PlotQA
from tasks.pubtables import PubTables
from tasks.smoltalk import SmolTalk
from tasks.synthetic import READING_KINDS, SyntheticPages, font, make_sample, render_bridge, render_table


@pytest.fixture(autouse=True)
def own_base_dir(tmp_path, monkeypatch):
    """Each test prepares its datasets into its own base directory (prepared data is cached by name)."""
    monkeypatch.setenv("NANO_DEEPSEEK_OCR_DIR", str(tmp_path / "base"))


def png_bytes(size=(64, 48), colour=(200, 30, 30), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write_parquet(directory, columns, features, split="train"):
    """A dataset repo as the hub serves it: data/<split>-00000-of-00001.parquet with its features metadata."""
    os.makedirs(directory / "data", exist_ok=True)
    Dataset.from_dict(columns, features=Features(features)).to_parquet(str(directory / "data" / f"{split}-00000-of-00001.parquet"))
    return str(directory)


def check(sample, text, response, size):
    assert sample["text"] == text and sample["response"] == response
    assert Image.open(sample["image_path"]).size == size  # an image on disk, not a PIL object in the sample


def test_chartqa(tmp_path):
    src = write_parquet(tmp_path, dict(image=[png_bytes()], query=["Which bar is tallest?"], label=[["Blue"]], human_or_machine=[0]),
                        dict(image=ImageFeature(), query=Value("string"), label=Sequence(Value("string")), human_or_machine=Value("int64")))
    task = ChartQA(source=src)
    assert len(task) == 1
    check(task[0], "<image>\nQuestion: Which bar is tallest?", "Blue", (64, 48))


def test_figureqa_one_sample_per_question(tmp_path):
    qa = [[dict(question="Is Red the maximum?", answer="1"), dict(question="Is Blue the minimum?", answer="0")]]
    src = write_parquet(tmp_path, dict(image=[dict(bytes=png_bytes(), path=None)], qa=qa),
                        dict(image=ImageFeature(decode=False), qa=[dict(question=Value("string"), answer=Value("string"))]))
    task = FigureQA(source=src)
    assert len(task) == 2
    check(task[0], "<image>\nIs Red the maximum?", "Yes", (64, 48))
    check(task[1], "<image>\nIs Blue the minimum?", "No", (64, 48))
    assert task[0]["image_path"] == task[1]["image_path"]  # stored once


def test_plotqa(tmp_path):
    src = write_parquet(tmp_path, dict(image=[png_bytes(), png_bytes()], text=["Bars of GDP: 2001 4.5, 2002 4.9", "  "]),
                        dict(image=ImageFeature(), text=Value("string")))
    task = PlotQA(source=src)
    assert len(task) == 1  # the empty description is skipped
    check(task[0], f"<image>\n{PARSE_FIGURE}", "Bars of GDP: 2001 4.5, 2002 4.9", (64, 48))


@pytest.mark.parametrize("cls,column", [(LatexFormulas, "latex_formula"), (MathWriting, "latex")])
def test_formulas(tmp_path, cls, column):
    src = write_parquet(tmp_path, {"image": [png_bytes((120, 40))], column: [r" \frac{a}{b} "]}, {"image": ImageFeature(), column: Value("string")})
    check(cls(source=src)[0], f"<image>\n{FORMULA_TO_LATEX}", r"\frac{a}{b}", (120, 40))


def test_llava_cc3m(tmp_path):
    chat = [dict(id="GCC_1", image="GCC_1.jpg", conversations=[
        dict(value="Give a short description of the image.\n<image>", **{"from": "human"}),
        dict(value="a dog runs on the beach .", **{"from": "gpt"})])]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        z.writestr("GCC_1.jpg", png_bytes((80, 60), fmt="JPEG"))
    check(LlavaCC3M(source=str(tmp_path))[0], "<image>\nGive a short description of the image.", "a dog runs on the beach .", (80, 60))


def test_docbank(tmp_path):
    lines = ["Deep\t100\t50\t200\t80\t0\t0\t0\tArial-Bold\ttitle", "Reading\t210\t50\t400\t80\t0\t0\t0\tArial-Bold\ttitle",
             "1\t100\t100\t120\t120\t0\t0\t0\tArial-Bold\tsection", "Intro\t130\t100\t220\t120\t0\t0\t0\tArial-Bold\tsection",
             "##LTFigure##\t100\t200\t900\t500\t0\t0\t0\tArial\tfigure",
             "We\t100\t600\t140\t620\t0\t0\t0\tTimes\tparagraph", "read.\t150\t600\t220\t620\t0\t0\t0\tTimes\tparagraph"]
    with zipfile.ZipFile(tmp_path / "DocBank_500K_txt.zip", "w") as z:
        z.writestr("DocBank_500K_txt/a_page.txt", "x\t1\t1\t2\t2\t0\t0\t0\tf\tparagraph\n")  # the 1st of 100 goes to val
        z.writestr("DocBank_500K_txt/b_page.txt", "\n".join(lines) + "\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("DocBank_500K_ori_img/a_page_ori.jpg", png_bytes(fmt="JPEG"))
        z.writestr("DocBank_500K_ori_img/b_page_ori.jpg", png_bytes((100, 130), fmt="JPEG"))
    data = buf.getvalue()  # byte-split like the hub's DocBank_500K_ori_img.zip.001, .002
    (tmp_path / "DocBank_500K_ori_img.zip.001").write_bytes(data[:len(data) // 2])
    (tmp_path / "DocBank_500K_ori_img.zip.002").write_bytes(data[len(data) // 2:])
    train = DocBank(source=str(tmp_path))
    assert len(train) == 1
    expected = ("<|ref|>title<|/ref|><|det|>[[99, 49, 399, 79]]<|/det|>\n# Deep Reading\n\n"
                "<|ref|>sub_title<|/ref|><|det|>[[99, 99, 219, 119]]<|/det|>\n## 1 Intro\n\n"
                "<|ref|>text<|/ref|><|det|>[[99, 599, 219, 619]]<|/det|>\nWe read.")
    check(train[0], f"<image>\n{DOC_TO_MARKDOWN}", expected, (100, 130))
    assert DocBank(split="val", source=str(tmp_path))[0]["response"].endswith("\nx")


def docbank_line(token, x0, y0, x1, y1, label, font="NimbusRomNo9L-Regu"):
    return "\t".join([token, str(x0), str(y0), str(x1), str(y1), "0", "0", "0", font, label])


def two_column_page(rows=8):
    """A DocBank .txt as the real ones are: CRLF, tokens line by line across the whole width, so each line holds the
    left column's words, then the right column's; a full-width title above, a page number below (in the gutter)."""
    lines = [docbank_line(w, x, 60, x + 94, 75, "title") for w, x in (("Reading", 300), ("Order", 400), ("Matters", 500))]
    for r in range(rows):
        y = 120 + 16 * r
        words = [(f"L{r}a", 80, 190), (f"L{r}b", 196, 310), ("e\ufb03cient" if r == 3 else f"L{r}c", 316, 440),
                 ("(cid:27)" if r == 5 else f"R{r}a", 530, 640), (f"R{r}b", 646, 770), (f"R{r}c", 776, 900)]
        lines += [docbank_line(w, x0, y, x1, y + 12, "paragraph") for w, x0, x1 in words]
    lines.append(docbank_line("7", 495, 950, 505, 962, "footer"))
    return "\r\n".join(lines) + "\r\n"


def test_docbank_reads_two_columns_one_after_the_other():
    tally = Counter()
    blocks = page_blocks(two_column_page().splitlines(keepends=True), tally)
    assert [label for label, _, _ in blocks] == ["title", "paragraph", "paragraph", "footer"]
    title, left, right, footer = (text for _, text, _ in blocks)
    assert title == "Reading Order Matters" and footer == "7"
    assert left == " ".join(f"L{r}{c}" if (r, c) != (3, "c") else "efficient" for r in range(8) for c in "abc")
    assert right == " ".join(f"R{r}{c}" for r in range(8) for c in "abc" if (r, c) != (5, "a"))
    assert blocks[1][2] == [80, 120, 440, 244] and blocks[2][2] == [530, 120, 900, 244]  # neither crosses the gutter
    assert tally == Counter({"ligatures spelled out": 1, "(cid:N) tokens dropped": 1, "two-column pages": 1})


def test_docbank_keeps_one_column_pages_and_full_width_tables_in_line_order():
    rng, lines, words = random.Random(0), [], []
    for r in range(12):  # one column of text: words of all widths run across the middle of every line
        x = 80
        while x < 850:
            width = rng.randint(20, 90)
            words.append(f"w{len(words)}")
            lines.append(docbank_line(words[-1], x, 100 + 16 * r, x + width, 112 + 16 * r, "paragraph"))
            x += width + 6
    table = [docbank_line(f"c{r}{k}", x, 300 + 14 * r, x + 60, 310 + 14 * r, "table")  # a wide table: a gap mid-page
             for r in range(8) for k, x in enumerate((150, 300, 620, 760))]
    blocks = page_blocks(lines + table)
    assert [(label, text) for label, text, _ in blocks] == [
        ("paragraph", " ".join(words)), ("table", " ".join(f"c{r}{k}" for r in range(8) for k in range(4)))]


def test_olmocr_renders_the_pdf(tmp_path):
    page = Image.new("RGB", (300, 400), (255, 255, 255))
    page.paste((0, 0, 0), (50, 50, 250, 80))
    pdf = io.BytesIO()
    page.save(pdf, format="PDF")
    os.makedirs(tmp_path / "pdf_tarballs")
    with tarfile.open(tmp_path / "pdf_tarballs" / "00_documents_train_00000.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("./doc1.pdf")
        info.size = len(pdf.getvalue())
        tf.addfile(info, io.BytesIO(pdf.getvalue()))
    rows = dict(id=["doc1", "doc2"], url=["u1", "u2"], page_number=[1, 1], primary_language=["en", "en"],
                is_rotation_valid=[True, True], is_table=[False, False], is_diagram=[False, False],
                natural_text=["Title\n\nSome text with \\(x^2\\).", "missing pdf"],
                pdf_relpath=["pdf_tarballs/00_documents_train_00000.tar.gz:doc1.pdf", "pdf_tarballs/00_documents_train_00000.tar.gz:doc2.pdf"])
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "00_documents_train.parquet"))
    task = OlmOCR(source=str(tmp_path))
    assert len(task) == 1
    sample = task[0]
    assert sample["text"] == f"<image>\n{MARKDOWN_NO_GROUNDING}" and sample["response"] == "Title\n\nSome text with \\(x^2\\)."
    image = Image.open(sample["image_path"])
    assert max(image.size) == 1280 and abs(image.width / image.height - 0.75) < 0.01
    dark = np.asarray(image.convert("L")) < 128
    assert dark.any() and dark.mean() < 0.2  # the black bar, rendered


def add_file(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_pubtables_cells_to_html(tmp_path):
    def obj(name, box):
        return f"<object><name>{name}</name><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
    xml = "<annotation><filename>PMC1_table_0.jpg</filename>" + "".join([
        obj("table", (0, 0, 300, 90)), obj("table row", (0, 0, 300, 30)), obj("table row", (0, 30, 300, 60)), obj("table row", (0, 60, 300, 90)),
        obj("table column", (0, 0, 100, 90)), obj("table column", (100, 0, 200, 90)), obj("table column", (200, 0, 300, 90)),
        obj("table spanning cell", (100, 0, 300, 30))]) + "</annotation>"
    words = [dict(bbox=[110, 5, 180, 25], text="Score", block_num=0, line_num=0), dict(bbox=[10, 5, 60, 25], text="Method", block_num=0, line_num=0),
             dict(bbox=[10, 35, 30, 55], text="A", block_num=0, line_num=0), dict(bbox=[110, 35, 150, 55], text="71.2", block_num=0, line_num=0),
             dict(bbox=[210, 35, 250, 55], text="90.1", block_num=0, line_num=0), dict(bbox=[10, 65, 40, 85], text="B", block_num=0, line_num=0),
             dict(bbox=[45, 65, 80, 85], text="net", block_num=0, line_num=0), dict(bbox=[210, 65, 250, 85], text="88.7", block_num=0, line_num=0)]
    for name, files in (("Annotations_Train", {"PMC1_table_0.xml": xml.encode()}),
                        ("Images_Train", {"PMC1_table_0.jpg": png_bytes((300, 90), fmt="JPEG")}),
                        ("Table_Words", {"words/PMC1_table_0_words.json": json.dumps(words).encode()})):
        with tarfile.open(tmp_path / f"PubTables-1M-Structure_{name}.tar.gz", "w:gz") as tf:
            for member, data in files.items():
                add_file(tf, member, data)
    expected = ('<table><tr><td>Method</td><td colspan="2">Score</td></tr><tr><td>A</td><td>71.2</td><td>90.1</td></tr>'
                '<tr><td>B net</td><td></td><td>88.7</td></tr></table>')
    check(PubTables(source=str(tmp_path))[0], f"<image>\n{MARKDOWN_NO_GROUNDING}", expected, (300, 90))


def test_smoltalk(tmp_path):
    messages = [[dict(role="user", content="hi"), dict(role="assistant", content="hello")]] * 3
    src = write_parquet(tmp_path, dict(messages=messages), dict(messages=[dict(role=Value("string"), content=Value("string"))]))
    task = SmolTalk(source=src, max_samples=2)
    assert len(task) == 2 and task[0] == dict(messages=messages[0])


def test_preparation_resumes_after_a_crash(tmp_path, monkeypatch):
    import dataset
    n = 250
    src = write_parquet(tmp_path / "src", dict(image=[png_bytes()] * n, text=[f"plot {i}" for i in range(n)]),
                        dict(image=ImageFeature(), text=Value("string")))
    calls = []
    original = PlotQA.to_sample

    def flaky(row, index, image_dir):
        calls.append(index)
        if index == 180 and len(calls) == 181:
            raise KeyboardInterrupt  # the machine goes down mid-way
        return original(row, index, image_dir)
    monkeypatch.setattr(PlotQA, "to_sample", staticmethod(flaky))
    with pytest.raises(KeyboardInterrupt):
        PlotQA(source=src)
    progress = json.load(open(os.path.join(dataset.data_dir("plotqa-train"), "progress.json")))
    assert 0 < progress["rows"] <= 180
    task = PlotQA(source=src)
    assert [s["response"] for s in task.samples] == [f"plot {i}" for i in range(n)]  # none lost, none doubled
    assert calls.count(0) == 1 and calls.count(progress["rows"]) == 2  # resumed after the last saved row


# ---- splits and local copies: what real dataset files need ----

def distinct_png(row, fmt="PNG"):
    return png_bytes((40 + row, 30 + row % 7), ((37 * row) % 256, (91 * row) % 256, 120), fmt)


def image_table(rows, split, **columns):
    """Parquet columns image + the given per-row columns (functions of the row number)."""
    return {"image": [dict(bytes=distinct_png(r), path=None) for r in rows], **{k: [f(r) for r in rows] for k, f in columns.items()}}


def copy_of(cls, root, n=120):
    """A local copy of each dataset in its real layout, n rows (figures, pages, images), row r naming itself 'r<r>'."""
    train, val = range(n), range(n, n + 5)
    img = dict(image=ImageFeature(decode=False))
    if cls in (ChartQA, PlotQA, MathWriting, FigureQA, LatexFormulas):
        column, feature = {ChartQA: ("query", Value("string")), PlotQA: ("text", Value("string")),
                           MathWriting: ("latex", Value("string")), LatexFormulas: ("latex_formula", Value("string")),
                           FigureQA: ("qa", [dict(question=Value("string"), answer=Value("string"))])}[cls]
        value = (lambda r: [dict(question=f"Is r{r} q{k} high?", answer=str(k % 2)) for k in range(13)]) if cls is FigureQA \
            else (lambda r: f"r{r}")
        extra = dict(label=(lambda r: ["Yes"]),) if cls is ChartQA else {}
        features = dict(img, **{column: feature}, **({"label": Sequence(Value("string"))} if extra else {}))
        for split, rows in (("train", train),) + (((cls.val_split, val),) if cls.val_split else ()):
            write_parquet(root, image_table(rows, split, **{column: value}, **extra), features, split)
    elif cls is LlavaCC3M:
        chat = [dict(id=f"r{r}", image=f"GCC_{r}.jpg", conversations=[dict(value="<image>\nDescribe.", **{"from": "human"}),
                                                                       dict(value=f"r{r}", **{"from": "gpt"})]) for r in train]
        (root / "chat.json").write_text(json.dumps(chat))
        with zipfile.ZipFile(root / "images.zip", "w") as z:
            for r in train:
                z.writestr(f"GCC_{r}.jpg", distinct_png(r, "JPEG"))
    elif cls is DocBank:
        with zipfile.ZipFile(root / "DocBank_500K_txt.zip", "w") as z:
            for r in range(n):
                z.writestr(f"DocBank_500K_txt/p{r:04d}.txt", docbank_line(f"r{r}", 100, 100, 200, 120, "paragraph") + "\r\n")
        with zipfile.ZipFile(root / "DocBank_500K_ori_img.zip.001", "w") as z:
            for r in range(n):
                z.writestr(f"DocBank_500K_ori_img/p{r:04d}_ori.jpg", distinct_png(r, "JPEG"))
    elif cls is OlmOCR:
        os.makedirs(root / "pdf_tarballs")
        for split, rows in (("train", range(4)), ("eval", range(4, 6))):
            tarball = f"pdf_tarballs/00_documents_{split}_00000.tar.gz"
            with tarfile.open(root / tarball, "w:gz") as tf:
                for r in rows:
                    pdf = io.BytesIO()
                    Image.open(io.BytesIO(distinct_png(r))).convert("RGB").save(pdf, format="PDF")
                    add_file(tf, f"./r{r}.pdf", pdf.getvalue())
            Dataset.from_dict(dict(id=[f"r{r}" for r in rows], natural_text=[f"r{r}" for r in rows],
                                   pdf_relpath=[f"{tarball}:r{r}.pdf" for r in rows])).to_parquet(str(root / f"00_documents_{split}.parquet"))
    elif cls is PubTables:
        words = {}
        for part, rows in (("Train", range(4)), ("Val", range(4, 6))):
            xml = {f"r{r}.xml": ("<annotation>" + "".join(f"<object><name>{name}</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>50</xmax>"
                                 f"<ymax>20</ymax></bndbox></object>" for name in ("table row", "table column")) + "</annotation>").encode()
                   for r in rows}
            for name, files in ((f"Annotations_{part}", xml), (f"Images_{part}", {f"r{r}.jpg": distinct_png(r, "JPEG") for r in rows})):
                with tarfile.open(root / f"PubTables-1M-Structure_{name}.tar.gz", "w:gz") as tf:
                    for member, data in files.items():
                        add_file(tf, member, data)
            words.update({f"words/r{r}_words.json": json.dumps([dict(bbox=[5, 5, 20, 15], text=f"r{r}")]).encode() for r in rows})
        with tarfile.open(root / "PubTables-1M-Structure_Table_Words.tar.gz", "w:gz") as tf:
            for member, data in words.items():
                add_file(tf, member, data)
    return str(root)


def row_of(sample):
    return int(re.search(r"\br(\d+)", sample["text"] + " " + sample["response"]).group(1))


def image_digest(sample):
    return hashlib.sha256(open(sample["image_path"], "rb").read()).hexdigest()


@pytest.mark.parametrize("cls", [cls for cls, _ in VISION_TASKS], ids=lambda c: c.name)
def test_train_and_validation_share_no_row_and_no_image(cls, tmp_path):
    src = copy_of(cls, tmp_path)
    train, val = (split_of(cls, split, None, src) for split in ("train", "val"))
    train, val = ([t[i] for i in range(len(t))] for t in (train, val))
    assert train and val
    for key in (row_of, lambda s: s["image_path"], image_digest):
        assert not {key(s) for s in train} & {key(s) for s in val}


def test_held_out_figures_keep_all_their_questions(tmp_path, monkeypatch):
    src = copy_of(FigureQA, tmp_path)
    val = split_of(FigureQA, "val", None, src)
    assert len(val) == 2 * 13 and sorted(Counter(map(row_of, val.samples)).values()) == [13, 13]  # 120 // 50 figures
    monkeypatch.setenv("NANO_DEEPSEEK_OCR_DIR", str(tmp_path / "again"))  # prepared afresh: the same figures
    assert sorted(map(row_of, split_of(FigureQA, "val", None, src).samples)) == sorted(map(row_of, val.samples))


def test_a_copy_without_its_validation_split_holds_out_part_of_train(tmp_path, capsys):
    src = copy_of(OlmOCR, tmp_path)
    for name in ("00_documents_eval.parquet", "pdf_tarballs/00_documents_eval_00000.tar.gz"):
        os.remove(os.path.join(src, name))
    train, val = (split_of(OlmOCR, split, None, src) for split in ("train", "val"))
    assert len(train) == 3 and len(val) == 1 and not {row_of(s) for s in train} & {row_of(s) for s in val}
    assert "has no {subset}_eval.parquet" in capsys.readouterr().out


def test_a_multi_config_copy_loads_the_tasks_config(tmp_path):
    features = dict(image=ImageFeature(), latex_formula=Value("string"))
    for config, formula in (("cleaned_formulas", "x^2"), ("raw_formulas", "raw")):
        Dataset.from_dict(dict(image=[png_bytes()], latex_formula=[formula]), features=Features(features)).to_parquet(
            str(tmp_path / config / "train-00000-of-00001.parquet"))
    (tmp_path / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n" for c in ("cleaned_formulas", "raw_formulas")) + "---\n")
    assert LatexFormulas(source=str(tmp_path))[0]["response"] == "x^2"


@pytest.mark.parametrize("problem", ["missing", "empty", "wrong config"])
def test_a_bad_local_copy_is_named_without_the_hub_hint(tmp_path, problem):
    src = tmp_path / "copy"
    if problem != "missing":
        os.makedirs(src)
    if problem == "wrong config":
        os.makedirs(src / "other_formulas")
        Dataset.from_dict(dict(latex_formula=["x"])).to_parquet(str(src / "other_formulas" / "train-0.parquet"))
        (src / "README.md").write_text("---\nconfigs:\n- config_name: other_formulas\n  data_files: other_formulas/*\n"
                                       "- config_name: more\n  data_files: other_formulas/*\n---\n")
    with pytest.raises(UserError) as e:
        LatexFormulas(source=str(src))
    message = str(e.value)
    assert str(src) in message and "not in the local cache" not in message
    assert {"missing": "not a directory", "empty": "is empty", "wrong config": "'cleaned_formulas'"}[problem] in message


def test_olmocr_turns_pages_upright(tmp_path):
    page = Image.new("RGB", (300, 400), (255, 255, 255))
    page.paste((0, 0, 0), (0, 0, 300, 60))  # a dark band along the top edge of the upright page
    pdf = io.BytesIO()
    page.transpose(Image.Transpose.ROTATE_270).save(pdf, format="PDF")  # scanned a quarter turn clockwise
    os.makedirs(tmp_path / "pdf_tarballs")
    with tarfile.open(tmp_path / "pdf_tarballs" / "00_documents_train_00000.tar.gz", "w:gz") as tf:
        add_file(tf, "./doc.pdf", pdf.getvalue())
    Dataset.from_dict(dict(id=["doc"], natural_text=["Top band."], is_rotation_valid=[False], rotation_correction=[90],
                           pdf_relpath=["pdf_tarballs/00_documents_train_00000.tar.gz:doc.pdf"])).to_parquet(
        str(tmp_path / "00_documents_train.parquet"))
    task = OlmOCR(source=str(tmp_path))
    image = np.asarray(Image.open(task[0]["image_path"]).convert("L"))
    assert image.shape[0] > image.shape[1] and image[:image.shape[0] // 10].mean() < 60  # portrait, band on top
    assert task.tally["pages turned upright"] == 1


# ---- synthetic pages ----

def test_synthetic_is_deterministic_per_seed():
    a, b, c = (make_sample(seed, 5) for seed in (0, 0, 1))
    assert a[1:] == b[1:] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert a[1:] != c[1:]
    assert make_sample(0, 3, kinds=("formula",))[1:] == (FORMULA_TO_LATEX, r"\alpha^{3}")  # a fixed (seed, index) never drifts


@pytest.mark.parametrize("kind", list(READING_KINDS))
def test_reading_pages_are_seeded_and_their_lines_fit(kind):
    """Every kind of reading page: the same rng gives the same page; random letter strings and numbers, three lines,
    each on the page whole (no ink on its last two rows or columns; grid pages set their widest glyphs flush with the
    right edge, by design)."""
    for i in range(40):
        image, text = READING_KINDS[kind](random.Random(f"fit-{i}"))
        again, text_again = READING_KINDS[kind](random.Random(f"fit-{i}"))
        assert text == text_again and np.array_equal(np.asarray(image), np.asarray(again))
        lines = text.split("\n")
        assert len(lines) == 3 and all(lines) and re.fullmatch(r"[a-z0-9 \n]+", text)
        ink = np.asarray(image.convert("L")) < 128
        assert ink.any() and not ink[-2:].any() and (kind == "grid" or not ink[:, -2:].any()), (kind, i, text)


def test_bridge_pages_run_from_the_grid_layout_to_ordinary_type():
    """Difficulty 0 is the grid's layout exactly (monospace 100 px, a character per 64 px cell, a line every 128 px
    from 64); difficulty 1 is type: proportional fonts, about 15 characters a line."""
    image, text = render_bridge(random.Random(3), difficulty=0.0)
    grid = Image.new("RGB", image.size, (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(text.split("\n")):
        for k, ch in enumerate(line):
            draw.text((64 * k + 4, 64 + 128 * i), ch, font=font(100, "mono"), fill=(0, 0, 0))
    assert np.array_equal(np.asarray(image), np.asarray(grid))
    lengths = [len(line) for i in range(20) for line in render_bridge(random.Random(i), difficulty=1.0)[1].split("\n")]
    assert max(len(line) for line in text.split("\n")) <= 8 and 12 <= sum(lengths) / len(lengths) <= 17


def bars_from_image(image):
    """Heights of the filled bars of a synthetic bar chart (columns of one non-grey colour)."""
    a = np.asarray(image.convert("RGB")).astype(int)
    colourful = (a.max(-1) - a.min(-1)) > 60
    columns = colourful.sum(0)
    runs, start = [], None
    for x, filled in enumerate(columns > 5):
        if filled and start is None:
            start = x
        elif not filled and start is not None:
            if x - start >= 15:  # bars are wide; the dots of a line chart are not
                runs.append(columns[start:x].max())
            start = None
    return runs


def test_synthetic_charts_draw_their_data():
    found = 0
    for i in range(40):
        image, prompt, response = make_sample(11, i, kinds=("chart",))
        values = [int(v) for v in response.split("</td><td>")[1::1] for v in [v.split("<")[0]] if v.isdigit()]
        heights = bars_from_image(image)
        if prompt != PARSE_FIGURE or len(heights) != len(values):
            continue  # line charts
        found += 1
        scale = max(heights) / max(values)
        assert np.allclose(heights, np.array(values) * scale, atol=3), (values, heights)  # bar heights proportional to values
    assert found >= 5


def test_synthetic_pages_have_ink_and_sizes(tmp_path):
    task = SyntheticPages(12, seed=4, sizes=(600, 700))
    for i in range(len(task)):
        sample = task[i]
        image = Image.open(sample["image_path"])
        assert 600 <= image.width <= 700
        assert (np.asarray(image.convert("L")) < 100).mean() > 0.002  # text was drawn
        assert sample["response"].strip() and sample["text"].startswith("<image>\n")


def test_synthetic_tables_draw_their_rows_and_cells():
    for i in range(5):
        page = render_table(random.Random(i), 640, 800)  # before the skew and noise make_sample may add
        html = page.blocks[0][1]
        dark_rows = (np.asarray(page.image.convert("L")) < 60).mean(1) > 0.3  # horizontal grid lines
        assert np.sum(dark_rows[1:] & ~dark_rows[:-1]) + dark_rows[0] == html.count("<tr>") + 1
        columns = html.split("</tr>")[0].count("<td>")
        dark_cols = (np.asarray(page.image.convert("L")) < 60).mean(0) > 0.1  # vertical grid lines
        assert np.sum(dark_cols[1:] & ~dark_cols[:-1]) + dark_cols[0] == columns + 1


# ---- mixtures ----

class ListTask(Task):
    def __init__(self, items, **kwargs):
        super().__init__(**kwargs)
        self.items = items

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        return self.items[index]


def test_mixture_weights_and_determinism():
    tasks = [ListTask([("a", i) for i in range(10)]), ListTask([("b", i) for i in range(3)]), ListTask([("c", i) for i in range(50)])]
    mix = VisionTaskMixture(tasks, [2, 1, 1], num_samples=20000, seed=3)
    names = [mix[i][0] for i in range(len(mix))]
    for name, share in (("a", 0.5), ("b", 0.25), ("c", 0.25)):
        assert abs(names.count(name) / len(names) - share) < 0.02
    assert sorted({mix[i] for i in range(len(mix)) if mix[i][0] == "b"}) == [("b", 0), ("b", 1), ("b", 2)]
    again = VisionTaskMixture(tasks, [2, 1, 1], num_samples=20000, seed=3)
    other = VisionTaskMixture(tasks, [2, 1, 1], num_samples=20000, seed=4)
    assert [again[i] for i in range(100)] == [mix[i] for i in range(100)] != [other[i] for i in range(100)]
    shards = [mix.shard(r, 2) for r in range(2)]
    assert len(shards[0]) + len(shards[1]) == len(mix) and shards[1][0] == mix[1]


# ---- the loader ----

@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Small distinct images with short responses: the loader's logic without the cost of big pages."""
    root = tmp_path_factory.mktemp("pages")
    items = []
    for i in range(24):
        path = root / f"{i}.png"
        Image.new("RGB", (90 + i, 70), (10 * i, 100, 200 - 5 * i)).save(path)
        items.append(dict(text="<image>\nFree OCR.", response=f"page number {i}", image_path=str(path)))
    return items


def responses(batch, tokenizer):
    """Which samples a packed batch holds, in order, read back from each sample's targets."""
    out = []
    for targets, docs in zip(batch["targets"], batch["doc_ids"]):
        for doc in dict.fromkeys(d for d in docs.tolist() if d >= 0):
            text = tokenizer.decode([t for t in targets[docs == doc].tolist() if t != -1])
            out.append(text.removesuffix("<|assistant_end|>"))
    return out


def test_ranks_get_disjoint_shards_covering_the_data(pages, tokenizer):
    task = ListTask(pages)
    seen = []
    for rank in range(2):
        it = iter(VisionDataLoader(task, tokenizer, "tiny", batch_size=3, seq_len=256, rank=rank, world_size=2, seed=5))
        got = []
        while len(got) < len(pages) // 2:  # one epoch of this rank's shard
            got += responses(next(it), tokenizer)
        seen.append(got[:len(pages) // 2])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(p["response"] for p in pages)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_same_following_batches(pages, tokenizer, num_workers):
    task = ListTask(pages)
    make = lambda: VisionDataLoader(task, tokenizer, ("tiny", "small"), batch_size=2, seq_len=256, seed=1,
                                    num_workers=num_workers)
    straight = iter(make())
    reference = [responses(next(straight), tokenizer) for _ in range(9)]  # crosses into the second epoch
    assert sum(map(len, reference)) > len(pages)
    first = make()
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [responses(next(it), tokenizer) for _ in range(4)] == reference[5:]


def test_packed_rows(pages, tokenizer):
    batch = next(iter(VisionDataLoader(ListTask(pages[:6]), tokenizer, ("tiny", "small"), batch_size=3, seq_len=256,
                                       shuffle=False)))
    ids, targets, docs, positions = batch["input_ids"], batch["targets"], batch["doc_ids"], batch["positions"]
    # each sample's targets are exactly its response and stop token: neither the prompt nor the slots are learned
    assert ids.shape == (3, 256) and responses(batch, tokenizer) == [f"page number {i}" for i in range(6)]
    slots = ids == tokenizer.image_token_id
    assert [int(slots[docs == d].sum()) for d in range(6)] == [73, 111] * 3  # whole samples, a fixed mode each
    assert batch["doc_lengths"] == [int((docs == d).sum()) for d in range(6)]
    for d in range(6):  # positions restart in each sample
        assert positions[docs == d].tolist() == list(range(batch["doc_lengths"][d]))
    assert (targets[docs == -1] == -1).all() and (positions[docs == -1] == 0).all()  # padding is nobody's
    assert (targets[:, :-1][slots[:, 1:]] == -1).all() and (targets != tokenizer.image_token_id).all()
    assert [im.global_view.dtype for im in batch["images"]] == [torch.uint8] * 6  # normalised in the encoder


def test_bad_samples_are_skipped_counted_and_named(pages, tokenizer, tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    truncated = png_bytes((200, 200))
    (tmp_path / "truncated.png").write_bytes(truncated[:len(truncated) // 2])
    bad = [dict(text="<image>\nFree OCR.", response="x", image_path=str(tmp_path / "missing.png")),
           dict(text="<image>\nFree OCR.", response="x", image_path=str(tmp_path / "corrupt.png")),
           dict(text="<image>\nFree OCR.", response="x", image_path=str(tmp_path / "truncated.png")),
           dict(text="<image>\nFree OCR.", response="   ", image_path=pages[0]["image_path"]),
           dict(text="<image>\n<image>\nTwo.", response="x", image_path=pages[0]["image_path"]),  # 2 markers, 1 image
           dict(text="<image>\nFree OCR.", response="x", image_path=pages[1]["image_path"], mode="ignored")]
    task = ListTask(pages[:6] + bad)
    loader = VisionDataLoader(task, tokenizer, "small", batch_size=2, seq_len=100, shuffle=False)  # 111 slots never fit 100
    with pytest.raises(RuntimeError, match="no usable sample in a whole epoch"):
        next(iter(loader))
    assert loader.skipped["image does not fit seq_len"] >= 7 and loader.skipped["malformed sample"] >= 1
    ok = VisionDataLoader(ListTask(pages[:6] + bad), tokenizer, "tiny", batch_size=4, seq_len=200, shuffle=False)
    batch = next(iter(ok))  # 8 samples' room: the epoch's 7 good ones, then the second epoch begins
    assert responses(batch, tokenizer)[:7] == [f"page number {i}" for i in range(6)] + ["x"]
    assert dict(ok.skipped) == {"missing image": 1, "unreadable image": 2, "empty response": 1, "malformed sample": 1}
    assert any("missing.png" in d for d in batch["skip_details"]) and any("truncated.png" in d for d in batch["skip_details"])
