"""The nine dataset transformations on fixtures in each dataset's real layout, the synthetic task, mixtures, the loader."""
import io
import json
import os
import random
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value
from PIL import Image

from config import DOC_TO_MARKDOWN, FORMULA_TO_LATEX, MARKDOWN_NO_GROUNDING, PARSE_FIGURE
from dataloader import VisionDataLoader
from tasks.chartqa import ChartQA
from tasks.common import Task, VisionTaskMixture
from tasks.docbank import DocBank
from tasks.figureqa import FigureQA
from tasks.latex_formulas import LatexFormulas
from tasks.llava_cc3m import LlavaCC3M
from tasks.mathwriting import MathWriting
from tasks.olmocr import OlmOCR
from tasks.plotqa import PlotQA
from tasks.pubtables import PubTables
from tasks.smoltalk import SmolTalk
from tasks.synthetic import SyntheticPages, make_sample, render_table


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


# ---- synthetic pages ----

def test_synthetic_is_deterministic_per_seed():
    a, b, c = (make_sample(seed, 5) for seed in (0, 0, 1))
    assert a[1:] == b[1:] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert a[1:] != c[1:]
    assert make_sample(0, 3, kinds=("formula",))[1:] == (FORMULA_TO_LATEX, r"\alpha^{3}")  # a fixed (seed, index) never drifts


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
    assert [im["pixel_values"].dtype for im in batch["images"]] == [torch.uint8] * 6  # normalised on the device


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
