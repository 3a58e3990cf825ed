"""
The one training loop behind both stages. A stage is a TrainConfig (what is frozen, which data, seq_len,
schedule); scripts/vis_tok_train.py (stage 1) and scripts/vis_mid_train.py (stage 2) only set its defaults.
No DDP wrapper, as in nanochat: DistMuon / DistAdamW average the gradients themselves, so parameters a
batch does not touch (the encoder on a text-only batch) just count as zero gradients.
"""
import math
import os
import time
from dataclasses import dataclass, asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import (save_checkpoint, resolve_checkpoint, list_checkpoints, load_model, load_training_state,
                        set_rng_state, new_model)
from common import (compute_init, compute_cleanup, print0, warn0, DummyWandb, append_report, autocast_context,
                    line_plot, UserError)
from config import base_dir, checkpoint_dir, tokenizer_dir, MODES
from dataloader import VisionDataLoader, sample_image
from engine import Engine
from image_process import DeepseekOCRProcessor, ImageError, load_image
from metrics import normalized_edit_distance
from nano_deepseek_ocr import NanoDeepseekOCR
from tasks.mixture import mixture
from tasks.synthetic import READING_KINDS, SyntheticPages


@dataclass
class TrainConfig:
    stage: str = "stage1"                  # names the checkpoint directory
    run: str = "dummy"                     # wandb run name; "dummy" logs nowhere (nanochat's convention)
    model_tag: str = ""                    # checkpoint subdirectory; default d{depth} (+ "-tiny" for the tiny encoder)
    device_type: str = ""                  # cuda | cpu | mps; empty = autodetect
    seed: int = 42
    # model and its initialisation
    depth: int = 20                        # GPT depth when it starts from scratch (width = 64 * depth)
    encoder: str = "full"                  # full (SAM-B + CLIP-L) | tiny (CPU demo and tests)
    init_gpt: str = ""                     # nanochat checkpoint directory or HF repo; empty = from scratch
    gpt_generation: str = "2026"           # from scratch: nanochat's 2026 GPT (README: the demo measured) or its 2025 one
    init_gpt_step: int = -1                # its step; -1 = the last
    init_encoder: str = "sam+clip"         # sam+clip | deepseek | random
    sam_source: str = "facebook/sam-vit-base"
    clip_source: str = "openai/clip-vit-large-patch14"
    deepseek_source: str = "deepseek-ai/DeepSeek-OCR"
    init_from: str = ""                    # one of our checkpoints (run or step directory) to start from
    tokenizer: str = ""                    # tokenizer directory; empty = the nanochat checkpoint's, else the base dir's
    vocab_size: int = 0                    # GPT rows when larger than the tokenizer's (65536: d20's true cost)
    freeze_sam: bool = False               # stage 2 freezes SAM + net_2 + net_3
    activation_checkpointing: bool = False # recompute SAM's global blocks in backward
    compile: bool = True                   # torch.compile the encoder and the GPT (CUDA only; the first steps compile)
    # data
    data: str = "synthetic"                # reading (text lines made on the fly) | synthetic (pages) | real
    reading: str = "grid"                  # reading pages: kind:weight,... of grid (a character per cell) and type
    text_fraction: float = 0.0             # share of text-only samples (stage 2: 0.1)
    num_synthetic: int = 20000             # synthetic pages (reading: the length of the stream)
    synthetic_kinds: str = "document,table,chart,formula"
    synthetic_min_size: int = 512
    synthetic_max_size: int = 1024
    max_samples: int = 0                   # per real dataset; 0 = all
    modes: str = "base"                    # comma-separated; with several, each sample has a fixed one
    seq_len: int = 4096
    device_batch_size: int = 4             # rows of seq_len tokens per micro-batch, whole samples packed into each
    total_batch_size: int = 0              # tokens per optimizer step; 0 = device_batch_size x seq_len x ranks
    num_workers: int = min(4, os.cpu_count() or 1)  # loader processes: no more than the cores
    # optimisation
    num_iterations: int = 1000
    optimizer: str = "muon"                # muon (Muon for GPT matrices + AdamW) | adamw (everywhere, at adamw_lr)
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    vision_lr: float = 5e-5
    adamw_lr: float = 5e-5
    weight_decay: float = 0.0
    schedule: str = "cosine"               # cosine: warmup then cosine | step: x step_gamma at each milestone
    warmup_steps: int = 100
    final_lr_frac: float = 0.0
    step_milestones: str = "0.6,0.85"      # fractions of num_iterations
    step_gamma: float = 0.1
    grad_clip: float = 1.0
    # evaluation, logging, checkpoints
    eval_every: int = 250
    eval_batches: int = 8
    collapse_images: int = 8
    collapse_warn: float = 0.99             # a fork that collapsed went from 0.59 to 0.9998
    sample_count: int = 4                  # held-out pages printed with their reading at each eval
    sample_tokens: int = 256               # new tokens at most when reading a page
    cer_pages: int = 50                    # held-out and training pages read at each eval (character error rate)
    gap_warn: float = 0.05                 # warn when a blank page raises the answer loss by less (nats per token)
    save_every: int = 500
    keep_checkpoints: int = 0              # keep only the newest N checkpoints of the run; 0 = all
    resume: bool = False
    skip_step: int = -1                    # drop the batches of this step (one that gave a non-finite loss) on resume

    def tag(self):
        return self.model_tag or f"d{self.depth}" + ("-tiny" if self.encoder == "tiny" else "")


def lr_multiplier(cfg, step):
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.num_iterations - cfg.warmup_steps)
        return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "step":
        passed = sum(step >= float(m) * cfg.num_iterations for m in cfg.step_milestones.split(","))
        return cfg.step_gamma ** passed
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def muon_momentum(step):
    """nanochat warms Muon's momentum from 0.85 to 0.95 over 300 steps."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("B200", 2.25e15), ("A100", 312e12), ("L40S", 362e12),
                       ("4090", 165e12), ("A10", 125e12)):
        if key in name:
            return flops
    return None


def build_tasks(cfg, split, world_size):
    """The training mixture, or the validation one: enough samples for the eval batches and for cer_pages pages
    among its text-only samples."""
    pages = math.ceil(1.5 * max(cfg.cer_pages, cfg.sample_count) / (1 - cfg.text_fraction))
    n_eval = max(cfg.eval_batches * cfg.device_batch_size * world_size, pages, 1)
    synthetic = dict(num_samples=cfg.num_synthetic, kinds=cfg.synthetic_kinds.split(","),
                     sizes=(cfg.synthetic_min_size, cfg.synthetic_max_size), reading=reading_kinds(cfg.reading))
    return mixture(cfg.data, split, cfg.seed, None if split == "train" else n_eval, cfg.text_fraction,
                   cfg.max_samples, synthetic)


def reading_kinds(spec):
    """--reading 'grid:0.3,type:0.7' (a bare kind weighs 1) -> [(kind, weight)]."""
    kinds = [(k, float(w or 1)) for k, _, w in (part.partition(":") for part in spec.split(","))]
    unknown = [k for k, _ in kinds if k not in READING_KINDS]
    if unknown:
        raise UserError(f"--reading: unknown page kinds {unknown}; kinds are {list(READING_KINDS)}")
    return kinds


def blank_images(images):
    """The same image dicts with every view a white page (uint8 255, or 1.0 once normalised)."""
    def white(x):
        return None if x is None else torch.full_like(x, 255 if x.dtype == torch.uint8 else 1.0)
    return [dict(im, pixel_values=white(im["pixel_values"]), images_crop=white(im["images_crop"])) for im in images]


def other_images(images):
    """Each image swapped for another of the batch with the same layout (the next one, round the group)."""
    groups = {}
    for i, im in enumerate(images):
        layout = (im["num_image_tokens"], tuple(im["images_spatial_crop"]), im["pixel_values"].shape)
        groups.setdefault(layout, []).append(i)
    swapped = list(images)
    for members in groups.values():
        for a, b in zip(members, members[1:] + members[:1]):
            swapped[a] = images[b]
    return swapped


@torch.no_grad()
def evaluate(model, cfg, val_task, tokenizer, rank, world_size, autocast):
    """
    Validation over cfg.eval_batches batches (all ranks together): the mean answer loss per target token, and the
    image gap: how much that loss rises when each page's image is replaced by a blank page, or by another page of
    the batch. A gap near zero means the model answers without looking.
    """
    model.eval()
    loader = VisionDataLoader(val_task, tokenizer, cfg.modes.split(","), cfg.device_batch_size, cfg.seq_len, rank,
                              world_size, seed=0, num_workers=0, shuffle=False)
    total = torch.zeros(4, device=model.image_newline.device)  # summed loss: own, blank, other image; targets
    for _, batch in zip(range(cfg.eval_batches), loader):
        ids, targets, doc_ids, positions = (batch[k].to(total.device)
                                            for k in ("input_ids", "targets", "doc_ids", "positions"))
        for k, images in enumerate((batch["images"], blank_images(batch["images"]), other_images(batch["images"]))):
            with autocast:
                total[k] += model(ids, targets, images, "sum", doc_ids, positions).float()
        total[3] += (targets != -1).sum()
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    own, blank, other = (total[:3] / total[3].clamp(min=1)).tolist()
    return dict(val_loss=own, gap_blank=blank - own, gap_other=other - own)


def collapse_watch_views(n, processor):
    """The views of n fixed distinct synthetic pages for the collapse watch (None when n is 0: no watch). A page file
    damaged on disk is named and rendered again."""
    if n == 0:
        return None
    pages, views = SyntheticPages(n, seed=12345, sizes=(768, 1024)), []
    for i in range(len(pages)):
        try:
            image = load_image(pages[i]["image_path"])
        except ImageError as e:
            warn0(f"collapse watch: {e}; rendering it again")
            image = load_image(pages.render(i)["image_path"])
        views.append(processor.process_image(image)["pixel_values"])
    return torch.stack(views)


@torch.no_grad()
def encoder_collapse(model, views, autocast):
    """Mean pairwise cosine similarity of the encoder outputs of distinct images: near 1, every page looks alike."""
    model.eval()
    with autocast:
        features = model.encoder(views.to(model.image_newline.device)).flatten(1).float()
    model.train()
    sim = F.normalize(features, dim=-1) @ F.normalize(features, dim=-1).T
    n = sim.size(0)
    return ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()


def reading_copy(model):
    """What an eval reads pages with: on CUDA an uncompiled bf16 copy, made once per eval (the compiled fp32 training
    model would re-cast every weight at every decode step, and compile its encoder once more for no_grad)."""
    if model.image_newline.device.type != "cuda":
        return model
    with torch.device("meta"):
        copy = NanoDeepseekOCR(model.config)
    copy.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, assign=True)
    copy.gpt.cos, copy.gpt.sin = copy.gpt._precompute_rotary_embeddings(copy.gpt.rotary_seq_len)  # not in the state
    return copy.eval()


def read_pages(model, tokenizer, task, n, mode, max_tokens):
    """Greedy-read the first n vision samples of a task: [(expected, read, kind of page)]. A sample whose image cannot
    be read is reported and passed over."""
    pages = []
    for i in range(len(task)):
        if len(pages) == n:
            break
        sample = task[i]
        if "messages" in sample:
            continue
        try:
            pages.append((i, sample_image(sample), sample["text"], sample["response"], sample.get("kind", "")))
        except ImageError as e:
            warn0(f"  sample {i}: skipped, {e}")
    # reading past twice the longest answer only adds errors: a cap keeps an untrained model's eval short
    max_tokens = min(max_tokens, 2 * max([len(tokenizer.encode(p[3])) for p in pages] + [0]) + 8)
    model.eval()
    read = dict(Engine(model, tokenizer).read_iter([p[:3] for p in pages], mode, max_tokens))
    model.train()
    return [(expected, read[i], kind) for i, _, _, expected, kind in pages]


def character_error_rate(pages):
    return sum(normalized_edit_distance(read, expected) for expected, read, _ in pages) / max(1, len(pages))


def cer_by_kind(heldout, training):
    """{kind: (held-out CER, training CER, pages)} when the pages are of several kinds, else {}."""
    kinds = sorted({k for _, _, k in heldout})
    if len(kinds) < 2:
        return {}
    return {k: (character_error_rate([p for p in heldout if p[2] == k]),
                character_error_rate([p for p in training if p[2] == k]), sum(p[2] == k for p in heldout))
            for k in kinds}


def trained_on(cfg, init_meta):
    """What a checkpoint has been trained on, this run and the ones before it: its modes and kinds of page (readers
    default to its modes, reports say what it learned)."""
    if cfg.data == "reading":
        data = f"reading pages ({', '.join(k for k, _ in reading_kinds(cfg.reading))})"
    else:
        data = f"synthetic pages ({cfg.synthetic_kinds})" if cfg.data == "synthetic" else "the nine datasets"
    data += f" + {cfg.text_fraction:.0%} text" if cfg.text_fraction else ""
    modes = list(dict.fromkeys(init_meta.get("trained_modes", []) + cfg.modes.split(",")))
    return dict(trained_modes=modes, trained_on=list(dict.fromkeys(init_meta.get("trained_on", []) + [data])))


def configure_model(model, cfg, device):
    """What the stage's config sets on a built model: SAM frozen or not, activation checkpointing, compilation."""
    if cfg.freeze_sam:
        model.encoder.freeze_sam()
    model.encoder.set_activation_checkpointing(cfg.activation_checkpointing)
    if cfg.compile and device.type == "cuda":  # in place: parameter names stay as they are in checkpoints
        for part in (model.encoder, model.gpt):
            if part._compiled_call_impl is None:  # once: a second compile() would start over
                part.compile()


def ranks_in_sync(model):
    """Whether every rank holds the same parameters (per-tensor float64 sum and sum of squares, compared)."""
    if not dist.is_initialized():
        return True
    stats = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                         for p in model.parameters()])
    gathered = [torch.zeros_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, stats)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def check_config(cfg):
    """The ordinary mistakes, each one line before anything slow: bad modes or page kinds, a collapse watch of one
    page, --resume with nothing to resume, a new model without a tokenizer."""
    unknown = [m for m in cfg.modes.split(",") if m not in MODES]
    if unknown:
        raise UserError(f"--modes: unknown modes {unknown}; modes are {','.join(MODES)}")
    reading_kinds(cfg.reading)
    if cfg.collapse_images == 1 or cfg.collapse_images < 0:
        raise UserError("--collapse_images compares pages pairwise: 2 or more, or 0 for no collapse watch")
    if cfg.resume and not list_checkpoints(checkpoint_dir(cfg.stage, cfg.tag())):
        raise UserError(f"--resume: no checkpoint in {checkpoint_dir(cfg.stage, cfg.tag())} to resume from "
                        f"(start without --resume, or check --model_tag={cfg.tag()})")
    if not (cfg.resume or cfg.init_from or cfg.init_gpt):
        tokenizer = cfg.tokenizer or tokenizer_dir()
        if not os.path.exists(os.path.join(tokenizer, "tokenizer.pkl")):
            raise UserError(f"no tokenizer at {tokenizer}: train one first (`python -m scripts.tok_train`), or pass "
                            "--tokenizer DIR or --init_gpt with a nanochat checkpoint")


def train(cfg, prebuilt=None):
    """One training run of cfg. prebuilt: (model, tokenizer) to train instead of building one (gpu_check's single
    compiled model)."""
    check_config(cfg)
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None)
    master = rank == 0
    torch.manual_seed(cfg.seed)
    autocast = autocast_context(device)
    out_dir = checkpoint_dir(cfg.stage, cfg.tag())
    wandb_run = DummyWandb()
    if cfg.run != "dummy" and master:
        import wandb
        wandb_run = wandb.init(project="nano-deepseek-ocr", name=cfg.run, config=asdict(cfg))

    # ---- model and tokenizer: new from the init sources, from a checkpoint of ours, or resumed ----
    start_step, state, init_meta = 0, None, {}
    if prebuilt:
        model, tokenizer = prebuilt
        origin = "a model built by the caller"
    elif cfg.resume:
        ckpt = resolve_checkpoint(out_dir)
        model, tokenizer, init_meta = load_model(ckpt, device)
        start_step, state = init_meta["step"], load_training_state(ckpt, rank)
        origin = f"resumed from {ckpt} (step {start_step})"
    elif cfg.init_from:
        ckpt = resolve_checkpoint(cfg.init_from)
        model, tokenizer, init_meta = load_model(ckpt, device)
        origin = f"started from {ckpt}"
    else:
        model, tokenizer = new_model(cfg, device)
        origin = (f"new: GPT {'from ' + cfg.init_gpt if cfg.init_gpt else f'd{cfg.depth} from scratch'} "
                  f"(nanochat's {model.gpt_generation()} generation), encoder {cfg.init_encoder}")
    print0(origin)
    configure_model(model, cfg, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params, n_train = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable)
    frozen = "SAM frozen" if cfg.freeze_sam else "nothing frozen"
    print0(f"model: {n_params:,} parameters, {n_train:,} trainable ({frozen})")

    # ---- optimizers and data ----
    optimizers = model.setup_optimizers(cfg.unembedding_lr, cfg.embedding_lr, cfg.matrix_lr, cfg.vision_lr,
                                        cfg.weight_decay, adamw_lr=cfg.adamw_lr if cfg.optimizer == "adamw" else None)
    modes = cfg.modes.split(",")
    train_task, val_task = build_tasks(cfg, "train", world_size), build_tasks(cfg, "val", world_size)
    loader = VisionDataLoader(train_task, tokenizer, modes, cfg.device_batch_size, cfg.seq_len, rank, world_size,
                              seed=cfg.seed, num_workers=cfg.num_workers)
    tokens_per_micro_batch = cfg.device_batch_size * cfg.seq_len * world_size
    total_batch = cfg.total_batch_size or tokens_per_micro_batch
    if total_batch % tokens_per_micro_batch:
        raise ValueError(f"total_batch_size {total_batch} is not a multiple of device_batch_size x seq_len x ranks "
                         f"({tokens_per_micro_batch} tokens)")
    grad_accum = total_batch // tokens_per_micro_batch
    if state is not None:
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
    print0(f"{len(train_task):,} training samples, batch {total_batch:,} tokens = {cfg.device_batch_size} rows of "
           f"{cfg.seq_len} x {world_size} ranks x {grad_accum} accumulation steps, modes {modes}")

    # ---- the collapse watch: fixed distinct pages whose encoder outputs must stay apart ----
    collapse_views = collapse_watch_views(cfg.collapse_images, DeepseekOCRProcessor(modes[0]))
    peak = peak_flops(device)

    # ---- the loop ----
    train_iter = iter(loader)
    summary = dict(losses=[], steps=[], val_loss=None, similarity=[], samples=[], cer=[], cer_by_kind=[],
                   start_step=start_step, **trained_on(cfg, init_meta),
                   n_params=n_params, n_train=n_train, origin=origin, skipped_samples=[])
    t_start, dt_ema, step = time.time(), None, start_step
    while True:
        # evaluate: validation loss and image gap, the collapse watch, and reading held-out and training pages
        last = step >= cfg.num_iterations
        if cfg.eval_every > 0 and (last or step % cfg.eval_every == 0):
            summary.update(evaluate(model, cfg, val_task, tokenizer, rank, world_size, autocast))
            similarity = encoder_collapse(model, collapse_views, autocast) if collapse_views is not None else float("nan")
            summary["similarity"].append((step, similarity))
            print0(f"step {step:05d} | val loss {summary['val_loss']:.4f} | image gap blank {summary['gap_blank']:+.3f}"
                   f" other {summary['gap_other']:+.3f} | encoder similarity {similarity:.4f}")
            if similarity > cfg.collapse_warn:
                warn0(f"step {step:05d} | WARNING: encoder outputs are collapsing (similarity {similarity:.4f})")
            if step > start_step and summary["gap_blank"] < cfg.gap_warn:
                warn0(f"step {step:05d} | WARNING: the model barely looks at the image (a blank page costs it "
                      f"{summary['gap_blank']:+.3f} nats per token)")
            wandb_run.log(dict(step=step, val_loss=summary["val_loss"], gap_blank=summary["gap_blank"],
                               gap_other=summary["gap_other"], encoder_similarity=similarity))
            if master and cfg.cer_pages > 0:
                reader = reading_copy(model)
                heldout = read_pages(reader, tokenizer, val_task, cfg.cer_pages, modes[0], cfg.sample_tokens)
                training = read_pages(reader, tokenizer, train_task, cfg.cer_pages, modes[0], cfg.sample_tokens)
                del reader
                summary["cer"].append((step, character_error_rate(heldout), character_error_rate(training),
                                       len(heldout)))
                summary["cer_by_kind"].append((step, cer_by_kind(heldout, training)))
                summary["samples"] = heldout[:cfg.sample_count]
                kinds = "".join(f" | {k} {h:.3f} / {t:.3f} ({n})" for k, (h, t, n) in summary["cer_by_kind"][-1][1].items())
                print0(f"step {step:05d} | held-out CER {summary['cer'][-1][1]:.3f} ({len(heldout)} pages) | "
                       f"training CER {summary['cer'][-1][2]:.3f} ({len(training)} pages){kinds}")
                for expected, read, _ in summary["samples"]:
                    verdict = "EXACT" if read == expected else "differs"
                    print0(f"  {verdict} | expected {expected[:60]!r} | read {read[:60]!r}")
                wandb_run.log(dict(step=step, heldout_cer=summary["cer"][-1][1], training_cer=summary["cer"][-1][2]))
        if last:
            break

        # forward and backward over grad_accum micro-batches
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        flops, tokens, images = 0, 0, 0
        if step == cfg.skip_step:  # the batches that gave a non-finite loss: drawn and dropped
            for _ in range(grad_accum):
                next(train_iter)
            print0(f"step {step}: skipped its {grad_accum} batch(es) (--skip_step)")
        data_s = 0.0
        for _ in range(grad_accum):
            t_data = time.time()
            batch = next(train_iter)
            data_s += time.time() - t_data
            for detail in batch["skip_details"]:  # a bad file is named the first time; later skips are only counted
                if detail not in summary["skipped_samples"]:
                    warn0(f"skipped sample: {detail} (further skips are counted in the step lines)")
                    summary["skipped_samples"].append(detail)
            with autocast:
                loss = model(*(batch[k].to(device) for k in ("input_ids", "targets")), batch["images"],
                             doc_ids=batch["doc_ids"].to(device), positions=batch["positions"].to(device))
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
            flops += model.train_flops(batch["doc_lengths"], batch["images"])
            tokens += sum(batch["doc_lengths"])
            images += len(batch["images"])

        # a non-finite loss on any rank stops every rank before the update
        bad = (~torch.isfinite(loss_sum)).float()
        if ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            saved = [os.path.basename(c) for c in list_checkpoints(out_dir)]
            warn0(f"step {step}: the loss is not finite ({loss_sum.item() / grad_accum}); stopped before the update. "
                   f"The newest checkpoint ({saved[-1] if saved else 'none'} in {out_dir}) holds the weights that led "
                   f"here, and --resume replays the same batches: resume with --skip_step={step} to drop this step's "
                   f"batches, or with lower learning rates if the loss was climbing.")
            compute_cleanup()
            raise SystemExit(1)

        # the update: zero gradients for what this step did not reach, clip, schedule, step
        for p in trainable:  # parameters this step did not reach (encoder on text-only batches)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_opt = time.time()
        lrm = lr_multiplier(cfg, step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if "momentum" in group:
                    group["momentum"] = muon_momentum(step)
            opt.step()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        opt_s = time.time() - t_opt
        dt = time.time() - t0
        step += 1

        # logging
        loss_value = loss_sum.item() / grad_accum
        summary["losses"].append(loss_value)
        dt_ema = dt if dt_ema is None else 0.9 * dt_ema + 0.1 * dt
        mfu_value = flops / dt / (peak * world_size) if peak else None
        mfu = f"{100 * mfu_value:.1f}%" if peak else "-"
        eta = dt_ema * (cfg.num_iterations - step)
        skipped = f" | skipped {dict(loader.skipped)}" if loader.skipped else ""
        print0(f"step {step:05d}/{cfg.num_iterations} | loss {loss_value:.4f} | lrm {lrm:.3f} | "
               f"tok/s {tokens * world_size / dt:,.0f} | img/s {images * world_size / dt:.1f} | mfu {mfu} | "
               f"dt {dt * 1000:.0f}ms | eta {eta / 60:.1f}m" + skipped)
        wandb_run.log(dict(step=step, loss=loss_value, lrm=lrm, dt=dt, tokens_per_s=tokens * world_size / dt))
        summary["final_loss"] = loss_value
        summary["steps"].append(dict(dt=dt, data_s=data_s, opt_s=opt_s, tokens=tokens * world_size,
                                     images=images * world_size,
                                     tokens_per_s=tokens * world_size / dt, images_per_s=images * world_size / dt,
                                     mfu=mfu_value))

        # checkpoint
        if step == cfg.num_iterations or (cfg.save_every > 0 and step % cfg.save_every == 0):
            meta = dict(train_config=asdict(cfg), train_loss=loss_value, val_loss=summary["val_loss"],
                        world_size=world_size, heldout_cer=summary["cer"][-1][1] if summary["cer"] else None,
                        **trained_on(cfg, init_meta))
            summary["checkpoint"] = save_checkpoint(out_dir, step, model, tokenizer, meta, optimizers,
                                                    loader.state_dict(), rank, cfg.keep_checkpoints)
            print0(f"saved {summary['checkpoint']}")

    summary["elapsed"] = time.time() - t_start
    summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    summary["ranks_in_sync"] = ranks_in_sync(model)
    if ddp:
        print0(f"parameters identical on all {world_size} ranks: {summary['ranks_in_sync']}")
    if master:
        write_report(cfg, summary)
    wandb_run.finish()
    compute_cleanup()
    return summary


def write_report(cfg, summary):
    """This stage's section of report.md, with the CER curve beside it as a PNG."""
    val = "-" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
    unused = ("init_gpt", "init_gpt_step", "gpt_generation", "init_encoder", "sam_source", "clip_source", "deepseek_source", "depth",
              "encoder", "tokenizer", "vocab_size") if cfg.init_from or cfg.resume else ()  # the checkpoint's
    steps = summary["steps"]
    seconds = sum(s["dt"] for s in steps) or float("nan")
    mfus = [s["mfu"] for s in steps if s["mfu"] is not None]
    lines = [
        f"- {summary['origin']}",
        f"- trained on (with what it started from): {', '.join(summary['trained_on'])}, in "
        f"{' / '.join(summary['trained_modes'])} mode",
        f"- config: {', '.join(f'{k}={v}' for k, v in asdict(cfg).items() if k not in unused)}",
        f"- parameters: {summary['n_params']:,} ({summary['n_train']:,} trainable)",
        f"- steps {summary['start_step']} -> {summary['start_step'] + len(summary['losses'])}, "
        f"{summary['elapsed'] / 60:.1f} min; final train loss {summary.get('final_loss', float('nan')):.4f}; "
        f"val loss {val}",
        f"- throughput over the run's {len(steps)} steps: {sum(s['tokens'] for s in steps) / seconds:,.0f} tok/s, "
        f"{sum(s['images'] for s in steps) / seconds:.1f} img/s, "
        f"MFU {f'{100 * sum(mfus) / len(mfus):.1f}%' if mfus else '-'}",
        "- encoder similarity (collapse watch) at each eval: " +
        ", ".join(f"{step}: {sim:.4f}" for step, sim in summary["similarity"]),
    ]
    skipped = summary["skipped_samples"]
    if skipped:
        more = " ..." if len(skipped) > 20 else ""
        lines.append(f"- skipped samples ({len(skipped)}): " + "; ".join(skipped[:20]) + more)
    if summary["val_loss"] is not None:
        lines.append(f"- image gap (answer loss with a blank page / another page's image, minus with its own): "
                     f"{summary['gap_blank']:+.3f} / {summary['gap_other']:+.3f} nats per token")
    if summary["cer"]:
        _, heldout, training, n = summary["cer"][-1]
        curve = f"cer_{cfg.stage}_{cfg.tag()}.png"
        line_plot({"held-out CER": [(s, h) for s, h, _, _ in summary["cer"]],
                   "training CER": [(s, t) for s, _, t, _ in summary["cer"]]},
                  os.path.join(base_dir(), curve), "step", "character error rate")
        lines += [f"- held-out CER: {heldout:.3f} ({n} pages)", f"- training CER: {training:.3f} ({n} pages)"]
        first_step, before = summary["cer"][0][:2]
        if cfg.init_from and first_step == 0 and heldout > before:  # the same pages, read before the first step
            lines.append(f"- **this stage made the held-out CER worse**: {before:.3f} before its first step, "
                         f"{heldout:.3f} after it")
        lines += [f"- held-out CER on {kind} pages: {h:.3f} ({k} pages); training CER {t:.3f}"
                  for kind, (h, t, k) in summary["cer_by_kind"][-1][1].items()]
        lines += [
                  "- CER at each eval (step: held-out / training): " +
                  ", ".join(f"{s}: {h:.3f} / {t:.3f}" for s, h, t, _ in summary["cer"]),
                  f"![character error rate]({curve})"]
        lines += [f"- held-out page: expected `{e[:80]!r}` / read `{r[:80]!r}`" for e, r, _ in summary["samples"]]
    return append_report(f"Training {cfg.stage} ({cfg.tag()})", lines)
