import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.utils.flop_counter import FlopCounterMode

import checkpoint
from checkpoint import resolve_checkpoint, save_checkpoint, list_checkpoints
from config import checkpoint_dir
from gpt import GPT, GPTConfig
from image_process import DeepseekOCRProcessor, load_image
from deepencoder.encoder import DeepEncoder, tiny_encoder_configs
from engine import Engine
from nano_deepseek_ocr import NanoDeepseekOCR, load_model
from tasks.synthetic import SyntheticPages
from train import train, lr_multiplier, TrainConfig
from conftest import tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tier1_overfit_reproduces_every_text(overfit_run):
    cfg, summary = overfit_run
    assert summary["losses"][-1] < 0.05
    model, tokenizer, meta = load_model(summary["checkpoint"])
    assert meta["step"] == cfg.num_iterations
    pages = SyntheticPages(cfg.num_synthetic, cfg.seed, cfg.synthetic_kinds.split(","), (cfg.synthetic_min_size, cfg.synthetic_max_size))
    samples = [pages[i] for i in range(len(pages))]
    generated = Engine(model.eval(), tokenizer).read([load_image(s["image_path"]) for s in samples], [s["text"] for s in samples],
                                                     "tiny", 64)
    assert generated == [s["response"] for s in samples]
    assert len(set(generated)) == len(samples)  # it reads each page, not one memorised answer


def test_stage2_freezes_sam(overfit_run, tokenizer_dir):
    _, summary = overfit_run
    before = load_file(os.path.join(summary["checkpoint"], "model.safetensors"))
    cfg = tiny_train_config(tokenizer_dir, stage="stage2", model_tag="frozen", init_from=summary["checkpoint"], freeze_sam=True,
                            text_fraction=0.5, num_iterations=2, schedule="step", vision_lr=1e-3)
    after = load_file(os.path.join(train(cfg)["checkpoint"], "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("encoder.sam_model.") for k in changed)
    assert any(k.startswith("encoder.vision_model.") for k in changed)
    assert any(k.startswith("gpt.transformer.h.") for k in changed)
    assert "encoder.vision_model.embeddings.patch_embedding.weight" not in changed  # never trained


def test_resume_continues_exactly(tokenizer_dir):
    straight = train(tiny_train_config(tokenizer_dir, model_tag="straight", num_iterations=6))
    first = train(tiny_train_config(tokenizer_dir, model_tag="resumed", num_iterations=6, save_every=3, stage="stage1-crash"))
    # pretend the first run died after its step-3 checkpoint
    run_dir = checkpoint_dir("stage1-crash", "resumed")
    for path in list_checkpoints(run_dir)[1:]:
        import shutil
        shutil.rmtree(path)
    resumed = train(tiny_train_config(tokenizer_dir, model_tag="resumed", num_iterations=6, save_every=3, stage="stage1-crash", resume=True))
    assert first["losses"][:3] + resumed["losses"] == straight["losses"]
    a = load_file(os.path.join(straight["checkpoint"], "model.safetensors"))
    b = load_file(os.path.join(resumed["checkpoint"], "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_rank_torchrun_keeps_ranks_identical(tokenizer_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    args = ["--encoder=tiny", "--depth=2", "--modes=tiny", "--init_encoder=random", f"--tokenizer={tokenizer_dir}", "--num_synthetic=8",
            "--synthetic_kinds=formula", "--synthetic_max_size=640", "--device_batch_size=1", "--num_workers=0", "--seq_len=128",
            "--num_iterations=4", "--warmup_steps=1", "--eval_every=4", "--eval_batches=1", "--sample_count=0", "--cer_pages=2", "--save_every=4",
            "--text_fraction=0.9", "--model_tag=ddp", "--total_batch_size=512"]  # text-only rows leave the encoder unused
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "scripts.vis_tok_train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "parameters identical on all 2 ranks: True" in out.stdout
    assert "batch 512 tokens = 1 rows of 128 x 2 ranks x 2 accumulation steps" in out.stdout
    ckpt = resolve_checkpoint(checkpoint_dir("stage1", "ddp"))
    assert os.path.exists(os.path.join(ckpt, "rank000.pt")) and os.path.exists(os.path.join(ckpt, "rank001.pt"))


def test_encoder_flops_match_a_flop_counter(monkeypatch):
    from deepencoder import sam_vary_sdpa
    monkeypatch.setattr(sam_vary_sdpa, "pads_value", lambda q: False)  # the attention as CUDA runs it, which MFU counts
    sam, clip = tiny_encoder_configs()
    encoder = DeepEncoder(sam, clip, 64)
    for size in (512, 640):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            encoder(torch.randn(1, 3, size, size))
        assert sum(encoder.flops(size).values()) == counter.get_total_flops()


def test_gpt_flops_hand_count():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=4, vocab_size=10, n_layer=1, n_head=2, n_kv_head=2, n_embd=8))
    model.init_weights()
    # by hand: matrices 4 x 8x8 (attention) + 2 x 8x32 (mlp) + 10x8 (lm_head) = 848; 6*848 + 12*layers*heads*head_dim*seq
    assert model.estimate_flops() == 6 * 848 + 12 * 1 * 2 * 4 * 4
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 10, (1, 4)), targets=torch.randint(0, 10, (1, 4))).backward()
    assert counter.get_total_flops() == 4 * model.estimate_flops()  # forward + backward over the 4 tokens


def test_train_flops_count_frozen_parts_once(make_model):
    model = make_model()
    image = DeepseekOCRProcessor("gundam").process_image(Image.new("RGB", (1500, 700), "white"))
    n_tiles = image.tile_grid[0] * image.tile_grid[1]
    assert n_tiles > 1 and image.global_view.shape[-1] == 1024 and image.tiles.shape[-1] == 640
    trained = model.train_flops([100], [image])
    model.encoder.sam_model.requires_grad_(False)
    frozen = model.train_flops([100], [image])
    views = [model.encoder.flops(1024)] + [model.encoder.flops(640)] * n_tiles
    assert trained - frozen == 2 * sum(f["sam_model"] for f in views)
    assert frozen == model.gpt.estimate_flops(100) * 100 + sum(3 * f["vision_model"] + 3 * f["projector"] + f["sam_model"]
                                                               for f in views)


def test_crash_mid_save_keeps_the_previous_checkpoint(make_model, tokenizer, tmp_path, monkeypatch):
    model = make_model()
    save_checkpoint(str(tmp_path), 1, model, tokenizer, dict(note="good"))
    real_save = torch.save

    def dying_save(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with torch.no_grad():
        model.image_newline.add_(1.0)
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path), 2, model, tokenizer, dict(note="bad"))
    assert os.path.isdir(tmp_path / "step_000002.tmp")
    found = resolve_checkpoint(str(tmp_path))
    assert found.endswith("step_000001")
    loaded, _, meta = load_model(found)
    assert meta["note"] == "good" and not torch.equal(loaded.image_newline, model.image_newline)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    save_checkpoint(str(tmp_path), 2, model, tokenizer, dict(note="retry"))
    assert not os.path.exists(tmp_path / "step_000002.tmp") and resolve_checkpoint(str(tmp_path)).endswith("step_000002")


def test_nan_loss_stops_the_run_and_keeps_the_checkpoint(tokenizer_dir, monkeypatch, capsys):
    calls = {"n": 0}
    real_forward = NanoDeepseekOCR.forward

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_forward(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setattr(NanoDeepseekOCR, "forward", forward)
    with pytest.raises(SystemExit):
        train(tiny_train_config(tokenizer_dir, model_tag="nan", num_iterations=5, save_every=1))
    run_dir = checkpoint_dir("stage1", "nan")
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["step_000001", "step_000002"]
    load_model(resolve_checkpoint(run_dir))
    assert "--skip_step=2" in capsys.readouterr().err  # the message says how to get past the batch, not "last good"
    # resuming with that step's batches dropped goes on to the end (the NaN came from the third forward only)
    calls["n"] = 100
    summary = train(tiny_train_config(tokenizer_dir, model_tag="nan", num_iterations=5, save_every=1, resume=True,
                                      skip_step=2))
    assert summary["start_step"] == 2 and len(summary["losses"]) == 3


def test_schedules():
    cfg = TrainConfig(num_iterations=100, warmup_steps=10, schedule="cosine", final_lr_frac=0.1)
    assert lr_multiplier(cfg, 0) == pytest.approx(0.1) and lr_multiplier(cfg, 9) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 55) == pytest.approx(0.55) and lr_multiplier(cfg, 100) == pytest.approx(0.1)
    cfg = TrainConfig(num_iterations=100, warmup_steps=0, schedule="step", step_milestones="0.5,0.8", step_gamma=0.1)
    assert [lr_multiplier(cfg, s) for s in (0, 49, 50, 79, 80)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_damaged_checkpoints_are_named_and_resume_falls_back(tokenizer_dir, capsys):
    first = train(tiny_train_config(tokenizer_dir, model_tag="damaged", num_iterations=3, save_every=1, keep_checkpoints=2))
    run_dir = checkpoint_dir("stage1", "damaged")
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["step_000002", "step_000003"]  # kept the last 2
    newest = os.path.join(run_dir, "step_000003")
    model_file = os.path.join(newest, "model.safetensors")
    data = open(model_file, "rb").read()
    with open(model_file, "r+b") as f:  # a finite change to one weight: the file still parses
        f.seek(len(data) - 8)
        f.write(bytes(8))
    with pytest.raises(checkpoint.CheckpointError, match="step_000003/model.safetensors: damaged"):
        resolve_checkpoint(run_dir, step=3)
    assert resolve_checkpoint(run_dir).endswith("step_000002")  # the newest checkpoint that verifies
    assert "skipping step_000003" in capsys.readouterr().err  # a warning: stderr, never inside a reader's output
    # resume takes the good one and continues from there
    resumed = train(tiny_train_config(tokenizer_dir, model_tag="damaged", num_iterations=4, save_every=1, resume=True))
    assert resumed["start_step"] == 2 and resumed["losses"][0] == first["losses"][2]
    # a truncated meta.json in a checkpoint written before manifests is named by load_model
    meta = os.path.join(resolve_checkpoint(run_dir), "meta.json")
    os.remove(os.path.join(os.path.dirname(meta), checkpoint.MANIFEST))
    open(meta, "w").write('{"step": 4, "model_con')
    with pytest.raises(checkpoint.CheckpointError, match="meta.json: unreadable"):
        load_model(os.path.dirname(meta))


def test_an_unreadable_page_is_named_and_skipped_in_steps_and_evals(tokenizer_dir):
    cfg = tiny_train_config(tokenizer_dir, model_tag="badpage", num_iterations=2, eval_every=2, cer_pages=3, sample_count=3,
                            eval_batches=1, synthetic_kinds="formula")
    pages = SyntheticPages(cfg.num_synthetic, cfg.seed, ["formula"], (cfg.synthetic_min_size, cfg.synthetic_max_size))
    bad = pages[0]["image_path"]  # the first training page, read back at the eval and drawn into the first batches
    with open(bad, "r+b") as f:
        f.truncate(100)
    summary = train(cfg)
    assert "heldout_cer" in summary["history"][-1] and all(bad in detail for detail in summary["skipped_samples"])
    assert summary["skipped_samples"]  # the training batches met it too, and named it
    report = open(os.path.join(os.environ["NANO_DEEPSEEK_OCR_DIR"], "report.md")).read()
    shown = os.path.relpath(bad, os.environ["NANO_DEEPSEEK_OCR_DIR"])  # the report says paths under the base dir so
    assert f"skipped samples ({len(summary['skipped_samples'])}): {shown}" in report


def test_stage_commands_take_every_option_form_and_explain_them(tokenizer_dir):
    from common import parse_overrides
    cfg = parse_overrides(TrainConfig(stage="stage2", warmup_steps=0), ["--depth", "4", "--compile", "--vision_lr=2e-5",
                                                                         "--resume", "false", "--modes", "tiny"])
    assert (cfg.depth, cfg.compile, cfg.vision_lr, cfg.resume, cfg.modes) == (4, True, 2e-5, False, "tiny")
    for argv, message in ((["--num_iterations=abc"], "--num_iterations takes an int, got 'abc'"),
                          (["--num_iteration=3"], "did you mean --num_iterations"), (["--depth"], "--depth needs a value"),
                          (["depth=3"], "unknown option 'depth=3'")):
        with pytest.raises(SystemExit, match=message):
            parse_overrides(TrainConfig(), argv)
    out = subprocess.run([sys.executable, "-m", "scripts.vis_mid_train", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("Stage 2")
    listed = {line.split()[0][2:]: line.split()[1:3] for line in out.stdout.splitlines() if line.startswith("  --")}
    assert set(listed) == set(TrainConfig.__dataclass_fields__)  # every option, with its type and this stage's default
    assert listed["warmup_steps"] == ["int", "0"] and listed["freeze_sam"] == ["bool", "True"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_DDP = ["--encoder=tiny", "--depth=2", "--modes=tiny", "--init_encoder=random", "--num_synthetic=8", "--synthetic_kinds=formula",
            "--synthetic_max_size=640", "--device_batch_size=1", "--num_workers=0", "--seq_len=128", "--warmup_steps=1",
            "--eval_every=0", "--sample_count=0", "--cer_pages=0"]


def test_two_nodes_of_one_rank_stay_identical_and_resume(tokenizer_dir):
    """Two "nodes" on this machine, one rank each, joined by torchrun's c10d rendezvous as on a cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}

    def nodes(*extra):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                                   "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                                   "--rdzv_id=two-nodes", "-m", "scripts.vis_tok_train", *TINY_DDP, f"--tokenizer={tokenizer_dir}",
                                   "--model_tag=nodes", "--save_every=2", *extra],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        outs = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "".join(o[0][-2000:] + o[1][-2000:] for o in outs)
        return "".join(o[0] for o in outs)
    first = nodes("--num_iterations=3")
    assert "parameters identical on all 2 ranks: True" in first and "2 ranks x 1 accumulation steps" in first
    again = nodes("--num_iterations=5", "--resume")
    assert "resumed from" in again and "step_000003 (step 3)" in again and "parameters identical on all 2 ranks: True" in again
    assert os.path.exists(os.path.join(checkpoint_dir("stage1", "nodes"), "step_000005", "rank001.pt"))


def test_ranks_stop_when_their_launcher_is_killed(tokenizer_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "scripts.vis_tok_train", *TINY_DDP, f"--tokenizer={tokenizer_dir}", "--model_tag=orphans",
                                 "--num_iterations=100000", "--save_every=0"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True).start()
    deadline = time.time() + 300
    while not any(line.startswith("step 00002") for line in lines) and time.time() < deadline:
        time.sleep(0.5)
    assert any(line.startswith("step 00002") for line in lines), "".join(lines[-30:])  # the ranks are training
    ranks = [int(d) for d in os.listdir("/proc") if d.isdigit() and proc_parent(int(d)) == launcher.pid]
    assert len(ranks) == 2
    launcher.kill()  # SIGKILL: torchrun gets no chance to stop its workers
    launcher.wait()
    deadline = time.time() + 20
    while any(os.path.exists(f"/proc/{pid}") and proc_parent(pid) != 0 for pid in ranks) and time.time() < deadline:
        time.sleep(0.5)
    assert all(proc_parent(pid) == 0 for pid in ranks), "the ranks outlived their launcher"  # gone (or zombies)
    assert any("its launcher" in line and "is gone" in line for line in lines)


def proc_parent(pid):
    """The parent pid of a process (0 once it is gone; a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return 0 if fields[0] == "Z" else int(fields[1])
    except (OSError, IndexError):
        return 0


@pytest.mark.long
def test_the_cpu_toy_command_in_the_stage_1_docstring_runs_as_written(tmp_path):
    import scripts.vis_tok_train
    commands = scripts.vis_tok_train.__doc__.split("# CPU toy", 1)[1].split("\n", 1)[1]  # the lines after the comment
    env = dict(os.environ, NANO_DEEPSEEK_OCR_DIR=str(tmp_path), PYTHONPATH=ROOT)
    out = subprocess.run(["bash", "-ec", commands.replace("python ", f"{sys.executable} ")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "held-out CER" in out.stdout and list_checkpoints(os.path.join(tmp_path, "checkpoints", "stage1", "d4-tiny"))
    lrms = [float(line.split("| lrm ")[1].split()[0]) for line in out.stdout.splitlines() if "| lrm " in line]
    assert 1.0 in lrms and lrms[-1] < 1.0  # warmup ends and the schedule goes on to decay
    losses = [float(line.split("| loss ")[1].split()[0]) for line in out.stdout.splitlines() if "| loss " in line]
    assert losses[-1] < losses[0] - 1.0  # an example in --help must learn, not diverge
    assert "worker" not in out.stderr  # no more loader workers than the machine has cores


def test_image_swaps_for_the_gap_watch():
    from evaluation import blank_images, other_images
    from image_process import ProcessedImage
    images = [ProcessedImage(torch.full((3, 4, 4), i, dtype=torch.uint8), None, (1, 1), 73) for i in range(3)]
    images.append(ProcessedImage(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
                                 (2, 1), 200))
    blank = blank_images(images)
    assert all((b.global_view == 255).all() for b in blank) and (blank[3].tiles == 255).all() and blank[0].tiles is None
    assert all((im.global_view != 255).all() for im in images)  # the batch's own images are left as they were
    swapped = other_images(images)
    assert [int(s.global_view[0, 0, 0]) for s in swapped[:3]] == [1, 2, 0]  # round the group of the same layout
    assert swapped[3] is images[3]  # alone in its layout: nothing to swap with


@pytest.mark.long
def test_the_demo_recipe_learns_to_read_pages_it_has_never_seen(tokenizer_dir, monkeypatch):
    """The demo's recipe, short: from random initialisation the held-out CER must fall far below where it starts, a
    blank page must cost the answer dearly, and the encoder must learn to tell pages apart (its similarity falls):
    a wrong slot layout or a collapsed encoder leaves the model blind, a cut gradient path leaves the encoder as it
    was initialised. When the model starts to look varies from run to run (step 60 to 130 over seeds, the thread
    count and the machine's kernels change it too): the bars hold for a late start, and a blind model (0.9 or more)
    misses them all. In bf16 where the CPU has it, as the demo trains."""
    monkeypatch.setenv("NANO_DEEPSEEK_OCR_FP32", "0")
    cfg = tiny_train_config(tokenizer_dir, model_tag="reads", data="reading", depth=4, num_synthetic=1_000_000,
                            seq_len=512, device_batch_size=4, num_iterations=150, warmup_steps=30, vision_lr=1e-4,
                            eval_every=150, eval_batches=2, cer_pages=20)
    summary = train(cfg)
    first, last = summary["history"]
    start, end, training, n = first["heldout_cer"], last["heldout_cer"], last["training_cer"], last["cer_pages"]
    assert n == 20 and start > 0.9 and end < 0.7 and training < 0.7
    assert last["gap_blank"] > 1.0 and last["gap_other"] > 1.0
    assert last["encoder_similarity"] < first["encoder_similarity"] - 0.02
    assert last["encoder_similarity"] < cfg.collapse_warn
    report = open(os.path.join(os.environ["NANO_DEEPSEEK_OCR_DIR"], "report.md")).read()
    assert f"- held-out CER: {end:.3f} (20 pages)\n- training CER: {training:.3f} (20 pages)" in report


def test_the_validation_set_holds_the_cer_pages_when_part_of_it_is_text(tokenizer_dir):
    from train import build_tasks
    cfg = tiny_train_config(tokenizer_dir, data="reading", text_fraction=0.5, cer_pages=30, eval_batches=1)
    val = build_tasks(cfg, "val", world_size=1)
    pages = sum("messages" not in val[i] for i in range(len(val)))
    assert 30 <= pages < len(val)  # pages enough for the CER, with text among them


def test_the_one_precision_rule(monkeypatch):
    import common
    monkeypatch.setenv("NANO_DEEPSEEK_OCR_FP32", "0")
    for native, cpu in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(common, "cpu_has_bf16", lambda: native)
        assert common.compute_dtype("cpu") == cpu and common.compute_dtype("cuda") == torch.bfloat16
        assert common.compute_dtype("mps") == torch.float32
        assert isinstance(common.autocast_context("cpu"), torch.autocast) == native
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: True)
    monkeypatch.setenv("NANO_DEEPSEEK_OCR_FP32", "1")  # the flag: fp32 on the CPU, CUDA keeps bf16
    assert common.compute_dtype("cpu") == torch.float32 and common.compute_dtype("cuda") == torch.bfloat16
