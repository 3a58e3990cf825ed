"""
The one training loop behind both stages, and its report. A stage is a TrainConfig (what is frozen, which data,
seq_len, schedule); scripts/vis_tok_train.py (stage 1) and scripts/vis_mid_train.py (stage 2) only set its defaults.
No DDP wrapper, as in nanochat: DistMuon / DistAdamW average the gradients themselves, so parameters a batch does not
touch (the encoder on a text-only batch) just count as zero gradients.
"""
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist

from checkpoint import (save_checkpoint, resolve_checkpoint, list_checkpoints, load_training_state, set_rng_state,
                        learned_after)
from common import (compute_init, compute_cleanup, print0, warn0, DummyWandb, append_report, autocast_context,
                    line_plot, UserError, choice, check_choices)
from config import base_dir, checkpoint_dir, tokenizer_dir, MODES
from dataloader import VisionDataLoader
from evaluation import collapse_watch_views, evaluate
from nano_deepseek_ocr import INIT_ENCODERS, ModelSources, check_modes, encoder_version, load_model, new_model
from tasks.mixture import mixture
from tasks.synthetic import KINDS, READING_KINDS


@dataclass
class TrainConfig(ModelSources):
    stage: str = "stage1"                  # names the checkpoint directory
    run: str = "dummy"                     # wandb run name; "dummy" logs nowhere (nanochat's convention)
    model_tag: str = ""                    # checkpoint subdirectory; default d{depth} (+ "-tiny" for the tiny encoder)
    device_type: str = choice("", ("", "cuda", "cpu", "mps"))  # empty = autodetect
    seed: int = 42
    init_from: str = ""                    # one of our checkpoints (run or step directory) to start from
    freeze_sam: bool = False               # stage 2 freezes SAM + net_2 + net_3
    freeze_encoder: bool = False           # DeepSeek-OCR 2's stage 3: the vision side all frozen, the GPT alone trains
    activation_checkpointing: bool = False # recompute SAM's global blocks in backward
    compile: bool = True                   # torch.compile the encoder and the GPT (CUDA only; the first steps compile)
    # data
    data: str = choice("synthetic", ("reading", "synthetic", "real"))  # reading pages | synthetic pages | the 9 sets
    reading: str = choice("grid", READING_KINDS, many=True, weighted=True)  # reading pages: kind:weight,...
    text_fraction: float = 0.0             # share of text-only samples (stage 2: 0.1)
    num_synthetic: int = 20000             # synthetic pages (reading: the length of the stream)
    synthetic_kinds: str = choice("document,table,chart,formula", KINDS, many=True)  # kinds of synthetic page
    synthetic_min_size: int = 512
    synthetic_max_size: int = 1024
    max_samples: int = 0                   # per real dataset; 0 = all
    modes: str = choice("base", MODES, many=True)  # with several, each sample has a fixed one
    seq_len: int = 4096
    device_batch_size: int = 4             # rows of seq_len tokens per micro-batch, whole samples packed into each
    total_batch_size: int = 0              # tokens per optimizer step; 0 = device_batch_size x seq_len x ranks
    num_workers: int = min(4, os.cpu_count() or 1)  # loader processes: no more than the cores
    # optimisation
    num_iterations: int = 1000
    optimizer: str = choice("muon", ("muon", "adamw"))  # muon: Muon for GPT matrices + AdamW | adamw: everywhere
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    vision_lr: float = 5e-5
    adamw_lr: float = 5e-5
    weight_decay: float = 0.0
    schedule: str = choice("cosine", ("cosine", "step"))  # warmup then cosine | step: x step_gamma at each milestone
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
    overwrite: bool = False                # a new run where this stage and tag have checkpoints: delete them first
    skip_step: int = -1                    # drop the batches of this step (one that gave a non-finite loss) on resume

    def tag(self):
        return self.model_tag or f"d{self.depth}" + ("" if self.encoder == "full" else f"-{self.encoder}")

    def sources(self):
        """The init sources of a new model: the ModelSources fields of this config."""
        return ModelSources(**{f.name: getattr(self, f.name) for f in fields(ModelSources)})


def lr_multiplier(cfg, step):
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.num_iterations - cfg.warmup_steps)
        return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    passed = sum(step >= float(m) * cfg.num_iterations for m in cfg.step_milestones.split(","))
    return cfg.step_gamma ** passed


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


def reading_kinds(spec):
    """--reading 'grid:0.3,type:0.7' (a bare kind weighs 1; the field's choices checked it) -> [(kind, weight)]."""
    return [(k, float(w or 1)) for k, _, w in (part.partition(":") for part in spec.split(","))]


def build_tasks(cfg, split, world_size):
    """The training mixture, or the validation one: enough samples for the eval batches and for cer_pages pages
    among its text-only samples."""
    pages = math.ceil(1.5 * max(cfg.cer_pages, cfg.sample_count) / (1 - cfg.text_fraction))
    n_eval = max(cfg.eval_batches * cfg.device_batch_size * world_size, pages, 1)
    synthetic = dict(num_samples=cfg.num_synthetic, kinds=cfg.synthetic_kinds.split(","),
                     sizes=(cfg.synthetic_min_size, cfg.synthetic_max_size), reading=reading_kinds(cfg.reading))
    return mixture(cfg.data, split, cfg.seed, None if split == "train" else n_eval, cfg.text_fraction,
                   cfg.max_samples, synthetic)


def trained_data(cfg):
    """What this run trains on, in words, for the checkpoint's record of what it learned."""
    if cfg.data == "reading":
        data = f"reading pages ({', '.join(k for k, _ in reading_kinds(cfg.reading))})"
    else:
        data = f"synthetic pages ({cfg.synthetic_kinds})" if cfg.data == "synthetic" else "the nine datasets"
    return data + (f" + {cfg.text_fraction:.0%} text" if cfg.text_fraction else "")


def configure_model(model, cfg, device):
    """What the stage's config sets on a built model: what is frozen, activation checkpointing in SAM's global blocks
    (they dominate activation memory at 1024 px), compilation."""
    for name, p in model.named_parameters():
        vision, sam = not name.startswith("gpt."), name.startswith("encoder.sam_model.")
        if cfg.freeze_encoder and vision or cfg.freeze_sam and sam:
            p.requires_grad_(False)
    model.encoder.sam_model.grad_checkpointing = cfg.activation_checkpointing
    if cfg.compile and device.type == "cuda":  # in place: parameter names stay as they are in checkpoints
        for part in (model.encoder, model.gpt):
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
    """The ordinary mistakes, each one line before anything slow: a value outside a field's choices, modes or weights
    that do not fit the encoder, a collapse watch of one page, --resume with nothing to resume, a new model without a
    tokenizer."""
    check_choices(cfg)
    for name in ("device_batch_size", "seq_len", "num_iterations", "num_workers", "eval_batches", "total_batch_size",
                 "save_every", "eval_every", "keep_checkpoints", "cer_pages", "sample_count", "sample_tokens"):
        least = 1 if name in ("device_batch_size", "seq_len", "sample_tokens") else 0
        if getattr(cfg, name) < least:
            raise UserError(f"--{name}={getattr(cfg, name)}: {'a positive' if least else 'a non-negative'} integer, "
                            "please")
    try:
        milestones = [float(m) for m in cfg.step_milestones.split(",")]
    except ValueError:
        milestones = [-1.0]
    if not all(0 < m <= 1 for m in milestones):
        raise UserError(f"--step_milestones={cfg.step_milestones}: fractions of num_iterations in (0, 1], "
                        "comma-separated (0.6,0.85)")
    existing = [os.path.basename(c) for c in list_checkpoints(checkpoint_dir(cfg.stage, cfg.tag()))]
    if existing and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{checkpoint_dir(cfg.stage, cfg.tag())} already holds a run ({', '.join(existing[-3:])}): "
                        "--resume continues it, --overwrite replaces it, another --model_tag keeps both")
    if not (cfg.resume or cfg.init_from):  # else the checkpoint's encoder decides, once it is loaded
        check_modes(cfg.modes.split(","), encoder_version(cfg.encoder))
        if INIT_ENCODERS[cfg.init_encoder] not in (None, encoder_version(cfg.encoder)):
            raise UserError(f"--init_encoder={cfg.init_encoder} is for the {INIT_ENCODERS[cfg.init_encoder]} encoder, "
                            f"not --encoder={cfg.encoder}")
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


def log_eval(cfg, step, metrics, samples, warn_gap):
    """An eval's lines in the log, and its warnings: a collapsing encoder, a model that barely looks."""
    m = metrics
    print0(f"step {step:05d} | val loss {m['val_loss']:.4f} | image gap blank {m['gap_blank']:+.3f} other "
           f"{m['gap_other']:+.3f} | encoder similarity {m['encoder_similarity']:.4f}")
    if m["encoder_similarity"] > cfg.collapse_warn:
        warn0(f"step {step:05d} | WARNING: encoder outputs are collapsing (similarity {m['encoder_similarity']:.4f})")
    if warn_gap and m["gap_blank"] < cfg.gap_warn:
        warn0(f"step {step:05d} | WARNING: the model barely looks at the image (a blank page costs it "
              f"{m['gap_blank']:+.3f} nats per token)")
    if "heldout_cer" in m:
        kinds = "".join(f" | {k[12:]} {v:.3f} / {m['training_cer/' + k[12:]]:.3f} ({m['cer_pages/' + k[12:]]})"
                        for k, v in m.items() if k.startswith("heldout_cer/"))
        print0(f"step {step:05d} | held-out CER {m['heldout_cer']:.3f} ({m['cer_pages']} pages) | training CER "
               f"{m['training_cer']:.3f} ({m['cer_pages']} pages){kinds}")
        for expected, read, _ in samples:
            print0(f"  {'EXACT' if read == expected else 'differs'} | expected {expected[:60]!r} | read {read[:60]!r}")


def train(cfg):
    """One training run of cfg. Returns what it measured: dict(start_step, losses, steps, history, skipped_samples,
    checkpoint, elapsed, peak_memory_gib); history holds every eval's metrics with its step."""
    check_config(cfg)
    ddp, rank, local_rank, world_size, device = compute_init(cfg.device_type or None)
    master = rank == 0
    torch.manual_seed(cfg.seed)
    autocast = autocast_context(device)
    out_dir = checkpoint_dir(cfg.stage, cfg.tag())
    try:  # the checkpoint this run starts from, verified once, before anything is written or built
        ckpt = resolve_checkpoint(out_dir if cfg.resume else cfg.init_from) if cfg.resume or cfg.init_from else None
    except FileNotFoundError as e:
        raise UserError(f"--init_from: {e}") from None
    wandb_run = DummyWandb()
    if cfg.run != "dummy" and master:
        import wandb
        wandb_run = wandb.init(project="nano-deepseek-ocr", name=cfg.run, config=asdict(cfg))

    if cfg.overwrite and not cfg.resume and master:  # what the run it replaces wrote goes first
        for old in list_checkpoints(out_dir):
            shutil.rmtree(old)

    # ---- model and tokenizer: new from the init sources, from a checkpoint of ours, or resumed ----
    start_step, state, init_meta = 0, None, {}
    if cfg.resume:
        model, tokenizer, init_meta = load_model(ckpt, device)
        start_step, state = init_meta["step"], load_training_state(ckpt, rank)
        origin = f"resumed from {ckpt} (step {start_step})"
    elif cfg.init_from:
        model, tokenizer, init_meta = load_model(ckpt, device)
        origin = f"started from {ckpt}"
    else:
        model, tokenizer = new_model(cfg.sources(), cfg.seq_len, device)
        origin = (f"new: GPT {'from ' + cfg.init_gpt if cfg.init_gpt else f'd{cfg.depth} from scratch'} "
                  f"(nanochat's {model.config.gpt.generation} generation), encoder {cfg.encoder} {cfg.init_encoder}")
    print0(origin)
    check_modes(cfg.modes.split(","), model.encoder_version)
    record = learned_after(init_meta, trained_data(cfg), cfg.modes.split(","))  # what its checkpoints will have learned
    configure_model(model, cfg, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params, n_train = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable)
    frozen = "the encoder" if cfg.freeze_encoder else "SAM" if cfg.freeze_sam else "nothing"
    print0(f"model: {n_params:,} parameters, {n_train:,} trainable ({frozen} frozen)")

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
    if state is not None:  # resume: the optimizers, the loader's place and the RNG as they were
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
    print0(f"{len(train_task):,} training samples, batch {total_batch:,} tokens = {cfg.device_batch_size} rows of "
           f"{cfg.seq_len} x {world_size} ranks x {grad_accum} accumulation steps, modes {modes}")
    collapse_views = collapse_watch_views(cfg.collapse_images, modes[0])  # fixed distinct pages, kept apart
    peak = peak_flops(device)

    # ---- the loop: what it measures is kept in named lists, and every eval in the history ----
    train_iter = iter(loader)
    losses, steps, history, samples, skipped, checkpoint = [], [], [], [], [], None
    t_start, dt_ema, step = time.time(), None, start_step
    while True:
        # evaluate: validation loss and image gap, the collapse watch, and reading held-out and training pages
        last = step >= cfg.num_iterations
        if cfg.eval_every > 0 and (last or step % cfg.eval_every == 0):
            metrics, heldout = evaluate(model, tokenizer, val_task, train_task, modes,
                                        batch_size=cfg.device_batch_size, seq_len=cfg.seq_len,
                                        batches=cfg.eval_batches, cer_pages=cfg.cer_pages, max_tokens=cfg.sample_tokens,
                                        collapse_views=collapse_views, rank=rank, world_size=world_size)
            history.append(dict(step=step, **metrics))
            samples = heldout[:cfg.sample_count] or samples
            log_eval(cfg, step, metrics, samples, warn_gap=step > start_step)
            wandb_run.log(dict(step=step, **metrics))
        if last:
            break

        # forward and backward over grad_accum micro-batches
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        flops, tokens, images, data_s = 0, 0, 0, 0.0
        if step == cfg.skip_step:  # the batches that gave a non-finite loss: drawn and dropped
            for _ in range(grad_accum):
                next(train_iter)
            print0(f"step {step}: skipped its {grad_accum} batch(es) (--skip_step)")
        for _ in range(grad_accum):
            t_data = time.time()
            batch = next(train_iter)
            data_s += time.time() - t_data
            for detail in batch["skip_details"]:  # a bad file is named the first time; later skips are only counted
                if detail not in skipped:
                    warn0(f"skipped sample: {detail} (further skips are counted in the step lines)")
                    skipped.append(detail)
            with autocast:
                loss = model.batch_loss(batch)
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
            torch.cuda.synchronize()  # so the optimizer's share of the step is timed alone
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
        losses.append(loss_sum.item() / grad_accum)
        dt_ema = dt if dt_ema is None else 0.9 * dt_ema + 0.1 * dt
        mfu = flops / dt / (peak * world_size) if peak else None
        steps.append(dict(dt=dt, data_s=data_s, opt_s=opt_s, tokens=tokens * world_size, images=images * world_size,
                          mfu=mfu))
        eta = dt_ema * (cfg.num_iterations - step)
        more = f" | skipped {dict(loader.skipped)}" if loader.skipped else ""
        print0(f"step {step:05d}/{cfg.num_iterations} | loss {losses[-1]:.4f} | lrm {lrm:.3f} | "
               f"tok/s {tokens * world_size / dt:,.0f} | img/s {images * world_size / dt:.1f} | "
               f"mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'} | dt {dt * 1000:.0f}ms | eta {eta / 60:.1f}m" + more)
        wandb_run.log(dict(step=step, loss=losses[-1], lrm=lrm, dt=dt, tokens_per_s=tokens * world_size / dt))

        # checkpoint
        if step == cfg.num_iterations or (cfg.save_every > 0 and step % cfg.save_every == 0):
            cer = [h["heldout_cer"] for h in history if "heldout_cer" in h]
            meta = dict(train_config=asdict(cfg), train_loss=losses[-1], world_size=world_size,
                        val_loss=history[-1]["val_loss"] if history else None, heldout_cer=cer[-1] if cer else None,
                        **record)
            checkpoint = save_checkpoint(out_dir, step, model, tokenizer, meta, optimizers, loader.state_dict(), rank,
                                         cfg.keep_checkpoints)
            print0(f"saved {checkpoint}")

    elapsed = time.time() - t_start
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    in_sync = ranks_in_sync(model)
    if ddp:
        print0(f"parameters identical on all {world_size} ranks: {in_sync}")
    if master:
        write_report(cfg, origin, record, (n_params, n_train), start_step, losses, steps, history, samples, skipped,
                     elapsed)
    wandb_run.finish()
    compute_cleanup()
    return dict(start_step=start_step, losses=losses, steps=steps, history=history, skipped_samples=skipped,
                checkpoint=checkpoint, elapsed=elapsed, peak_memory_gib=peak_memory)


def write_report(cfg, origin, record, n_params, start_step, losses, steps, history, samples, skipped, elapsed):
    """This stage's section of report.md, with the CER curve beside it as a PNG. record: what the checkpoints learned
    (checkpoint.learned_after); n_params: (all, trainable); the rest as train() keeps them."""
    last = history[-1] if history else {}
    val = f"{last['val_loss']:.4f}" if last else "-"
    sources = {f.name for f in fields(ModelSources)} if cfg.init_from or cfg.resume else set()  # the checkpoint's
    defaults = asdict(TrainConfig())
    seconds = sum(s["dt"] for s in steps) or float("nan")
    mfus = [s["mfu"] for s in steps if s["mfu"] is not None]
    lines = [
        f"- {origin}",
        f"- trained on (with what it started from): {', '.join(record['trained_on'])}, in "
        f"{' / '.join(record['trained_modes'])} mode",
        "- what it can read: pages like those, in that mode; other kinds of page (and real documents, unless listed) "
        "it has never been shown, and it reads them poorly or not at all",
        "- options set (the rest are TrainConfig's defaults): " +
        ", ".join(f"{k}={v}" for k, v in asdict(cfg).items() if k not in sources and v != defaults[k]),
        f"- parameters: {n_params[0]:,} ({n_params[1]:,} trainable)",
        f"- steps {start_step} -> {start_step + len(losses)}, {elapsed / 60:.1f} min; final train loss "
        f"{losses[-1] if losses else float('nan'):.4f}; val loss {val}",
        f"- throughput over the run's {len(steps)} steps: {sum(s['tokens'] for s in steps) / seconds:,.0f} tok/s, "
        f"{sum(s['images'] for s in steps) / seconds:.1f} img/s, "
        f"MFU {f'{100 * sum(mfus) / len(mfus):.1f}%' if mfus else '-'}",
        "- encoder similarity (collapse watch) at each eval: " +
        ", ".join(f"{h['step']}: {h['encoder_similarity']:.4f}" for h in history),
    ]
    if skipped:
        lines.append(f"- skipped samples ({len(skipped)}): " + "; ".join(skipped[:20]) + (" ..." if len(skipped) > 20
                                                                                           else ""))
    if last:
        lines.append(f"- image gap (answer loss with a blank page / another page's image, minus with its own): "
                     f"{last['gap_blank']:+.3f} / {last['gap_other']:+.3f} nats per token")
    cer = [h for h in history if "heldout_cer" in h]
    if cer:
        end = cer[-1]
        curve = f"cer_{cfg.stage}_{cfg.tag()}.png"
        line_plot({"held-out CER": [(h["step"], h["heldout_cer"]) for h in cer],
                   "training CER": [(h["step"], h["training_cer"]) for h in cer]},
                  os.path.join(base_dir(), curve), "step", "character error rate",
                  f"{cfg.stage} ({cfg.tag()}): character error rate on {end['cer_pages']} pages")
        lines += [f"- held-out CER: {end['heldout_cer']:.3f} ({end['cer_pages']} pages)",
                  f"- training CER: {end['training_cer']:.3f} ({end['cer_pages']} pages)"]
        if cfg.init_from and cer[0]["step"] == 0 and end["heldout_cer"] > cer[0]["heldout_cer"]:  # the same pages
            lines.append(f"- **this stage made the held-out CER worse**: {cer[0]['heldout_cer']:.3f} before its first "
                         f"step, {end['heldout_cer']:.3f} after it")
        lines += [f"- held-out CER on {k[12:]} pages: {v:.3f} ({end['cer_pages/' + k[12:]]} pages); training CER "
                  f"{end['training_cer/' + k[12:]]:.3f}" for k, v in end.items() if k.startswith("heldout_cer/")]
        lines += ["- CER at each eval (step: held-out / training): " +
                  ", ".join(f"{h['step']}: {h['heldout_cer']:.3f} / {h['training_cer']:.3f}" for h in cer),
                  f"![character error rate]({curve})"]
        lines += [f"- held-out page: expected `{e[:80]!r}` / read `{r[:80]!r}`" for e, r, _ in samples]
    return append_report(f"Training {cfg.stage} ({cfg.tag()})", lines)
