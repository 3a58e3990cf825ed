"""Image processing, slot counts, the slot layout, the merged forward, generation and the OCR command."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import image_process
from config import MODES
from dataloader import pack, render_sample
from image_process import DeepseekOCRProcessor, ImageError, load_image, num_image_slots, prepare_image, tile_grid
from grounding import grounding_boxes
from scripts.ocr import draw_boxes, main as ocr_main
from conftest import DEVICES


@pytest.mark.parametrize("size", [(300, 200), (640, 640), (2000, 3000), (1024, 1024), (5000, 400)])
def test_fixed_mode_slot_counts(size):
    assert [num_image_slots(*size, mode) for mode in ("tiny", "small", "base", "large")] == [73, 111, 273, 421]


@pytest.mark.parametrize("size,grid,slots", [((600, 600), (1, 1), 273), ((1280, 640), (2, 1), 483), ((800, 600), (3, 2), 893),
                                             ((1920, 1280), (3, 2), 893), ((3840, 640), (6, 1), 883), ((640, 1280), (1, 2), 493)])
def test_gundam_tiling_and_counts(size, grid, slots):
    assert tile_grid(*size, "gundam") == grid
    assert num_image_slots(*size, "gundam") == slots


def test_gundam_tie_rule_prefers_the_larger_grid_for_large_images():
    # (2,2) and (3,3) have the same ratio; the later grid wins only when the image covers over half of it
    assert tile_grid(2000, 2000, "gundam", max_crops=9) == (3, 3)
    assert tile_grid(1000, 1000, "gundam", max_crops=9) == (2, 2)
    assert num_image_slots(2000, 2000, "gundam", max_crops=9) == 273 + 31 * 30


def test_processor_tokenizer_and_model_agree_in_every_mode(make_model, tokenizer):
    model = make_model()
    image = Image.new("RGB", (1500, 700), (200, 220, 240))
    for mode, spec in [(m, s) for m, s in MODES.items() if s["encoder"] == "v1"]:  # v2's: test_v2
        item = DeepseekOCRProcessor(mode).process_image(image)
        assert item.global_view.shape == (3, spec["base_size"], spec["base_size"]) and item.global_view.dtype == torch.uint8
        if spec["crop"]:
            n_w, n_h = item.tile_grid
            assert item.tiles.shape == (n_w * n_h, 3, spec["image_size"], spec["image_size"])
        else:
            assert item.tiles is None and item.tile_grid == (1, 1)
        ids, positions = tokenizer.render_vision_pretraining("<image>\nFree OCR.", 10_000, [item.slots])
        assert len(positions) == item.slots
        with torch.no_grad():
            slots = model.encode_images([item])[0]
            embeds = model.embed(torch.tensor([ids]), [item])
        assert slots.shape == (item.slots, 64)
        torch.testing.assert_close(embeds[0, positions[0]:positions[-1] + 1], slots)


def test_process_images_batches_and_pads_tiles():
    out = DeepseekOCRProcessor("gundam").process_images([Image.new("RGB", (1280, 640)), Image.new("RGB", (500, 500)),
                                                         Image.new("RGB", (800, 600))])
    assert out["pixel_values"].shape == (3, 3, 1024, 1024)
    assert out["images_crop"].shape == (3, 6, 3, 640, 640)
    assert out["images_spatial_crop"].tolist() == [[2, 1], [1, 1], [3, 2]]
    assert out["num_image_tokens"] == [483, 273, 893]
    assert out["images_crop"][0, 2:].abs().sum() == 0 and out["images_crop"][1].abs().sum() == 0
    assert -1 <= out["pixel_values"].min() and out["pixel_values"].max() <= 1
    padded = DeepseekOCRProcessor("base").process_images([Image.new("RGB", (400, 200), (255, 255, 255))])["pixel_values"][0]
    assert torch.allclose(padded[:, 0, 0], torch.full((3,), 127 / 255 * 2 - 1))  # grey padding above the image
    assert torch.allclose(padded[:, 512, 512], torch.ones(3))


def test_layout_order(make_model):
    model = make_model()
    C = 64
    q, qt, tiles = 2, 3, (2, 1)
    glob = torch.arange(q * q, dtype=torch.float)[:, None].expand(q * q, C) + 1000
    tile = torch.arange(2 * qt * qt, dtype=torch.float).view(2, qt * qt, 1).expand(2, qt * qt, C)
    with torch.no_grad():
        out = model.layout(glob, tile, tiles)
    nl, sep = model.image_newline, model.view_seperator
    assert out.shape[0] == (qt * 2 + 1) * qt + q * (q + 1) + 1
    assert torch.equal(out[-1], sep)
    rows = out[:(qt * 2 + 1) * qt].view(qt, qt * 2 + 1, C)
    assert all(torch.equal(rows[r, -1], nl) for r in range(qt))  # a newline after every stitched row
    # row r of the stitched grid: tile 0's row r, then tile 1's row r
    assert rows[1, :, 0].tolist()[:-1] == [3, 4, 5, 12, 13, 14]
    g = out[(qt * 2 + 1) * qt:-1].view(q, q + 1, C)
    assert g[:, :q, 0].tolist() == [[1000, 1001], [1002, 1003]] and all(torch.equal(g[r, -1], nl) for r in range(q))
    with torch.no_grad():
        assert torch.equal(model.layout(glob), torch.cat([g.reshape(-1, C), sep[None]]))  # no tiles: global + separator


@pytest.mark.parametrize("generation", ["2025", "2026"])
@pytest.mark.parametrize("device", DEVICES)
def test_packed_rows_give_the_loss_and_gradients_of_one_sample_per_row(make_model, tokenizer, generation, device,
                                                                        exact_fp32):
    """Several samples packed into each row, kept apart by the document mask and their own positions, train exactly
    as the same samples each alone in a row: same summed loss, same gradient for every parameter (2026: smear at the
    sample boundaries, sliding windows of 128 keys inside the longer samples; CUDA: the mask is a FlexAttention
    BlockMask). Three layers: with two, backout takes out the last layer's own output, which the final RMSNorm cannot
    see, and its gradient is rounding noise."""
    model = make_model(seed=2, generation=generation, sequence_len=512, n_layer=3).to(device)
    rng = np.random.default_rng(3)
    samples = []
    for (w, h), mode, response in (((700, 500), "tiny", "first page"), ((900, 600), "small", "2nd"),
                                   ((300, 300), "tiny", "a third page, longer than the others " * 8)):
        page = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        samples.append(render_sample(dict(text="<image>\nFree OCR.", response=response, image=page), tokenizer,
                                     DeepseekOCRProcessor(mode), 400))
    chat, mask = tokenizer.render_conversation(dict(messages=[dict(role="user", content="hi"), dict(role="assistant", content="hello")]), 100)
    samples.insert(1, dict(ids=chat, mask=mask, images=[]))

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model.batch_loss(batch, loss_reduction="sum")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    packed = pack(samples, rows=2, seq_len=256, pad_id=tokenizer.get_bos_token_id())
    assert len(set(packed["doc_ids"][0].tolist()) - {-1}) == 3  # the first row really holds several samples
    loss, grads = loss_and_grads(packed)
    alone = [loss_and_grads(pack([sample], rows=1, seq_len=256, pad_id=tokenizer.get_bos_token_id())) for sample in samples]
    slack = 1 if device == "cpu" else 10  # CUDA's fused kernels sum in other orders again
    torch.testing.assert_close(loss, sum(l for l, _ in alone), rtol=1e-5 * slack, atol=1e-4)
    assert generation == "2025" or grads["gpt.backout_lambda"].abs().item() > 1e-3  # a gradient, not noise
    for name, grad in grads.items():
        ref = sum(g[name] for _, g in alone if name in g)  # fp32 sums in another order: errors scale with the largest
        torch.testing.assert_close(grad, ref, rtol=1e-4 * slack, atol=1e-6 * slack * max(1.0, ref.abs().max().item()),
                                   msg=name)


def test_slot_count_mismatch_is_an_error(make_model, tokenizer):
    model = make_model()
    item = DeepseekOCRProcessor("tiny").process_image(Image.new("RGB", (100, 100)))
    ids, _ = tokenizer.render_vision_pretraining("<image>\nFree OCR.", 1000, [72])  # one slot short
    with pytest.raises(ValueError, match="72 <image> slots.*73 image embeddings"):
        model.embed(torch.tensor([ids]), [item])


def test_mixed_batch_matches_samples_one_by_one(make_model, tokenizer):
    model = make_model().eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((700, 500), (1400, 600))]
    rows = []
    for image, mode in zip(images, ("tiny", "gundam")):
        item = DeepseekOCRProcessor(mode).process_image(image)
        ids, pos = tokenizer.render_vision_pretraining("<image>\nFree OCR.", 10_000, [item.slots], response="some text")
        rows.append((ids, [item], pos))
    chat, mask = tokenizer.render_conversation(dict(messages=[dict(role="user", content="hi"), dict(role="assistant", content="hello")]), 100)
    rows.append((chat, [], [i for i, m in enumerate(mask) if not m]))
    T = max(len(r[0]) for r in rows) - 1
    inputs = torch.full((3, T), tokenizer.get_bos_token_id())
    targets = torch.full((3, T), -1)
    for b, (ids, _, masked) in enumerate(rows):
        t = torch.tensor(ids[1:])
        t[[p - 1 for p in masked if p > 0]] = -1
        inputs[b, :len(ids) - 1], targets[b, :len(ids) - 1] = torch.tensor(ids[:-1]), t
    with torch.no_grad():
        per_token = model(inputs, targets, [im for r in rows for im in r[1]], loss_reduction="none").view(3, T)
        for b, (ids, imgs, _) in enumerate(rows):
            n = len(ids) - 1
            alone = model(inputs[b:b + 1, :n], targets[b:b + 1, :n], imgs, loss_reduction="none")
            torch.testing.assert_close(per_token[b, :n], alone, atol=2e-5, rtol=1e-4)
            assert (per_token[b, n:] == 0).all()


def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def test_bad_images_convert_or_fail_with_the_file_name(tmp_path, monkeypatch):
    cmyk = load_image(save(Image.new("CMYK", (40, 30), (0, 0, 0, 0)), tmp_path / "cmyk.jpg"))
    assert cmyk.mode == "RGB" and np.asarray(cmyk).min() > 240  # CMYK paper white -> RGB white
    deep = Image.fromarray(np.array([[65535, 32768], [0, 65535]], dtype=np.uint16))
    rgb16 = load_image(save(deep, tmp_path / "deep.png"))
    assert np.asarray(rgb16)[:, :, 0].tolist() == [[255, 128], [0, 255]]  # rescaled, not clipped to white
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    assert np.asarray(load_image(save(palette, tmp_path / "p.png", transparency=1))).min() == 255  # transparent -> white
    gray = load_image(save(Image.new("L", (10, 10), 77), tmp_path / "gray.png"))
    assert gray.mode == "RGB" and np.asarray(gray).tolist()[0][0] == [77, 77, 77]
    wide = load_image(save(Image.new("RGB", (6000, 20)), tmp_path / "wide.png"))
    assert num_image_slots(*wide.size, "gundam") == 883 and DeepseekOCRProcessor("base").process_image(wide).global_view.shape == (3, 1024, 1024)
    exif = Image.new("RGB", (60, 20))
    info = exif.getexif()
    info[0x0112] = 6  # rotate 90 degrees on display
    assert load_image(save(exif, tmp_path / "rot.jpg", exif=info)).size == (20, 60)

    (tmp_path / "garbage.png").write_bytes(os.urandom(200))
    png = io.BytesIO()
    Image.new("RGB", (300, 300), (9, 9, 9)).save(png, format="PNG")
    (tmp_path / "cut.png").write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
    for name, reason in (("garbage.png", "cannot read"), ("cut.png", "cannot read"), ("nothing.png", "no such file")):
        with pytest.raises(ImageError, match=f"{name}.*{reason}"):
            load_image(str(tmp_path / name))
    with pytest.raises(ImageError, match="empty image"):
        prepare_image(Image.new("RGB", (0, 5)), "zero.png")
    monkeypatch.setattr(image_process, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="gray.png.*decompression bomb"):
        load_image(save(Image.new("L", (100, 100)), tmp_path / "gray.png"))


def test_grounding_boxes_are_drawn(tmp_path):
    text = "<|ref|>title<|/ref|><|det|>[[100, 100, 500, 200]]<|/det|>\n# Hi\n<|ref|>x<|/ref|><|det|>[[bad]]<|/det|>"
    boxes = grounding_boxes(text, 999, 1998)
    assert [label for label, _ in boxes] == ["title"]
    assert boxes[0][1] == pytest.approx((100, 200, 500, 400))
    drawn = np.asarray(draw_boxes(Image.new("RGB", (999, 1998), (255, 255, 255)), boxes))
    assert (drawn[200, 100:500] != 255).any() and (drawn[300, 300] == 255).all()
    # a model may write a box's corners the other way round: the box comes back ordered and still draws
    inverted = grounding_boxes("<|ref|>t<|/ref|><|det|>[[500, 200, 100, 100]]<|/det|>\nHi", 999, 1998)
    assert inverted[0][1] == pytest.approx((100, 200, 500, 400))
    draw_boxes(Image.new("RGB", (999, 1998), (255, 255, 255)), inverted)


def test_ocr_command_without_a_checkpoint_says_so(tmp_path):
    Image.new("RGB", (60, 40), (255, 255, 255)).save(tmp_path / "page.png")
    with pytest.raises(SystemExit, match="no trained model"):
        ocr_main([str(tmp_path / "page.png"), "--checkpoint", str(tmp_path / "nowhere")])


def test_ocr_command_reads_and_draws(overfit_run, tmp_path):
    _, summary = overfit_run
    page = tmp_path / "page.png"
    Image.new("RGB", (300, 200), (255, 255, 255)).save(page)
    results, failures = ocr_main([str(page), str(tmp_path / "missing.png"), "--checkpoint", summary["checkpoint"],
                                  "--mode", "tiny", "--max_tokens", "8", "--out", str(tmp_path / "boxes")])
    assert [p for p, _ in results] == [str(tmp_path / "page")] and failures == 1  # the missing file is reported and skipped




def run_ocr(*args, cwd):
    env = dict(os.environ, PYTHONPATH=cwd)
    return subprocess.run([sys.executable, "-m", "scripts.ocr", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_ocr_command_streams_exit_status_directories_and_pdfs(overfit_run, tmp_path):
    _, summary = overfit_run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    read = ["--checkpoint", summary["checkpoint"], "--mode", "tiny", "--max_tokens", "6"]
    pages = tmp_path / "scans"
    pages.mkdir()
    for i in range(2):
        Image.new("RGB", (300, 200), (255, 255, 255 - 40 * i)).save(pages / f"p{i}.png")
    (pages / "notes.txt").write_text("not a page")
    Image.new("RGB", (300, 400), (255, 255, 255)).save(tmp_path / "doc.pdf", save_all=True,
                                                       append_images=[Image.new("RGB", (300, 400), (200, 200, 200))])
    ok = run_ocr(str(pages), str(tmp_path / "doc.pdf"), *read, "--out", str(tmp_path / "md"), cwd=root)
    assert ok.returncode == 0, ok.stderr
    assert sorted(os.listdir(tmp_path / "md")) == ["doc_page001.md", "doc_page002.md", "p0.md", "p1.md"]
    assert ok.stdout.count("===== ") == 4 and "reading 4 page(s)" in ok.stderr  # a directory and a PDF, page by page
    # one bad input: the others are read, the problem goes to stderr (stdout stays the text), the status says so
    (tmp_path / "bad.png").write_bytes(b"not an image")
    partial = run_ocr(str(pages / "p0.png"), str(tmp_path / "bad.png"), *read, cwd=root)
    assert partial.returncode == 1 and "skipping" in partial.stderr and "skipping" not in partial.stdout
    assert partial.stdout.strip()  # p0 was read
    missing = run_ocr(str(tmp_path / "nothing.png"), *read, cwd=root)
    assert missing.returncode == 1 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    bad_tokens = run_ocr(str(pages / "p0.png"), "--max_tokens", "-5", cwd=root)
    assert bad_tokens.returncode == 2 and "must be a positive integer" in bad_tokens.stderr
    if not torch.cuda.is_available():
        no_cuda = run_ocr(str(pages / "p0.png"), *read, "--device", "cuda", cwd=root)
        assert no_cuda.returncode == 1 and "has no CUDA device" in no_cuda.stderr and "Traceback" not in no_cuda.stderr
