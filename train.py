"""
The one training loop behind both stages. A stage is a TrainConfig (what is frozen, which data, seq_len,
schedule); scripts/vis_tok_train.py (stage 1) and scripts/vis_mid_train.py (stage 2) only set its defaults.
No DDP wrapper, as in nanochat: DistMuon / DistAdamW average the gradients themselves, so parameters a
batch does not touch (the encoder on a text-only batch) just count as zero gradients.
"""
import math
import time
from dataclasses import dataclass, asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import save_checkpoint, resolve_checkpoint, load_model, load_training_state, set_rng_state, new_model
from common import compute_init, compute_cleanup, print0, DummyWandb, append_report, autocast_context
from config import checkpoint_dir, MODES
from dataloader import VisionDataLoader
from engine import Engine
from image_process import DeepseekOCRProcessor, ImageError, load_image
from tasks.mixture import mixture
from tasks.synthetic import SyntheticPages


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
    init_gpt_step: int = -1                # its step; -1 = the last
    init_encoder: str = "sam+clip"         # sam+clip | deepseek | random
    sam_source: str = "facebook/sam-vit-base"
    clip_source: str = "openai/clip-vit-large-patch14"
    deepseek_source: str = "deepseek-ai/DeepSeek-OCR"
    init_from: str = ""                    # one of our checkpoints (run or step directory) to start from
    tokenizer: str = ""                    # tokenizer directory; empty = the nanochat checkpoint's, else the base dir's
    vocab_size: int = 0                    # GPT rows when larger than the tokenizer's (e.g. 65536 to benchmark d20's true cost)
    freeze_sam: bool = False               # stage 2 freezes SAM + net_2 + net_3
    activation_checkpointing: bool = False # recompute SAM's global blocks in backward
    compile: bool = False
    # data
    data: str = "synthetic"                # synthetic | real (the nine datasets)
    text_fraction: float = 0.0             # share of text-only samples (stage 2: 0.1)
    num_synthetic: int = 20000
    synthetic_kinds: str = "document,table,chart,formula"
    synthetic_min_size: int = 512
    synthetic_max_size: int = 1024
    max_samples: int = 0                   # per real dataset; 0 = all
    modes: str = "base"                    # comma-separated; with several, each sample has a fixed one
    seq_len: int = 4096
    device_batch_size: int = 4
    total_batch_size: int = 0              # samples per optimizer step; 0 = device_batch_size x ranks
    num_workers: int = 4
    # optimisation
    num_iterations: int = 1000
    optimizer: str = "muon"                # muon (Muon for GPT matrices + AdamW) | adamw (AdamW everywhere, at adamw_lr)
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
    sample_count: int = 4                  # training samples read back at each eval
    sample_tokens: int = 256
    save_every: int = 500
    resume: bool = False

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
    """The training mixture, or the validation one: enough samples for the eval batches and the read-back."""
    n_eval = max(cfg.eval_batches * cfg.device_batch_size * world_size, cfg.sample_count, 1)
    synthetic = dict(num_samples=cfg.num_synthetic, kinds=cfg.synthetic_kinds.split(","),
                     sizes=(cfg.synthetic_min_size, cfg.synthetic_max_size))
    return mixture(cfg.data, split, cfg.seed, None if split == "train" else n_eval, cfg.text_fraction,
                   cfg.max_samples, synthetic)


@torch.no_grad()
def evaluate(model, cfg, val_task, tokenizer, rank, world_size, autocast):
    """Mean validation loss per target token over cfg.eval_batches batches (all ranks together)."""
    model.eval()
    loader = VisionDataLoader(val_task, tokenizer, cfg.modes.split(","), cfg.device_batch_size, cfg.seq_len, rank,
                              world_size, seed=0, num_workers=0, shuffle=False)
    total = torch.zeros(2, device=model.image_newline.device)
    for _, batch in zip(range(cfg.eval_batches), loader):
        targets = batch["targets"].to(total.device)
        with autocast:
            loss = model(batch["input_ids"].to(total.device), targets, batch["images"], loss_reduction="sum")
        total[0] += loss.float()
        total[1] += (targets != -1).sum()
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def encoder_collapse(model, views, autocast):
    """Mean pairwise cosine similarity of the encoder outputs of distinct images: near 1 means every page looks alike."""
    model.eval()
    with autocast:
        features = model.encoder(views.to(model.image_newline.device)).flatten(1).float()
    model.train()
    sim = F.normalize(features, dim=-1) @ F.normalize(features, dim=-1).T
    n = sim.size(0)
    return ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()


def read_back(model, tokenizer, task, cfg, mode):
    """Greedy-read a few training samples and print them against their ground truth (shows memorisation/progress).
    A sample whose image cannot be read is reported and passed over."""
    samples = [task[i] for i in range(min(cfg.sample_count, len(task)))]
    pages = []
    for i, sample in enumerate(samples):
        if "image_path" not in sample:
            continue
        try:
            pages.append((i, load_image(sample["image_path"]), sample["text"]))
        except ImageError as e:
            print0(f"  sample {i}: skipped, {e}")
    model.eval()
    pairs = []
    for i, generated in sorted(Engine(model, tokenizer).read_iter(pages, mode, cfg.sample_tokens)):
        expected = samples[i]["response"]
        pairs.append((expected, generated))
        print0(f"  sample {i}: {'EXACT' if generated == expected else 'differs'} | {generated[:100]!r}")
    model.train()
    return pairs


def ranks_in_sync(model):
    """Whether every rank holds the same parameters (per-tensor float64 sum and sum of squares, compared across ranks)."""
    if not dist.is_initialized():
        return True
    stats = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                         for p in model.parameters()])
    gathered = [torch.zeros_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, stats)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def train(cfg):
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
    start_step, state = 0, None
    if cfg.resume:
        ckpt = resolve_checkpoint(out_dir)
        model, tokenizer, meta = load_model(ckpt, device)
        start_step, state = meta["step"], load_training_state(ckpt, rank)
        print0(f"resuming from {ckpt} (step {start_step})")
    elif cfg.init_from:
        ckpt = resolve_checkpoint(cfg.init_from)
        model, tokenizer, _ = load_model(ckpt, device)
        print0(f"starting from {ckpt}")
    else:
        model, tokenizer = new_model(cfg, device)
    if cfg.freeze_sam:
        model.encoder.freeze_sam()
    model.encoder.set_activation_checkpointing(cfg.activation_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params, n_train = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable)
    frozen = "SAM frozen" if cfg.freeze_sam else "nothing frozen"
    print0(f"model: {n_params:,} parameters, {n_train:,} trainable ({frozen})")

    # ---- optimizers and data ----
    optimizers = model.setup_optimizers(cfg.unembedding_lr, cfg.embedding_lr, cfg.matrix_lr, cfg.vision_lr,
                                        cfg.weight_decay, adamw_lr=cfg.adamw_lr if cfg.optimizer == "adamw" else None)
    forward = torch.compile(model) if cfg.compile else model
    modes = cfg.modes.split(",")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; modes are {list(MODES)}")
    train_task, val_task = build_tasks(cfg, "train", world_size), build_tasks(cfg, "val", world_size)
    loader = VisionDataLoader(train_task, tokenizer, modes, cfg.device_batch_size, cfg.seq_len, rank, world_size,
                              seed=cfg.seed, num_workers=cfg.num_workers, pad_to_seq_len=cfg.compile)
    total_batch = cfg.total_batch_size or cfg.device_batch_size * world_size
    if total_batch % (cfg.device_batch_size * world_size):
        raise ValueError(f"total_batch_size {total_batch} is not a multiple of device_batch_size x ranks")
    grad_accum = total_batch // (cfg.device_batch_size * world_size)
    if state is not None:
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
    print0(f"{len(train_task):,} training samples, batch {total_batch} = {cfg.device_batch_size} x {world_size} ranks "
           f"x {grad_accum} accumulation steps, seq_len {cfg.seq_len}, modes {modes}")

    # ---- the collapse watch: fixed distinct pages whose encoder outputs must stay apart ----
    collapse_pages = SyntheticPages(cfg.collapse_images, seed=12345, sizes=(768, 1024))
    processor = DeepseekOCRProcessor(modes[0])
    collapse_views = torch.stack([processor.process_image(load_image(collapse_pages[i]["image_path"]))["pixel_values"]
                                  for i in range(len(collapse_pages))])
    peak = peak_flops(device)

    # ---- the loop ----
    train_iter = iter(loader)
    summary = dict(losses=[], steps=[], val_loss=None, collapse=None, samples=[], start_step=start_step,
                   n_params=n_params, n_train=n_train)
    t_start, dt_ema, step = time.time(), None, start_step
    while True:
        # evaluate: validation loss, the collapse watch, and a read-back of training pages
        last = step >= cfg.num_iterations
        if cfg.eval_every > 0 and (last or step % cfg.eval_every == 0):
            summary["val_loss"] = evaluate(model, cfg, val_task, tokenizer, rank, world_size, autocast)
            summary["collapse"] = encoder_collapse(model, collapse_views, autocast)
            warn = "  WARNING: encoder outputs are collapsing" if summary["collapse"] > cfg.collapse_warn else ""
            print0(f"step {step:05d} | val loss {summary['val_loss']:.4f} | "
                   f"encoder similarity {summary['collapse']:.4f}{warn}")
            wandb_run.log(dict(step=step, val_loss=summary["val_loss"], encoder_similarity=summary["collapse"]))
            if master and cfg.sample_count > 0 and step > start_step:  # nothing worth reading before training
                summary["samples"] = read_back(model, tokenizer, train_task, cfg, modes[0])
        if last:
            break

        # forward and backward over grad_accum micro-batches
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        flops, tokens, images = 0, 0, 0
        for _ in range(grad_accum):
            batch = next(train_iter)
            input_ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
            with autocast:
                loss = forward(input_ids, targets, batch["images"])
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
            flops += model.train_flops(input_ids.numel(), input_ids.size(1), batch["images"])
            tokens += int((input_ids != loader.pad_id).sum())
            images += len(batch["images"])

        # a non-finite loss on any rank stops every rank before the update
        bad = (~torch.isfinite(loss_sum)).float()
        if ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            print0(f"step {step}: loss is {loss_sum.item() / grad_accum} - stopping before the update; "
                   f"the last good checkpoint in {out_dir} is untouched")
            compute_cleanup()
            raise SystemExit(1)

        # the update: zero gradients for what this step did not reach, clip, schedule, step
        for p in trainable:  # parameters this step did not reach (encoder on text-only batches)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
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
        summary.update(final_loss=loss_value, tokens_per_s=tokens * world_size / dt,
                       images_per_s=images * world_size / dt, mfu=mfu)
        summary["steps"].append(dict(dt=dt, tokens_per_s=tokens * world_size / dt,
                                     images_per_s=images * world_size / dt, mfu=mfu_value))

        # checkpoint
        if step == cfg.num_iterations or (cfg.save_every > 0 and step % cfg.save_every == 0):
            meta = dict(train_config=asdict(cfg), train_loss=loss_value, val_loss=summary["val_loss"],
                        world_size=world_size)
            summary["checkpoint"] = save_checkpoint(out_dir, step, model, tokenizer, meta, optimizers,
                                                    loader.state_dict(), rank)
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
    """This stage's section of report.md."""
    val = "-" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
    append_report(f"Training {cfg.stage} ({cfg.tag()})", [
        f"- config: {', '.join(f'{k}={v}' for k, v in asdict(cfg).items())}",
        f"- parameters: {summary['n_params']:,} ({summary['n_train']:,} trainable)",
        f"- steps {summary['start_step']} -> {summary['start_step'] + len(summary['losses'])}, "
        f"{summary['elapsed'] / 60:.1f} min; final train loss {summary.get('final_loss', float('nan')):.4f}; "
        f"val loss {val}",
        f"- throughput: {summary.get('tokens_per_s', 0):,.0f} tok/s, {summary.get('images_per_s', 0):.1f} img/s, "
        f"MFU {summary.get('mfu', '-')}",
        f"- encoder similarity (collapse watch): {summary['collapse']}",
        *[f"- sample: expected `{e[:80]!r}` / generated `{g[:80]!r}`" for e, g in summary["samples"]],
    ])
