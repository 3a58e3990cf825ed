"""Metrics, the 9 test images, vision_sample, and the Fox / OmniDocBench / compression runners on local fixtures."""
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from checkpoint import save_checkpoint
from common import line_plot
from engine import Engine
from grounding import strip_grounding
from metrics import edit_distance, normalized_edit_distance, fox_scores, exact_match
from scripts import eval_compression, eval_fox, eval_omnidocbench, eval_reading, vision_sample
from scripts.make_test_images import test_images as render_test_images
from tasks.synthetic import SyntheticPages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_IMAGES = os.path.join(ROOT, "data", "test_images")


def test_edit_distance_by_hand():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert edit_distance("flaw", "lawn") == 2
    assert normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert normalized_edit_distance("", "") == 0.0
    assert exact_match(" a b\n", "a b") and not exact_match("a b", "a c")


def test_fox_scores_follow_the_official_argument_order():
    # Fox passes the ground truth as `pred` and the output as `gt`: its precision is the share of the
    # ground truth's distinct words that the output contains, its recall the share of the output's words that are right
    scores = fox_scores(prediction="the cat sat on a mat", truth="the cat sat")
    assert scores["precision"] == 1.0
    assert scores["recall"] == pytest.approx(3 / 6)
    assert scores["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert scores["edit_dist"] == pytest.approx(edit_distance("the cat sat", "the cat sat on a mat") / 20)
    short = fox_scores(prediction="the cat", truth="the cat sat the")  # distinct words: {the, cat, sat}
    assert short["precision"] == pytest.approx(2 / 3) and short["recall"] == 1.0
    assert fox_scores("", "words here") == dict(precision=0.0, recall=0.0, f1=0.0, edit_dist=1.0)


def test_strip_grounding():
    assert strip_grounding("<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n# Hi\n\nText") == "# Hi\n\nText"


def test_expected_texts_are_what_the_images_show():
    with open(os.path.join(TEST_IMAGES, "expected.json")) as f:
        expected = json.load(f)
    made = render_test_images()
    assert len(made) == 9 and len({dataset for _, dataset, *_ in made}) == 9
    assert sorted(expected) == sorted(name for name, *_ in made)
    for name, dataset, prompt, text, image in made:
        assert expected[name] == dict(dataset=dataset, prompt=prompt, expected=text, source="rendered by scripts/make_test_images.py")
        committed = np.asarray(Image.open(os.path.join(TEST_IMAGES, name)).convert("RGB"), dtype=np.float32)
        assert committed.shape == np.asarray(image).shape
        assert np.abs(committed - np.asarray(image, dtype=np.float32)).mean() < 2.0, f"{name} is not what the script draws"
    by_name = {name: text for name, _, _, text, _ in made}
    assert by_name["chartqa.png"] == "Plums" and by_name["figureqa.png"] == "Yes"  # answers computed from the drawn data


def test_vision_sample_runs_on_a_random_model(make_model, tokenizer, tmp_path, capsys):
    checkpoint = save_checkpoint(str(tmp_path / "run"), 0, make_model(), tokenizer, {})
    rows, _ = vision_sample.main(["--checkpoint", str(tmp_path / "run"), "--mode", "tiny", "--max_tokens", "6", "--html", str(tmp_path / "out.html")])
    out = capsys.readouterr().out
    assert len(rows) == 9 and "[9/9] mathwriting" in out and "summary: " in out
    assert out.count("EXPECTED: ") == 9 and out.count("GENERATED: ") == 9 and checkpoint in out
    html = (tmp_path / "out.html").read_text()
    assert html.count("<img src=\"data:image/png;base64,") == 9
    assert html.index("<b>summary: ") < html.index("<img")  # the summary line comes first


def test_the_html_diff_is_word_by_word():
    assert vision_sample.diff_html("the cat sat\non it", "the dog sat\non it") == "the <del>cat</del><ins>dog</ins> sat\non it"


def test_vision_sample_reproduces_what_the_overfit_model_learned(overfit_run, tmp_path, capsys):
    cfg, summary = overfit_run
    pages = SyntheticPages(cfg.num_synthetic, cfg.seed, cfg.synthetic_kinds.split(","), (cfg.synthetic_min_size, cfg.synthetic_max_size))
    expected = {}
    for i in range(len(pages)):
        sample = pages[i]
        shutil.copy(sample["image_path"], tmp_path / f"{i}.png")
        expected[f"{i}.png"] = dict(dataset="synthetic", prompt=sample["text"].split("\n", 1)[1], expected=sample["response"])
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    rows, _ = vision_sample.main(["--checkpoint", summary["checkpoint"], "--images", str(tmp_path), "--mode", "tiny",
                               "--max_tokens", "64", "--html", str(tmp_path / "page.html")])
    assert all(r["exact"] for r in rows) and f"the test images: {len(rows)}/{len(rows)} exact" in capsys.readouterr().out


def test_a_demo_checkpoint_also_reads_fresh_pages_of_its_own_kinds():
    pages = vision_sample.fresh_pages(["reading pages (grid, type)", "reading pages (grid) + 10% text"])
    assert list(pages) == [f"fresh {k} page {i}" for k in ("grid", "type") for i in (1, 2, 3)]
    image, spec = pages["fresh type page 2"]
    assert spec["prompt"] == "Free OCR." and spec["expected"].count("\n") == 2 and image.size == (512, 512)
    assert vision_sample.fresh_pages(["synthetic pages (formula)", "the nine datasets"]) == {}


def test_vision_sample_reports_missing_inputs(tmp_path):
    with pytest.raises(SystemExit, match="make_test_images"):
        vision_sample.main(["--images", str(tmp_path)])
    (tmp_path / "expected.json").write_text(json.dumps({"gone.png": dict(dataset="x", prompt="p", expected="e")}))
    with pytest.raises(SystemExit, match="gone.png"):
        vision_sample.main(["--images", str(tmp_path)])


def fox_fixture(path):
    """focus_benchmark_test.zip as the hub serves it: en_page_ocr.json + en_pdf_png/."""
    pages = [("en_1.png", "First page of text"), ("en_2.png", "Second page with more words")]
    with zipfile.ZipFile(path, "w") as z:
        entries = []
        for name, text in pages:
            img = path.parent / name
            Image.new("RGB", (600, 800), (255, 255, 255)).save(img)
            z.write(img, f"focus_benchmark_test/en_pdf_png/{name}")
            entries.append(dict(image=name, len=len(text), conversations=[dict(value="<image>\nOCR:", **{"from": "human"}),
                                                                         dict(value=text, **{"from": "gpt"})]))
        z.writestr("focus_benchmark_test/en_page_ocr.json", json.dumps(entries))
    return pages


def test_fox_runner_on_a_fixture(make_model, tokenizer, tmp_path):
    pages = fox_fixture(tmp_path / "focus_benchmark_test.zip")
    loaded = eval_fox.load_pages(str(tmp_path / "focus_benchmark_test.zip"))
    assert [(n, t) for n, _, t in loaded] == pages
    results, unreadable = eval_fox.evaluate(Engine(make_model().eval(), tokenizer), loaded, ["tiny", "small"], 5, str(tmp_path / "out"))
    assert unreadable == []
    for mode, vision in (("tiny", 73), ("small", 111)):
        saved = json.load(open(tmp_path / "out" / f"fox_en_page_{mode}.json"))
        assert [r["label"] for r in saved] == [t for _, t in pages]
        for r in saved:
            assert r["precision"] == fox_scores(r["answer"], r["label"])["precision"] and r["vision_tokens"] == vision
    lines = eval_fox.table(results)
    assert lines[0].startswith("| text tokens") and "| all | 2 |" in lines[-1]


def test_fox_goes_on_past_an_unreadable_page(make_model, tokenizer, tmp_path, capsys):
    pages = fox_fixture(tmp_path / "focus_benchmark_test.zip")
    folder = tmp_path / "fox" / "focus_benchmark_test"
    with zipfile.ZipFile(tmp_path / "focus_benchmark_test.zip") as z:
        z.extractall(tmp_path / "fox")
    first = folder / "en_pdf_png" / pages[0][0]
    first.write_bytes(first.read_bytes()[:300])  # a truncated PNG
    results, unreadable = eval_fox.evaluate(Engine(make_model().eval(), tokenizer), eval_fox.load_pages(str(tmp_path / "fox")),
                                            ["tiny"], 5, str(tmp_path / "out"))
    assert [r["image"] for r in results["tiny"]] == [pages[1][0]]  # the other page was read, and saved
    assert unreadable == [pages[0][0]]  # and the one that was not is named: the command exits 1
    assert [r["image"] for r in json.load(open(tmp_path / "out" / "fox_en_page_tiny.json"))] == [pages[1][0]]
    err = capsys.readouterr().err
    assert f"{first}: cannot read image" in err and "EXIF" not in err


def test_omnidocbench_runner_on_a_fixture(make_model, tokenizer, tmp_path):
    os.makedirs(tmp_path / "images")
    Image.new("RGB", (500, 700), (255, 255, 255)).save(tmp_path / "images" / "doc_a.jpg")
    gt = [dict(layout_dets=[dict(category_type="title", order=0, text="Hello"), dict(category_type="text_block", order=1, text="World  wide"),
                            dict(category_type="abandon", order=2, text="page 3"),
                            dict(category_type="table", order=3, latex="\\begin{tabular}{l} 1 \\& 2 \\end{tabular}",  # both, as the real file
                                 html="<table>\n<tr>\n <td>1 &amp; 2</td>\n</tr>\n</table>")],
               page_info=dict(image_path="doc_a.jpg", page_no=0, height=700, width=500, page_attribute=dict(language="english")))]
    (tmp_path / "OmniDocBench.json").write_text(json.dumps(gt))
    gt_path, pages = eval_omnidocbench.load_pages(str(tmp_path))
    assert eval_omnidocbench.page_text(pages[0][0]) == "Hello World wide 1 & 2"  # a table's cells, not its LaTeX
    outputs, unreadable = eval_omnidocbench.predict(Engine(make_model().eval(), tokenizer), pages, "tiny", 5, str(tmp_path / "md"))
    assert unreadable == []
    assert os.listdir(tmp_path / "md") == ["doc_a.md"]
    assert (tmp_path / "md" / "doc_a.md").read_text() == outputs[0][1]
    scores = eval_omnidocbench.quick_scores([(gt[0], "# Hello\n\nWorld wide\n\n<table><tr><td>1 &amp; 2</td></tr></table>")])
    assert scores == dict(english=0.0, all=0.0)
    assert eval_omnidocbench.quick_scores([(gt[0], "Hello")])["all"] == pytest.approx(normalized_edit_distance("Hello", "Hello World wide 1 & 2"))


def test_compression_study_runs(make_model, tokenizer, tmp_path):
    pages = SyntheticPages(3, seed=9, kinds=("document",), sizes=(700, 800), doc_styles=("free",))
    rows = eval_compression.run(Engine(make_model().eval(), tokenizer), pages, ["tiny", "small"], 4)
    assert len(rows) == 6 and {r["vision_features"] for r in rows} == {64, 100}
    curves = eval_compression.binned(rows, ["tiny", "small"], 1000)
    assert curves["tiny"][0][3] == 3 and curves["small"][0][1] < curves["tiny"][0][1]  # more vision tokens, less compression
    path = line_plot({m: [(c, 100 * p) for _, c, p, _ in curves[m]] for m in curves}, str(tmp_path / "plot.png"), "x", "y")
    drawn = np.asarray(Image.open(path).convert("RGB"))
    assert drawn.shape == (600, 900, 3) and ((drawn == (200, 40, 40)).all(-1)).sum() > 50  # the first line is drawn


def test_the_reading_check_scores_fresh_pages_read_by_the_ocr_command(overfit_run, tmp_path, monkeypatch, capsys):
    """Pages of each kind rendered afresh and read through scripts.ocr: a model that read them all right would
    score 0, and the real model's reading is scored and reported per kind."""
    _, summary = overfit_run
    results = eval_reading.main(["--checkpoint", summary["checkpoint"], "--pages", "2", "--max_tokens", "24"])
    assert set(results) == {"grid", "type"} and all(0 < cer <= 1 for cer in results.values())  # it reads formulas
    assert "- held-out CER on type pages, read by scripts.ocr with its defaults: " in capsys.readouterr().out
    truth = {os.path.basename(stem): text for kind in ("grid", "type")
             for stem, text in eval_reading.render_pages(str(tmp_path), kind, 2, 7).items()}
    monkeypatch.setattr(eval_reading.ocr, "main", lambda argv: ([(os.path.splitext(p)[0], truth[os.path.basename(
        os.path.splitext(p)[0])]) for p in argv if p.endswith(".png")], []))
    assert eval_reading.main(["--pages", "2", "--seed", "7", "--keep", str(tmp_path / "kept")]) == {"grid": 0.0, "type": 0.0}
    assert sorted(os.listdir(tmp_path / "kept")) == [f"{k}_00{i}.{e}" for k in ("grid", "type") for i in (0, 1)
                                                     for e in ("png", "txt")]  # pages to try, with their texts
    assert (tmp_path / "kept" / "type_001.txt").read_text() == truth["type_001"]


def test_plots_have_round_ticks_and_an_all_zero_series_its_own_axis(tmp_path):
    from common import nice_ticks
    assert nice_ticks(189) == [0, 50, 100, 150, 200] and nice_ticks(0.021) == pytest.approx([0, 0.005, 0.01, 0.015, 0.02,
                                                                                           0.025])
    assert nice_ticks(1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])  # what an all-zero series is drawn on
    path = line_plot({"zeros": [(1, 0.0), (2, 0.0)]}, str(tmp_path / "zero.png"), "x", "y", title="all zero")
    drawn = np.asarray(Image.open(path).convert("RGB"))
    assert ((drawn == (200, 40, 40)).all(-1)).sum() > 50  # the line, drawn on the x axis of a 0-to-1 plot
