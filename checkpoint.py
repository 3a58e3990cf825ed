"""
Checkpoints: one directory per step holding
  model.safetensors   the whole model (fp32 master weights)
  meta.json           step, model config, training config, metrics
  tokenizer.pkl       so a checkpoint is self-contained
  rank000.pt, ...     each rank's optimizer state, data loader state and RNG state
Written as step_XXXXXX.tmp and renamed when complete: a crash mid-save leaves the previous checkpoint as it was.
Loading the model for inference (ocr, vision_sample) and for training (resume, stage 2) happens here only.
"""
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file, load_file

from common import autodetect_device_type, autocast_context
from config import base_dir
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


def save_checkpoint(out_dir, step, model, tokenizer, meta, optimizers=(), loader_state=None, rank=0):
    """Every rank calls this (collective when distributed). Returns the checkpoint directory."""
    final = os.path.join(out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
        tokenizer.save(tmp)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(meta, step=step, model_config=model.config.to_dict()), f, indent=2)
    barrier()
    torch.save(dict(optimizers=[o.state_dict() for o in optimizers], loader=loader_state, rng=rng_state()),
               os.path.join(tmp, f"rank{rank:03d}.pt"))
    barrier()
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return final


def list_checkpoints(directory):
    """Complete checkpoints under a run directory, oldest first (unfinished .tmp ones are ignored)."""
    if not os.path.isdir(directory):
        return []
    steps = sorted(int(m.group(1)) for name in os.listdir(directory) if (m := re.fullmatch(r"step_(\d+)", name)))
    return [os.path.join(directory, f"step_{s:06d}") for s in steps]


def resolve_checkpoint(path=None, step=None):
    """A checkpoint directory, a run directory (its last checkpoint, or `step`), or None: the most recently written run."""
    if path is None:
        runs = [os.path.join(base_dir("checkpoints", stage), r) for stage in ("stage1", "stage2")
                for r in os.listdir(base_dir("checkpoints", stage))]
        runs = sorted((r for r in runs if list_checkpoints(r)), key=lambda r: os.path.getmtime(list_checkpoints(r)[-1]))
        if not runs:
            raise FileNotFoundError(f"no trained checkpoint under {base_dir('checkpoints')}: train one first "
                                    "(`bash speedrun.sh`), or pass --checkpoint DIR")
        path = runs[-1]
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: not a checkpoint (no model.safetensors) and no step_XXXXXX checkpoints inside")
    if step is None:
        return found[-1]
    wanted = os.path.join(path, f"step_{step:06d}")
    if wanted not in found:
        raise FileNotFoundError(f"{path}: no checkpoint for step {step}; have {[os.path.basename(f) for f in found]}")
    return wanted


def load_meta(checkpoint):
    with open(os.path.join(checkpoint, "meta.json")) as f:
        return json.load(f)


def load_model(checkpoint, device="cpu"):
    """-> (model, tokenizer, meta) from a checkpoint directory (see resolve_checkpoint)."""
    meta = load_meta(checkpoint)
    model = build_model(NanoDeepseekOCRConfig.from_dict(meta["model_config"]), device)
    state = load_file(os.path.join(checkpoint, "model.safetensors"), device=str(device))
    model.load_state_dict(state, strict=True)
    return model, RustBPETokenizer.from_directory(checkpoint), meta


def load_for_inference(path=None, step=None, device=None):
    """What the reading scripts need: (model in eval mode, tokenizer, meta, autocast context, checkpoint path).
    A missing checkpoint exits with the reason instead of a traceback."""
    try:
        checkpoint = resolve_checkpoint(path, step)
    except FileNotFoundError as e:
        raise SystemExit(f"no trained model to read with: {e}")
    device = torch.device(device or autodetect_device_type())
    model, tokenizer, meta = load_model(checkpoint, device)
    return model.eval(), tokenizer, meta, autocast_context(device), checkpoint


def load_training_state(checkpoint, rank=0):
    path = os.path.join(checkpoint, f"rank{rank:03d}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: was this checkpoint written with a different number of ranks?")
    return torch.load(path, map_location="cpu", weights_only=False)
