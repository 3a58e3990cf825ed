"""What a newcomer meets at the command line: readers that default to the checkpoint's mode, pages in the order given,
ordinary mistakes as one line, damaged files named and passed over, warnings on stderr, honest reports."""
import argparse
import importlib
import os
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

import image_process
from checkpoint import list_checkpoints, save_checkpoint
from common import run_command
from config import MAX_IMAGE_PIXELS
from engine import Engine
from image_process import ImageError, load_image
from scripts import eval_fox, tok_train, vision_sample
from scripts.ocr import main as ocr_main
from tasks.synthetic import SyntheticPages
from train import train, write_report
from conftest import tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def training_pages(cfg):
    pages = SyntheticPages(cfg.num_synthetic, cfg.seed, cfg.synthetic_kinds.split(","), (cfg.synthetic_min_size, cfg.synthetic_max_size))
    return [pages[i] for i in range(len(pages))]


def test_readers_default_to_the_mode_the_checkpoint_trained_in(overfit_run, tmp_path, capsys):
    cfg, summary = overfit_run  # trained in tiny mode only
    page = training_pages(cfg)[0]
    prompt = page["text"].split("\n", 1)[1]
    results, _ = ocr_main([page["image_path"], "--checkpoint", summary["checkpoint"], "--max_tokens", "64", "--prompt", prompt])
    err = capsys.readouterr().err
    assert "reading in tiny mode" in err and "trained on synthetic pages (formula) in tiny mode" in err
    assert results[0][1] == page["response"]  # read as the checkpoint learned to read
    ocr_main([page["image_path"], "--checkpoint", summary["checkpoint"], "--max_tokens", "4", "--mode", "base"])
    assert "never trained in base mode" in capsys.readouterr().err


def test_ocr_prints_pages_in_the_order_given(overfit_run, tmp_path):
    cfg, summary = overfit_run
    pages = sorted(training_pages(cfg), key=lambda s: len(s["response"]))
    long, short = pages[-1], pages[0]  # read together, the short one finishes first
    engine = Engine(*_model_and_tokenizer(summary["checkpoint"]))
    finished = [key for key, _ in engine.read_iter([(k, load_image(s["image_path"]), s["text"].split("\n", 1)[1])
                                                    for k, s in (("long", long), ("short", short))], "tiny", 64)]
    assert finished == ["short", "long"]
    out = subprocess.run([sys.executable, "-m", "scripts.ocr", long["image_path"], short["image_path"], "--checkpoint",
                          summary["checkpoint"], "--max_tokens", "64", "--prompt", long["text"].split("\n", 1)[1]],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    names = [line[6:] for line in out.stdout.splitlines() if line.startswith("===== ")]
    assert names == [os.path.splitext(long["image_path"])[0], os.path.splitext(short["image_path"])[0]]


def _model_and_tokenizer(checkpoint):
    from nano_deepseek_ocr import load_model
    model, tokenizer, _ = load_model(checkpoint)
    return model.eval(), tokenizer


def test_a_multi_page_tiff_is_read_page_by_page(overfit_run, tmp_path):
    _, summary = overfit_run
    frames = [Image.new("RGB", (300, 200), (255, 255, 255 - 60 * i)) for i in range(3)]
    frames[0].save(tmp_path / "scan.tif", save_all=True, append_images=frames[1:])
    results, failures = ocr_main([str(tmp_path / "scan.tif"), "--checkpoint", summary["checkpoint"], "--max_tokens", "4",
                                  "--out", str(tmp_path / "md")])
    assert failures == 0 and sorted(os.listdir(tmp_path / "md")) == [f"scan_page00{i}.md" for i in (1, 2, 3)]
    assert load_image(str(tmp_path / "scan.tif"), frame=2).getpixel((0, 0)) == (255, 255, 135)


def test_the_pixel_limit_in_force_is_the_configs(tmp_path, monkeypatch):
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # Pillow's own check uses it too, not its 89.5M default
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(image_process, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (30, 30)).save(tmp_path / "fine.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    assert load_image(str(tmp_path / "fine.png")).size == (30, 30)
    with pytest.raises(ImageError, match="big.png"):
        load_image(str(tmp_path / "big.png"))


def one_line_error(capsys, main, *args):
    with pytest.raises(SystemExit) as e:
        run_command(main, *args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_ordinary_mistakes_are_one_line_before_any_slow_work(tokenizer_dir, tmp_path, capsys):
    assert "no such file or folder" in one_line_error(capsys, eval_fox.main, ["--data", str(tmp_path / "nothing.zip")])
    assert "no tokenizer at" in one_line_error(capsys, train, tiny_train_config(str(tmp_path), model_tag="x"))
    assert "--resume: no checkpoint" in one_line_error(capsys, train, tiny_train_config(tokenizer_dir, model_tag="never", resume=True))
    assert "--collapse_images" in one_line_error(capsys, train, tiny_train_config(tokenizer_dir, collapse_images=1))
    assert "'fonts' is not one of grid, type, bridge" in one_line_error(
        capsys, train, tiny_train_config(tokenizer_dir, data="reading", reading="grid,fonts"))
    if not __import__("torch").cuda.is_available():
        assert "this torch has no CUDA" in one_line_error(capsys, train, tiny_train_config(tokenizer_dir, device_type="cuda"))
    with pytest.raises(SystemExit) as e:  # argparse, as for every option: at once, not after the model and pages load
        eval_fox.main(["--modes", "tiny,foo", "--data", str(tmp_path)])
    assert e.value.code == 2 and "unknown modes ['foo']" in capsys.readouterr().err
    summary = train(tiny_train_config(tokenizer_dir, model_tag="nowatch", collapse_images=0, num_iterations=2, eval_every=2))
    assert summary["steps"] and all(h["encoder_similarity"] != h["encoder_similarity"] for h in summary["history"])  # NaN


def test_a_damaged_collapse_watch_page_is_rendered_again(tokenizer_dir, capsys):
    page = SyntheticPages(8, seed=12345, sizes=(768, 1024))[3]["image_path"]
    data = open(page, "rb").read()
    open(page, "wb").write(data[:len(data) // 3])
    summary = train(tiny_train_config(tokenizer_dir, model_tag="watch", num_iterations=1, eval_every=1))
    assert f"{page}: cannot read image" in capsys.readouterr().err and len(summary["history"]) == 2
    assert load_image(page).size[0] >= 768


def test_vision_sample_passes_over_an_unreadable_test_image(overfit_run, tmp_path):
    _, summary = overfit_run
    images = tmp_path / "images"
    shutil.copytree(vision_sample.DEFAULT_IMAGES, images)
    name = sorted(n for n in os.listdir(images) if n.endswith(".png"))[0]
    (images / name).write_bytes((images / name).read_bytes()[:200])
    rows, unreadable = vision_sample.main(["--checkpoint", summary["checkpoint"], "--images", str(images), "--max_tokens", "4",
                                           "--html", str(tmp_path / "out.html")])
    assert unreadable == [name] and len(rows) == 8 and name not in [r["name"] for r in rows]
    page = (tmp_path / "out.html").read_text()
    assert f"not readable, left out: {name}" in page and "trained on synthetic pages (formula) in tiny mode" in page


def test_a_stage_that_makes_the_held_out_cer_worse_says_so(tokenizer_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("NANO_DEEPSEEK_OCR_DIR", str(tmp_path))
    cfg = tiny_train_config(tokenizer_dir, stage="stage2", init_from="somewhere")
    evals = [dict(step=0, val_loss=1.0, gap_blank=0.5, gap_other=0.4, encoder_similarity=0.5, heldout_cer=0.009,
                  training_cer=0.008, cer_pages=50),
             dict(step=100, val_loss=1.0, gap_blank=0.5, gap_other=0.4, encoder_similarity=0.5, heldout_cer=0.016,
                  training_cer=0.010, cer_pages=50)]
    record = dict(trained_on=["synthetic pages (formula)"], trained_modes=["tiny"])

    def report():
        return open(write_report(cfg, "started from somewhere", record, (10, 5), 0, [1.0],
                                 [dict(dt=1.0, tokens=10, images=1, mfu=None)], evals, [], [], 1.0)).read()
    assert "this stage made the held-out CER worse**: 0.009 before its first step, 0.016 after it" in report()
    assert "trained on (with what it started from): synthetic pages (formula), in tiny mode" in report()
    assert "- what it can read: pages like those, in that mode;" in report()
    options = next(line for line in report().splitlines() if line.startswith("- options set"))
    assert "stage=stage2" in options and "seed=" not in options and "vocab_size" not in options  # set ones only
    assert report().count("## Training stage2") == 1  # written again in its place, not once more
    evals[0]["heldout_cer"] = 0.02
    assert "worse" not in report().split("## ")[-1]


def test_tok_train_logs_plain_lines_and_says_when_the_vocabulary_falls_short(tmp_path, capsys):
    tok_train.main(["--vocab_size=2048", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "\r" not in err and "read 1.0M characters\n" in err  # stderr is not a terminal here
    assert "not the 2048 asked for" in out and "warning" not in out + err  # said once, calmly: what the text gives
    assert "at least 271" in one_line_error(capsys, tok_train.main, ["--vocab_size=100", "--out", str(tmp_path)])


SCRIPTS = ["ocr", "vision_sample", "eval_fox", "eval_omnidocbench", "eval_compression", "prepare_data", "tok_train",
           "make_test_images", "bench_dataloader", "bench_encoder", "bench_generate", "gpu_check"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_of_every_command_says_what_it_does(script, monkeypatch):
    class Caught(Exception):
        pass

    def capture(parser, *args, **kwargs):
        raise Caught(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(f"scripts.{script}")
    with pytest.raises(Caught) as e:
        module.main([]) if "argv" in module.main.__code__.co_varnames else module.main()
    parser = e.value.args[0]
    undocumented = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not undocumented


def test_checkpoint_files_share_their_permissions(tmp_path, make_model, tokenizer):
    ckpt = save_checkpoint(str(tmp_path), 1, make_model(), tokenizer, {})
    modes = {name: os.stat(os.path.join(ckpt, name)).st_mode & 0o777 for name in os.listdir(ckpt)}
    assert len(set(modes.values())) == 1, modes


def test_a_test_session_leaves_no_base_directory_behind(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NANO_DEEPSEEK_OCR_DIR"}
    env.update(TMPDIR=str(tmp_path), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                          "tests/test_eval.py::test_edit_distance_by_hand"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:]
    assert not [n for n in os.listdir(tmp_path) if n.startswith("ndo-tests-")]


def test_full_scale_without_gpus_stops_at_once(tmp_path):
    bare = tmp_path / "bin"  # a PATH with no nvidia-smi
    bare.mkdir()
    for tool in ("bash", "grep", "dirname", "nproc", "date", "cat"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bare / tool)
    out = subprocess.run(["bash", "speedrun.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(PATH=str(bare), HOME=str(tmp_path), SCALE="full"))
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "SCALE=full trains on 1 to 8 NVIDIA GPUs per node, and nvidia-smi finds none here: run SCALE=demo"]


def test_every_enumerated_training_option_refuses_a_typo_in_one_line():
    """Each option with a fixed set of values declares them beside its field; the parser refuses anything else, naming
    the allowed values, before anything slow (exit status 1: SystemExit with a message)."""
    from dataclasses import fields
    from common import parse_overrides
    from train import TrainConfig
    enumerated = [f for f in fields(TrainConfig) if "allowed" in f.metadata]
    assert {f.name for f in enumerated} >= {"encoder", "gpt_generation", "init_encoder", "device_type", "data", "reading",
                                           "synthetic_kinds", "modes", "optimizer", "schedule"}
    for f in enumerated:
        allowed = [a for a in f.metadata["allowed"] if a]
        typo = allowed[0][:-1]
        assert typo not in f.metadata["allowed"]
        with pytest.raises(SystemExit) as e:
            parse_overrides(TrainConfig(), [f"--{f.name}={typo}"])
        message = str(e.value.code)
        assert f"--{f.name}={typo}" in message and all(a in message for a in allowed) and "\n" not in message
        parse_overrides(TrainConfig(), [f"--{f.name}={allowed[-1]}"])  # an allowed value passes
    with pytest.raises(SystemExit, match="'fonts' is not one of"):
        parse_overrides(TrainConfig(), ["--reading=grid:2,fonts"])
    with pytest.raises(SystemExit, match="'grid:0' is not one of"):  # weights are positive numbers
        parse_overrides(TrainConfig(), ["--reading=grid:0"])
    for script in ("vis_tok_train", "vis_mid_train"):  # the commands themselves: one line, exit 1, at once
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", f"scripts.{script}", "--optimizer=adam"], cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 1 and out.stderr.strip().splitlines() == [
            "--optimizer=adam: 'adam' is not one of muon, adamw"], out.stderr
        assert time.time() - t0 < 30


def test_inputs_with_one_name_each_get_their_own_output(overfit_run, tmp_path, capsys):
    _, summary = overfit_run
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (300, 200), "white").save(tmp_path / folder / "x.png")
    Image.new("RGB", (300, 200), "white").save(tmp_path / "scan.png")
    Image.new("RGB", (300, 200), "white").save(tmp_path / "scan.jpg")
    Image.new("RGB", (300, 400), "white").save(tmp_path / "doc.pdf", save_all=True,
                                                append_images=[Image.new("RGB", (300, 400), "white")])
    inputs = [tmp_path / "doc.pdf", tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "scan.png",
              tmp_path / "scan.jpg", tmp_path / "scan.png"]  # the same file twice, too
    results, failures = ocr_main([*map(str, inputs), "--checkpoint", summary["checkpoint"], "--max_tokens", "3", "--out",
                                  str(tmp_path / "md")])
    assert failures == 0 and len(results) == 7
    assert sorted(os.listdir(tmp_path / "md")) == ["doc_page001.md", "doc_page002.md", "scan.md", "scan_2.md",
                                                   "scan_3.md", "x.md", "x_2.md"]


def test_ocr_mistakes_and_interruptions_are_one_line(overfit_run, tmp_path, capsys, monkeypatch):
    _, summary = overfit_run
    Image.new("RGB", (300, 200), "white").save(tmp_path / "page.png")
    read = ["--checkpoint", summary["checkpoint"], "--max_tokens", "3"]
    (tmp_path / "taken").write_text("a file")
    for args, message in ((["--device", "gpu"], "--device gpu: not a device"),
                          (["--out", str(tmp_path / "taken")], "a file, not a directory")):
        with pytest.raises(SystemExit, match=message):
            ocr_main([str(tmp_path / "page.png"), *read, *args])
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    Image.new("RGB", (300, 200), "white").save(tmp_path / "nested" / "deeper" / "p.png")
    with pytest.raises(SystemExit, match="no pages to read"):
        ocr_main([str(tmp_path / "nested"), *read])
    assert "subfolders are not searched" in capsys.readouterr().err

    from scripts import ocr

    def interrupted(engine, pages, *args, **kwargs):
        yield pages[0][0], pages[0][1](), "first"
        raise KeyboardInterrupt
    monkeypatch.setattr(ocr, "read_with_progress", interrupted)
    with pytest.raises(SystemExit) as e:
        ocr_main([str(tmp_path / "page.png"), str(tmp_path / "page.png"), *read])
    assert e.value.code == 130 and "interrupted after 1 of 2 pages" in capsys.readouterr().err


def test_a_new_run_never_mixes_with_an_old_one_and_mistakes_are_one_line(tokenizer_dir, tmp_path, capsys):
    train(tiny_train_config(tokenizer_dir, model_tag="twice", num_iterations=2, save_every=1))
    capsys.readouterr()  # what that run said (another test may have damaged one of its pages)
    message = one_line_error(capsys, train, tiny_train_config(tokenizer_dir, model_tag="twice", num_iterations=1))
    assert "already holds a run (step_000001, step_000002)" in message and "--overwrite" in message
    again = train(tiny_train_config(tokenizer_dir, model_tag="twice", num_iterations=1, overwrite=True))
    assert [os.path.basename(c) for c in list_checkpoints(os.path.dirname(again["checkpoint"]))] == ["step_000001"]
    for overrides, text in ((dict(device_batch_size=0), "--device_batch_size=0: a positive integer"),
                            (dict(num_workers=-1), "--num_workers=-1: a non-negative integer"),
                            (dict(step_milestones="0.5,abc"), "--step_milestones=0.5,abc: fractions"),
                            (dict(init_from=str(tmp_path / "nothere")), "--init_from: ")):
        assert text in one_line_error(capsys, train, tiny_train_config(tokenizer_dir, model_tag="typos", **overrides))
    assert "no en_page_ocr.json" in one_line_error(capsys, eval_fox.main, ["--data", str(tmp_path)])


def test_help_into_a_closed_pipe_and_a_bad_scale_say_nothing_more(tmp_path):
    for command in ("scripts.vis_tok_train", "scripts.ocr"):
        out = subprocess.run(f"{sys.executable} -m {command} --help | head -1", shell=True, cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 0 and "Error" not in out.stderr and out.stdout.strip(), (command, out.stderr)
    report = tmp_path / "base" / "report.md"
    report.parent.mkdir()
    report.write_text("an earlier report")
    out = subprocess.run(["bash", "speedrun.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(PATH=os.environ["PATH"], HOME=str(tmp_path), SCALE="Demo",
                                  NANO_DEEPSEEK_OCR_DIR=str(tmp_path / "base")))
    assert out.returncode == 1 and out.stderr.strip() == "SCALE must be demo or full, got Demo"
    assert report.read_text() == "an earlier report" and not out.stdout  # checked before anything is set up


def test_stage_two_names_the_stage_one_runs_there_are(tokenizer_dir):
    train(tiny_train_config(tokenizer_dir, model_tag="only-run", num_iterations=1))
    out = subprocess.run([sys.executable, "-m", "scripts.vis_mid_train", "--model_tag=elsewhere"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 1 and "stage-1 runs here: " in out.stderr and "only-run" in out.stderr
