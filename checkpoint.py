"""
Checkpoints: one directory per step holding
  model.safetensors   the whole model (fp32 master weights)
  meta.json           step, model config, training config, metrics
  tokenizer.pkl       so a checkpoint is self-contained
  rank000.pt, ...     each rank's optimizer state, data loader state and RNG state
  checksums.json      the SHA-256 of every other file, checked before anything is loaded
Written as step_XXXXXX.tmp and renamed when complete: a crash mid-save leaves the previous checkpoint as it was.
A damaged checkpoint is named with its bad file; a run directory resolves to its newest checkpoint that verifies.
Every model is built here: from our checkpoints (inference, resume, stage 2), from a nanochat base checkpoint,
or new from its init sources (a nanochat GPT, SAM + CLIP or DeepSeek-OCR's encoder, or random).
"""
import glob
import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file, load_file

from common import UserError, print0, warn0
from config import base_dir, tokenizer_dir
from deepencoder.clip_sdpa import CLIPConfig
from deepencoder.encoder import tiny_encoder_configs
from deepencoder.load_pretrained import load_sam, load_clip, load_deepseek_ocr_encoder
from deepencoder.sam_vary_sdpa import SAMConfig
from gpt import GENERATIONS, GPT, GPTConfig, gpt_config_for_depth
from hub import hub_list_files, hub_file
from nano_deepseek_ocr import NanoDeepseekOCRConfig, build_model
from tokenizer import RustBPETokenizer


def barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state():
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


MANIFEST = "checksums.json"


class CheckpointError(UserError):
    """A checkpoint that is incomplete or damaged; the message names the file."""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(out_dir, step, model, tokenizer, meta, optimizers=(), loader_state=None, rank=0, keep=0):
    """Every rank calls this (collective when distributed). keep > 0 deletes all but the newest `keep` checkpoints.
    Returns the checkpoint directory."""
    final = os.path.join(out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, "model.safetensors"))
        tokenizer.save(tmp)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(meta, step=step, model_config=model.config.to_dict()), f, indent=2)
        # safetensors writes its file 0600: give it the permissions every other file here gets
        os.chmod(os.path.join(tmp, "model.safetensors"), os.stat(os.path.join(tmp, "meta.json")).st_mode & 0o777)
    barrier()
    torch.save(dict(optimizers=[o.state_dict() for o in optimizers], loader=loader_state, rng=rng_state()),
               os.path.join(tmp, f"rank{rank:03d}.pt"))
    barrier()
    if rank == 0:
        # the manifest comes last: every file is complete by now
        checksums = {name: sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(checksums, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    barrier()
    return final


def verify_checkpoint(checkpoint):
    """Check every file against the manifest; raise CheckpointError naming the first one missing or changed.
    A checkpoint written before manifests existed passes with a warning."""
    manifest = os.path.join(checkpoint, MANIFEST)
    if not os.path.exists(manifest):
        warn0(f"warning: {checkpoint} has no {MANIFEST} (written before checksums existed): not verified")
        return
    try:
        with open(manifest) as f:
            expected = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({e}); the checkpoint cannot be trusted")
    for name, digest in expected.items():
        path = os.path.join(checkpoint, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing from the checkpoint")
        if sha256(path) != digest:
            raise CheckpointError(f"{path}: damaged (its SHA-256 is not the one recorded when it was written)")


def list_checkpoints(directory):
    """Complete checkpoints under a run directory, oldest first (unfinished .tmp ones are ignored)."""
    if not os.path.isdir(directory):
        return []
    steps = sorted(int(m.group(1)) for name in os.listdir(directory) if (m := re.fullmatch(r"step_(\d+)", name)))
    return [os.path.join(directory, f"step_{s:06d}") for s in steps]


def resolve_checkpoint(path=None, step=None):
    """
    A verified checkpoint directory from: a checkpoint directory, a run directory (its checkpoint for `step`, or its
    newest checkpoint that verifies: damaged ones are reported and passed over), or None: the most recent run.
    """
    if path is None:
        runs = [os.path.join(base_dir("checkpoints", stage), r) for stage in ("stage1", "stage2")
                for r in os.listdir(base_dir("checkpoints", stage))]
        runs = sorted((r for r in runs if list_checkpoints(r)), key=lambda r: os.path.getmtime(list_checkpoints(r)[-1]))
        if not runs:
            raise FileNotFoundError(f"no trained checkpoint under {base_dir('checkpoints')}: train one first "
                                    "(`bash speedrun.sh`), or pass --checkpoint DIR")
        path = runs[-1]
    if os.path.exists(os.path.join(path, "model.safetensors")) or os.path.exists(os.path.join(path, MANIFEST)):
        verify_checkpoint(path)
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: not a checkpoint (no model.safetensors) and no step_XXXXXX checkpoints "
                                "inside")
    if step is not None:
        wanted = os.path.join(path, f"step_{step:06d}")
        if wanted not in found:
            have = [os.path.basename(f) for f in found]
            raise FileNotFoundError(f"{path}: no checkpoint for step {step}; have {have}")
        verify_checkpoint(wanted)
        return wanted
    for checkpoint in reversed(found):
        try:
            verify_checkpoint(checkpoint)
            return checkpoint
        except CheckpointError as e:
            warn0(f"skipping {os.path.basename(checkpoint)}: {e}")
    raise CheckpointError(f"{path}: none of its {len(found)} checkpoints verifies")


def load_meta(checkpoint):
    path = os.path.join(checkpoint, "meta.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def load_model(checkpoint, device="cpu"):
    """-> (model, tokenizer, meta) from a checkpoint directory (see resolve_checkpoint)."""
    meta = load_meta(checkpoint)
    model = build_model(NanoDeepseekOCRConfig.from_dict(meta["model_config"]), device)
    path = os.path.join(checkpoint, "model.safetensors")
    try:
        state = load_file(path, device=str(device))
    except Exception as e:  # truncated or not safetensors at all
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    model.load_state_dict(state, strict=True)
    return model, RustBPETokenizer.from_directory(checkpoint), meta


def load_training_state(checkpoint, rank=0):
    path = os.path.join(checkpoint, f"rank{rank:03d}.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} missing: was this checkpoint written with a different number of ranks?")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


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


def load_nanochat(source, step=None, device="cpu"):
    """
    Build a GPT from a nanochat base checkpoint: a local directory or an HF repo holding model_XXXXXX.pt,
    meta_XXXXXX.json and tokenizer.pkl (flat, or nanochat's base_checkpoints/dNN + tokenizer/ layout). Only the chosen
    files are downloaded. The generation is recognised (see nanochat_generation) and the weights loaded strictly, so
    the GPT gives the logits nanochat's own code gives. Returns (model, meta dict, directory of tokenizer.pkl).
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
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # rotary tables
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{model_path}: does not match nanochat's {generation} GPT of its meta: "
                              f"{' '.join(str(e).split())[:500]}") from None
    print0(f"nanochat GPT of the {generation} generation from {model_path}")
    return model, meta, os.path.dirname(tok_path)


# ---- a new model from its init sources (nanochat's checkpoint_manager.build_model) ----

def new_model(cfg, device):
    """Tokenizer + model from the init sources of cfg (nanochat GPT, SAM + CLIP or DeepSeek-OCR's encoder)."""
    step = None if cfg.init_gpt_step < 0 else cfg.init_gpt_step
    nanochat = load_nanochat(cfg.init_gpt, step) if cfg.init_gpt else None
    tokenizer = RustBPETokenizer.from_directory(cfg.tokenizer or (nanochat[2] if nanochat else tokenizer_dir()))
    sam, clip = tiny_encoder_configs() if cfg.encoder == "tiny" else (SAMConfig(), CLIPConfig())
    if nanochat:  # its sequence_len stays: the windows it trained with follow from it
        gpt_config = nanochat[0].config
        if cfg.seq_len > nanochat[0].rotary_seq_len:
            raise UserError(f"--seq_len={cfg.seq_len} is beyond the rotary tables of {cfg.init_gpt} "
                            f"({nanochat[0].rotary_seq_len} positions, ten times its sequence_len)")
    else:
        if cfg.gpt_generation not in GENERATIONS:
            raise UserError(f"--gpt_generation must be one of {list(GENERATIONS)}, got {cfg.gpt_generation!r}")
        gpt_config = gpt_config_for_depth(cfg.depth, max(tokenizer.get_vocab_size(), cfg.vocab_size), cfg.seq_len,
                                          cfg.gpt_generation)
    model = build_model(NanoDeepseekOCRConfig(sam, clip, gpt_config, tokenizer.image_token_id), device)
    if nanochat:
        model.gpt.load_state_dict(nanochat[0].state_dict())
        model.gpt.resize_vocab(max(tokenizer.get_vocab_size(), cfg.vocab_size))  # append rows for the vision tokens
        print0(f"GPT from nanochat {cfg.init_gpt} "
               f"(vocab {nanochat[0].config.vocab_size} -> {tokenizer.get_vocab_size()})")
    if cfg.init_encoder == "sam+clip":
        for name, report in (("SAM", load_sam(model.encoder.sam_model, cfg.sam_source)),
                             ("CLIP", load_clip(model.encoder.vision_model, cfg.clip_source))):
            print0(f"{name}: {report['loaded']} tensors from {report['source']}; "
                   f"random init: {report['random_init'] or 'none'}")
    elif cfg.init_encoder == "deepseek":
        report = load_deepseek_ocr_encoder(model, cfg.deepseek_source)
        print0(f"DeepEncoder: {report['loaded']} tensors from {report['source']}")
    elif cfg.init_encoder != "random":
        raise ValueError(f"--init_encoder must be sam+clip, deepseek or random, got {cfg.init_encoder!r}")
    return model, tokenizer
