"""
What every reading command shares (ocr, vision_sample, eval_*): the options that pick a checkpoint, a device and how
much to read; the checkpoint loaded into an Engine in the device's compute dtype, named on stderr with what it learned;
and the page stream, loaded as slots free up, with its progress bar.
"""
import argparse
import sys

import torch
from tqdm import tqdm

from checkpoint import learned, resolve_checkpoint
from common import autodetect_device_type, compute_dtype
from config import MODES
from engine import Engine
from image_process import ImageError
from nano_deepseek_ocr import check_modes, load_model


def positive_int(value):
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return int(value)


def modes_arg(text):
    """--modes: comma-separated modes, checked before anything loads."""
    modes = [m for m in text.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown modes {unknown or [text]}; modes are {','.join(MODES)}")
    return modes


def add_reader_args(parser, max_tokens):
    parser.add_argument("--checkpoint", default=None, help="checkpoint or run directory (default: the most recent run)")
    parser.add_argument("--model_step", type=int, default=None, help="which step of the run (default: the last)")
    parser.add_argument("--device", default=None, help="cuda, cpu or mps (default: the best there is)")
    parser.add_argument("--max_tokens", type=positive_int, default=max_tokens, help="new tokens per page at most")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="pages decoded together")


def load_engine(args, modes=None):
    """(Engine, checkpoint meta, checkpoint path, modes) from add_reader_args' options; a bad choice exits with the
    reason. modes: those asked for, or None for the checkpoint's own; one it never trained in is warned about, and the
    stderr line that names the checkpoint names the modes it reads in."""
    try:
        device = torch.device(args.device or autodetect_device_type())
    except RuntimeError:
        raise SystemExit(f"--device {args.device}: not a device (cuda, cuda:N, cpu or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch has no CUDA device (torch {torch.__version__})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {args.device}: MPS is not available here")
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, args.model_step)
    except FileNotFoundError as e:
        raise SystemExit(f"no trained model to read with: {e}")
    # inference only: weights in the compute dtype (on CUDA bf16 halves what every decode step reads)
    model, tokenizer, meta = load_model(checkpoint, device, compute_dtype(device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # what fp32 work remains
    trained_on, trained = learned(meta)
    modes = modes or trained[:1]
    check_modes(modes, model.encoder_version)
    print(f"{checkpoint} (step {meta['step']}, trained on {', '.join(trained_on) or 'its training data'} in "
          f"{'/'.join(trained)} mode): reading in {'/'.join(modes)} mode", file=sys.stderr)
    for mode in modes:
        if mode not in trained:
            print(f"warning: this checkpoint never trained in {mode} mode (only {'/'.join(trained)}): expect little "
                  f"or nothing to be read; leave out the mode to read in {trained[0]}", file=sys.stderr)
    return Engine(model.eval(), tokenizer, batch_size=args.batch_size), meta, checkpoint, modes


def read_with_progress(engine, pages, mode, max_new_tokens, failed, desc="pages", **generate_kwargs):
    """
    pages: [(key, load, prompt)], load() -> PIL image, called only when a slot is about to take the page. Yields
    (key, image, text) as pages finish, with a progress bar on stderr. A page whose load() raises ImageError is
    named on stderr, its key appended to `failed`, and the others go on.
    """
    images = {}

    def stream():
        for key, load, prompt in pages:
            try:
                images[key] = load()
            except ImageError as e:
                print(f"skipping {e}", file=sys.stderr)
                failed.append(key)
                continue
            yield key, images[key], prompt
    for key, text in tqdm(engine.read_iter(stream(), mode, max_new_tokens, count=len(pages), **generate_kwargs),
                          total=len(pages), desc=desc, unit="page", file=sys.stderr, disable=len(pages) == 1):
        yield key, images.pop(key), text
