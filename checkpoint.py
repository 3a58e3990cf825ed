"""
Checkpoints: one directory per step holding
  model.safetensors   the whole model (fp32 master weights)
  meta.json           step, model config, training config, metrics
  tokenizer.pkl       so a checkpoint is self-contained
  rank000.pt, ...     each rank's optimizer state, data loader state and RNG state
  checksums.json      the SHA-256 of every other file, checked before anything is loaded
Written as step_XXXXXX.tmp and renamed when complete: a crash mid-save leaves the previous checkpoint as it was.
A damaged checkpoint is named with its bad file; a run directory resolves to its newest checkpoint that verifies.
This file knows our format only; models are built from it by nano_deepseek_ocr.load_model.
"""
import dataclasses
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

from common import UserError, warn0
from config import base_dir


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
            json.dump(dict(meta, step=step, model_config=dataclasses.asdict(model.config)), f, indent=2)
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


def load_weights(checkpoint, device="cpu"):
    """The model's weights (fp32, by our names) from a checkpoint directory."""
    path = os.path.join(checkpoint, "model.safetensors")
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # truncated or not safetensors at all
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def learned(meta):
    """What a checkpoint has learned: (what it was trained on, the modes it reads in), the runs it started from
    included; checkpoints older than this record read in their last run's modes. learned_after writes it."""
    modes = meta.get("trained_modes") or meta.get("train_config", {}).get("modes", "base").split(",")
    return meta.get("trained_on", []), modes


def learned_after(meta, data, modes):
    """The record a run writes into its checkpoints: what its start had learned (meta {}: a new model), plus this
    run's data and modes."""
    on, before = learned(meta) if meta else ([], [])
    return dict(trained_on=list(dict.fromkeys(on + [data])), trained_modes=list(dict.fromkeys(before + list(modes))))


def load_training_state(checkpoint, rank=0):
    path = os.path.join(checkpoint, f"rank{rank:03d}.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} missing: was this checkpoint written with a different number of ranks?")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
