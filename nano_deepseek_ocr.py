"""
NanoDeepseekOCR: DeepSeek-OCR's DeepEncoder (SAM-ViT-B -> 16x conv compressor -> CLIP-L/14 -> projector), or
DeepSeek-OCR 2's DeepEncoderV2 (SAM-ViT-B -> compressor -> Qwen2 stack with learned queries -> projector), feeding a
nanochat GPT.
Images become runs of <image> slots in the token sequence; their embeddings are laid out DeepSeek-style (v1: a newline
vector after every grid row; both: tiles before the global view, a separator last) and scattered over the slots. The
loss is nanochat's: cross-entropy with ignore_index=-1.

Every model is made by build_model (meta -> to_empty -> init -> load), whatever its weights come from: init sources
(new_model), our checkpoints (load_model), a nanochat checkpoint (load_nanochat), or the model being trained
(reading_copy).
"""
import glob
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from checkpoint import CheckpointError, load_meta, load_weights
from common import UserError, choice, compute_dtype, print0
from config import MODES, tokenizer_dir
from deepencoder.clip_sdpa import CLIPConfig
from deepencoder.encoder import DeepEncoder, DeepEncoderV2, ENCODERS, encoder_configs
from deepencoder.load_pretrained import (load_sam, load_clip, load_deepseek_ocr_encoder, load_deepseek_ocr2_encoder,
                                         load_qwen2)
from deepencoder.qwen2_encoder import Qwen2EncoderConfig
from deepencoder.sam_vary_sdpa import SAMConfig
from gpt import GENERATIONS, GPT, GPTConfig, gpt_config_for_depth
from hub import hub_list_files, hub_file
from tokenizer import RustBPETokenizer


@dataclass
class NanoDeepseekOCRConfig:
    """The encoder is DeepSeek-OCR's (clip) or DeepSeek-OCR 2's (qwen2 instead, and clip None)."""
    sam: SAMConfig = field(default_factory=SAMConfig)
    clip: CLIPConfig | None = field(default_factory=CLIPConfig)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    image_token_id: int = 0
    qwen2: Qwen2EncoderConfig | None = None

    @classmethod
    def from_dict(cls, d):
        sam = dict(d["sam"], global_attn_indexes=tuple(d["sam"]["global_attn_indexes"]))
        gpt = dict(d["gpt"])
        gpt.setdefault("generation", "2026" if gpt.get("lambdas") else "2025")  # written before the name was
        qwen2 = d.get("qwen2") and Qwen2EncoderConfig(**dict(d["qwen2"], query_sizes=tuple(d["qwen2"]["query_sizes"])))
        clip = d["clip"] and CLIPConfig(**d["clip"])
        return cls(SAMConfig(**sam), clip, GPTConfig(**gpt), d["image_token_id"], qwen2)


class NanoDeepseekOCR(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        n_embd = config.gpt.n_embd
        if config.qwen2 is None:
            self.encoder = DeepEncoder(config.sam, config.clip, n_embd)
            self.image_newline = nn.Parameter(torch.empty(n_embd))
        else:  # DeepEncoder V2: no newline vectors
            self.encoder = DeepEncoderV2(config.sam, config.qwen2, n_embd)
            self.image_newline = None
        self.view_seperator = nn.Parameter(torch.empty(n_embd))  # sic: DeepSeek-OCR's checkpoint spelling
        self.gpt = GPT(config.gpt)
        self.image_token_id = config.image_token_id

    @property
    def device(self):
        return self.view_seperator.device

    @property
    def encoder_version(self):
        """v1 (DeepSeek-OCR's DeepEncoder) or v2 (DeepSeek-OCR 2's): which modes (config.MODES) it reads in."""
        return "v1" if self.config.qwen2 is None else "v2"

    def init_weights(self):
        self.encoder.init_weights()
        std = self.config.gpt.n_embd ** -0.5
        if self.image_newline is not None:
            nn.init.normal_(self.image_newline, std=std)
        nn.init.normal_(self.view_seperator, std=std)
        self.gpt.init_weights()

    # ---- images -> slot embeddings -------------------------------------------------------------

    def layout(self, global_features, tile_features=None, tiles=(1, 1)):
        """DeepSeek-OCR's slot order: [tiles grid + newlines] [global grid + newlines] [view_seperator]. DeepSeek-OCR
        2's: [each tile's features, in crop order] [global features] [view_seperator]."""
        separator = self.view_seperator.to(global_features.dtype)[None]
        if self.image_newline is None:
            tiles = [] if tile_features is None else [tile_features.flatten(0, 1)]
            return torch.cat(tiles + [global_features, separator])
        C = global_features.size(-1)
        newline = self.image_newline.to(global_features.dtype)
        q = math.isqrt(global_features.size(0))
        rows = torch.cat([global_features.view(q, q, C), newline.expand(q, 1, C)], dim=1).view(-1, C)
        parts = [rows, separator]
        if tiles != (1, 1):
            n_w, n_h = tiles
            qt = math.isqrt(tile_features.size(1))
            # the tiles stitched into one grid, row-major: grid row r is every tile column's row r, side by side
            grid = tile_features.view(n_h, n_w, qt, qt, C).permute(0, 2, 1, 3, 4).reshape(n_h * qt, n_w * qt, C)
            parts.insert(0, torch.cat([grid, newline.expand(n_h * qt, 1, C)], dim=1).view(-1, C))
        return torch.cat(parts)

    def encode_images(self, images):
        """ProcessedImages -> one (slots, n_embd) tensor each. Views of one size go through the encoder together (a
        batch may mix modes)."""
        by_size = defaultdict(list)
        for i, image in enumerate(images):
            for kind, view in image.views():
                by_size[view.shape[-1]].append((i, kind, view))
        features = defaultdict(list)
        for views in by_size.values():
            out = self.encoder(torch.stack([v for _, _, v in views]).to(self.device, non_blocking=True))
            for (i, kind, _), f in zip(views, out):
                features[(i, kind)].append(f)
        return [self.layout(features[(i, "global")][0],
                            torch.stack(features[(i, "tiles")]) if features[(i, "tiles")] else None, image.tile_grid)
                for i, image in enumerate(images)]

    def embed(self, input_ids, images=None):
        """Token embeddings with the image embeddings scattered, in order, over the <image> slots."""
        x = self.gpt.transformer.wte(input_ids)
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        features = torch.cat(self.encode_images(images)) if images else x.new_zeros(0, x.size(-1))
        if features.size(0) != n_slots:
            raise ValueError(f"{n_slots} <image> slots in the tokens but {features.size(0)} image embeddings "
                             f"from {len(images or [])} image(s): slot counts and images disagree")
        if n_slots:
            x = x.masked_scatter(slots.unsqueeze(-1), features.to(x.dtype))
        return x

    def forward(self, input_ids, targets=None, images=None, *, doc_ids=None, positions=None, loss_reduction="mean"):
        """Packed rows carry doc_ids and positions (see dataloader.pack): attention then stays inside each sample."""
        return self.gpt(input_ids, targets, inputs_embeds=self.embed(input_ids, images), doc_ids=doc_ids,
                        positions=positions, loss_reduction=loss_reduction)

    def batch_loss(self, batch, images=None, loss_reduction="mean"):
        """The loss on a packed batch of the loader, moved to the model's device. images: in place of the batch's own
        (the image-gap watch)."""
        ids, targets, doc_ids, positions = (batch[k].to(self.device)
                                            for k in ("input_ids", "targets", "doc_ids", "positions"))
        return self(ids, targets, batch["images"] if images is None else images, doc_ids=doc_ids, positions=positions,
                    loss_reduction=loss_reduction)

    # ---- optimizers and FLOPs --------------------------------------------------------------------

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, vision_lr=1e-4,
                         weight_decay=0.0, adamw_lr=None):
        """GPT as nanochat (Muon on block matrices); the whole vision side, newline/separator included, on AdamW.
        adamw_lr: AdamW for everything at that lr instead."""
        vision = [p for name, p in self.named_parameters() if not name.startswith("gpt.")]
        return self.gpt.setup_optimizers(unembedding_lr, embedding_lr, matrix_lr, weight_decay,
                                         extra_adamw_groups=[dict(params=vision, lr=vision_lr)],
                                         adamw_lr=adamw_lr)

    def train_flops(self, doc_lengths, images):
        """
        FLOPs of one training micro-batch, counting only work done: the GPT forward+backward over each packed sample
        (nanochat's count, a sample attending itself), plus each view the encoder ran: 3x forward for the parts that
        train, 1x for frozen ones (nothing to backprop). Padding is not work.
        """
        flops = self.gpt.flops(doc_lengths)
        for size in [view.shape[-1] for image in images for _, view in image.views()]:
            for part, f in self.encoder.flops(size).items():  # parts by name: frozen ones counted once
                flops += 3 * f if any(p.requires_grad for p in getattr(self.encoder, part).parameters()) else f
        return flops


# ---- building models: the one builder and the sources of weights -----------------------------------------------------

def build_model(config, device="cpu", state=None, dtype=None, source="the weights"):
    """
    How every model here is made: built on the meta device (no memory, no init work), materialised on `device`,
    initialised, then loaded, then cast to `dtype` if given. config: a NanoDeepseekOCRConfig, or a GPTConfig for
    nanochat's GPT alone. state: weights by our names for whole parts of the model (gpt, encoder, image_newline, ...):
    every weight of a part it names must be in it, with its shape, and nothing else; its tensors become the parameters,
    and the parts it leaves out keep their init. `source` names the weights in errors.
    """
    with torch.device("meta"):
        model = GPT(config) if isinstance(config, GPTConfig) else NanoDeepseekOCR(config)
    model.to_empty(device=device)
    model.init_weights()  # also the rotary tables, which no state holds
    if state is not None:
        own, parts = model.state_dict(), {k.split(".")[0] for k in state}
        wrong = ([f"missing {k}" for k in own if k.split(".")[0] in parts and k not in state] +
                 [f"unexpected {k}" for k in state if k not in own] +
                 [f"{k} {tuple(v.shape)}, not {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape])
        if wrong:
            raise CheckpointError(f"{source}: does not match the model its config describes: {', '.join(wrong[:10])}")
        model.load_state_dict(state, strict=False, assign=True)
    return model if dtype is None else model.to(dtype)


# --init_encoder: the encoder (v1: full, tiny; v2: v2, v2-tiny) each source of weights fits, None for any
INIT_ENCODERS = {"sam+clip": "v1", "deepseek": "v1", "sam+qwen2": "v2", "deepseek2": "v2", "random": None}


def encoder_version(name):
    """v1 (DeepSeek-OCR's DeepEncoder) or v2 (DeepSeek-OCR 2's), from an encoder name of ENCODERS."""
    return "v2" if name.startswith("v2") else "v1"


def check_modes(modes, version):
    """The modes must be those of the encoder version (config.MODES): their slot layouts differ."""
    wrong = [m for m in modes if MODES[m]["encoder"] != version]
    if wrong:
        fits = ",".join(m for m, spec in MODES.items() if spec["encoder"] == version)
        raise UserError(f"--modes: {','.join(wrong)} not for the {version} encoder; its modes are {fits}")


@dataclass
class ModelSources:
    """Where a new model's weights come from (the training scripts' options of the same names)."""
    encoder: str = choice("full", ENCODERS)  # full: SAM-B + CLIP-L | tiny (CPU) | v2: SAM-B + Qwen2-0.5B | v2-tiny
    depth: int = 20                        # GPT depth when it starts from scratch (width = 64 * depth)
    gpt_generation: str = choice("2026", GENERATIONS)  # from scratch: nanochat's 2026 GPT (README: measured) or 2025's
    vocab_size: int = 0                    # GPT rows when larger than the tokenizer's (65536: d20's true cost)
    tokenizer: str = ""                    # tokenizer directory; empty = the nanochat checkpoint's, else the base dir's
    init_gpt: str = ""                     # nanochat checkpoint directory or HF repo; empty = from scratch
    init_gpt_step: int = -1                # its step; -1 = the last
    init_encoder: str = choice("sam+clip", INIT_ENCODERS)  # v1: sam+clip | deepseek; v2: sam+qwen2 | deepseek2; random
    sam_source: str = "facebook/sam-vit-base"  # or deepseek-ai/DeepSeek-OCR: its trained SAM (DeepSeek-OCR 2's start)
    clip_source: str = "openai/clip-vit-large-patch14"
    qwen2_source: str = "Qwen/Qwen2-0.5B"
    deepseek_source: str = "deepseek-ai/DeepSeek-OCR"
    deepseek2_source: str = "deepseek-ai/DeepSeek-OCR-2"


def new_model(sources, seq_len, device="cpu"):
    """(model, tokenizer) new from init sources: the GPT from a nanochat checkpoint (new vocab rows appended) or from
    scratch, the encoder from SAM + CLIP, DeepSeek-OCR's trained encoder, or random."""
    nanochat = read_nanochat(sources.init_gpt, None if sources.init_gpt_step < 0 else sources.init_gpt_step) \
        if sources.init_gpt else None
    tokenizer = RustBPETokenizer.from_directory(sources.tokenizer or (nanochat[3] if nanochat else tokenizer_dir()))
    vocab_size = max(tokenizer.get_vocab_size(), sources.vocab_size)
    if nanochat:  # its sequence_len stays: the windows it trained with follow from it
        state, gpt_config, _, _, path = nanochat
        if seq_len > 10 * gpt_config.sequence_len:
            raise UserError(f"--seq_len={seq_len} is beyond the rotary tables of {sources.init_gpt} "
                            f"({10 * gpt_config.sequence_len} positions, ten times its sequence_len)")
        state = {"gpt." + k: v for k, v in state.items()}
    else:
        state, path = None, None
        gpt_config = gpt_config_for_depth(sources.depth, vocab_size, seq_len, sources.gpt_generation)
    sam, clip, qwen2 = encoder_configs(sources.encoder)
    model = build_model(NanoDeepseekOCRConfig(sam, clip, gpt_config, tokenizer.image_token_id, qwen2), device, state,
                        source=path)
    if nanochat:
        print0(f"GPT from nanochat {sources.init_gpt} (vocab {gpt_config.vocab_size} -> {vocab_size})")
        model.gpt.resize_vocab(vocab_size)  # rows for the vision tokens, old logits kept
    if sources.init_encoder in ("sam+clip", "sam+qwen2"):  # DeepSeek-OCR's start; DeepSeek-OCR 2's (Qwen2-0.5B)
        second = (("Qwen2", load_qwen2(model.encoder.qwen2_model, sources.qwen2_source)) if clip is None else
                  ("CLIP", load_clip(model.encoder.vision_model, sources.clip_source)))
        for name, report in (("SAM", load_sam(model.encoder.sam_model, sources.sam_source)), second):
            print0(f"{name}: {report['loaded']} tensors from {report['source']}; "
                   f"random init: {report['random_init'] or 'none'}")
    elif sources.init_encoder in ("deepseek", "deepseek2"):
        v1 = sources.init_encoder == "deepseek"
        report = (load_deepseek_ocr_encoder(model, sources.deepseek_source) if v1 else
                  load_deepseek_ocr2_encoder(model, sources.deepseek2_source))
        print0(f"encoder: {report['loaded']} tensors from {report['source']}")
    return model, tokenizer


def load_model(checkpoint, device="cpu", dtype=None):
    """(model, tokenizer, meta) from one of our checkpoint directories (checkpoint.resolve_checkpoint finds one)."""
    meta = load_meta(checkpoint)
    model = build_model(NanoDeepseekOCRConfig.from_dict(meta["model_config"]), device, load_weights(checkpoint, device),
                        dtype, source=os.path.join(checkpoint, "model.safetensors"))
    return model, RustBPETokenizer.from_directory(checkpoint), meta


def reading_copy(model):
    """What an eval reads pages with: the model itself where the device computes in fp32; elsewhere an uncompiled copy
    in the compute dtype, made once per eval (the compiled fp32 training model would re-cast every weight at every
    decode step, and compile its encoder once more for no_grad)."""
    dtype = compute_dtype(model.device)
    if dtype == torch.float32:
        return model
    return build_model(model.config, model.device, model.state_dict(), dtype).eval()


# ---- nanochat checkpoints: model_XXXXXX.pt + meta_XXXXXX.json (+ tokenizer.pkl), in a directory or an HF repo ----

def pick_nanochat_files(paths, step=None):
    """From a checkpoint tree's file list: (model .pt, meta .json, tokenizer.pkl), preferring base_checkpoints/,
    the last step unless `step` is given, and the tokenizer nearest the model."""
    models = {}
    for p in paths:
        m = re.search(r"model_(\d+)\.pt$", p)
        if m:
            models.setdefault(int(m.group(1)), []).append(p)
    if step is not None:
        models = {s: ps for s, ps in models.items() if s == step}
    if not models:
        raise FileNotFoundError("no nanochat checkpoint (model_XXXXXX.pt)" +
                                (f" for step {step}" if step is not None else ""))
    candidates = [p for ps in models.values() for p in ps]
    base = [p for p in candidates if "base_checkpoints" in p] or candidates
    model = max(base, key=lambda p: int(re.search(r"model_(\d+)\.pt$", p).group(1)))
    meta = re.sub(r"model_(\d+)\.pt$", r"meta_\1.json", model)
    tokenizers = sorted((p for p in paths if p.endswith("tokenizer.pkl")),
                        key=lambda p: (os.path.dirname(p) != os.path.dirname(model), len(p)))
    if not tokenizers:
        raise FileNotFoundError("no tokenizer.pkl next to the nanochat checkpoint")
    return model, meta, tokenizers[0]


NANOCHAT_CONFIG_KEYS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern"}
PARTS_2026 = ("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda")


def nanochat_generation(state, model_config, path):
    """Which generation of nanochat's GPT wrote this checkpoint, from its state-dict keys and meta: "2025" (none of
    the 2026 parts) or "2026" (all of them); anything in between is refused by name, never loaded wrong."""
    unknown = set(model_config) - NANOCHAT_CONFIG_KEYS
    if unknown:
        raise CheckpointError(f"{path}: model_config has keys this loader does not know ({sorted(unknown)}): a "
                              "nanochat newer than the ones it supports (2025 generation up to 2c4473d, 2026 from "
                              "a825e63); nothing is dropped silently")
    present = {k: k in state for k in PARTS_2026}
    present["value_embeds"] = any(k.startswith("value_embeds.") for k in state)
    found = [k for k, there in present.items() if there]
    if not found and "window_pattern" not in model_config:
        return "2025"
    if all(present.values()):
        return "2026"
    missing = [k for k, there in present.items() if not there]
    raise CheckpointError(
        f"{path}: a nanochat GPT between the supported generations: it has {found or 'no 2026 parameters'}"
        f"{' and a window_pattern' if 'window_pattern' in model_config else ''} but not {missing} (nanochat of "
        "2026-01-11 to 2026-03-13, whose RoPE base, q/k scale and softcap changed without being recorded). Supported: "
        "the 2025 generation (nanochat up to 2c4473d, 2026-01-11) and the 2026 one (from a825e63, 2026-03-14).")


def read_nanochat(source, step=None, device="cpu"):
    """
    A nanochat base checkpoint, a local directory or an HF repo holding model_XXXXXX.pt, meta_XXXXXX.json and
    tokenizer.pkl (flat, or nanochat's base_checkpoints/dNN + tokenizer/ layout); only the chosen files are downloaded.
    -> (fp32 state dict, GPTConfig of its generation, meta, directory of tokenizer.pkl, path of the weights).
    """
    if os.path.isdir(source):
        files = glob.glob(os.path.join(source, "**", "*"), recursive=True)
        model_path, meta_path, tok_path = pick_nanochat_files(files, step)
    else:
        hint = "or pass a local nanochat directory as --init_gpt"
        files = pick_nanochat_files(hub_list_files(source, repo_type="model", hint=hint), step)
        model_path, meta_path, tok_path = (hub_file(source, f, repo_type="model", hint=hint) for f in files)
    with open(meta_path) as f:
        meta = json.load(f)
    state = torch.load(model_path, map_location=device, weights_only=True)
    state = {k.removeprefix("_orig_mod."): v.float() for k, v in state.items()}  # torch.compile prefix, bf16 -> fp32
    generation = nanochat_generation(state, meta["model_config"], model_path)
    config = GPTConfig(**dict(GENERATIONS[generation], **meta["model_config"]))
    config.pad_vocab_size_to = 1 if state["transformer.wte.weight"].size(0) == config.vocab_size else \
        GENERATIONS["2026"]["pad_vocab_size_to"]  # nanochat pads to 64 since 2025-12-09
    print0(f"nanochat GPT of the {generation} generation from {model_path}")
    return state, config, meta, os.path.dirname(tok_path), model_path


def load_nanochat(source, step=None, device="cpu"):
    """nanochat's GPT from its base checkpoint (see read_nanochat), loaded strictly, so it gives the logits nanochat's
    own code gives. -> (GPT, meta, directory of tokenizer.pkl)."""
    state, config, meta, tokenizer_directory, path = read_nanochat(source, step, device)
    return build_model(config, device, state, source=path), meta, tokenizer_directory
