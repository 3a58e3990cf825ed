"""
Small helpers every entry point uses: distributed info, printing, device choice, --key=value overrides, the report,
files written whole.
"""
import dataclasses
import difflib
import inspect
import io
import os
import sys
import textwrap
import threading
import time
import tokenize
from contextlib import contextmanager, nullcontext
from functools import lru_cache

import torch
import torch.distributed as dist
# Before any process group exists: torch.distributed.nn binds group.WORLD as a default argument at import. Imported
# later (torch._dynamo pulls it in, e.g. under torch.device("meta")), it keeps the group and gloo's worker threads
# alive past destroy_process_group, and a worker still freeing a tensor at interpreter exit aborts the process.
import torch.distributed.nn  # noqa: F401

from config import base_dir


class UserError(Exception):
    """An error whose message says what went wrong and what to do (a hub out of reach, a damaged checkpoint)."""


def run_command(main, *args):
    """A command's entry point: a UserError ends it with its message alone, exit status 1, no traceback."""
    try:
        return main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from torchrun's environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    if get_dist_info()[1] == 0:
        print(*args, **kwargs, flush=True)


def warn0(*args):
    """A warning or a problem, from rank 0, on stderr (stdout is for results: page text, logs, tables)."""
    print0(*args, file=sys.stderr)


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast_context(device):
    """bf16 autocast on CUDA, plain fp32 elsewhere: the one precision policy for training and inference."""
    return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@lru_cache(maxsize=None)
def compiled_flex_attention():
    """FlexAttention compiled once: uncompiled, it is a slow reference that materialises the whole score matrix."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def exit_with_launcher():
    """Under torchrun, stop this rank when its launcher dies: kill -9 of torchrun would leave the ranks running
    orphaned until the end. A daemon thread watches for the parent process to change."""
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(1)
        print(f"rank {get_dist_info()[1]}: its launcher (pid {launcher}) is gone; stopping (the checkpoints written so "
              "far are whole)", file=sys.stderr, flush=True)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-launcher").start()


def compute_init(device_type=None):
    """Seed, pick the device, and join the process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device_type=cuda: this torch has no CUDA device (torch {torch.__version__}); "
                        "leave --device_type out to train on what there is")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device_type=mps: MPS is not available here")
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device_type must be cuda, cpu or mps, got {device_type!r}")
    torch.manual_seed(42)
    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp:
        exit_with_launcher()
    if ddp and not dist.is_initialized():
        cuda = device_type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
        dist.barrier()
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    """Leave the process group together: a barrier so no rank closes its connections under a peer still talking."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def reduce_scatter_mean(output, inputs):
    """output <- mean over ranks of inputs[rank]. NCCL has reduce_scatter; gloo gets an all-reduce instead."""
    world_size = dist.get_world_size()
    if dist.get_backend() == "nccl":
        dist.reduce_scatter(output, list(inputs), op=dist.ReduceOp.SUM)
    else:
        stacked = torch.stack(list(inputs))
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        output.copy_(stacked[dist.get_rank()])
    output.div_(world_size)


def field_comments(cls):
    """{field name: the comment after it} in a dataclass's source: what --help says about each option."""
    comments, line_start = {}, None
    try:
        tokens = tokenize.generate_tokens(io.StringIO(textwrap.dedent(inspect.getsource(cls))).readline)
        for tok in tokens:
            if tok.type == tokenize.NAME and tok.start[1] == 4 and line_start is None:
                line_start = tok.string
            elif tok.type == tokenize.COMMENT and line_start:
                comments[line_start] = tok.string.lstrip("# ")
            elif tok.type in (tokenize.NEWLINE, tokenize.NL):
                line_start = None
    except (OSError, TypeError, tokenize.TokenError):
        pass
    return comments


def parse_overrides(cfg, argv=None, description=""):
    """
    nanochat-style overrides onto a config dataclass: --key=value, --key value, or a bare --flag for true, each
    converted to the field's type. --help lists every option with its type, this command's default and comment.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if "-h" in argv or "--help" in argv:
        comments = field_comments(type(cfg))
        print(description.strip() + "\n\noptions (--key=value, --key value, or --flag for a true bool):")
        for name in fields:
            value = getattr(cfg, name)
            print(f"  --{name:<26} {type(value).__name__:<5} {value!r:<32} {comments.get(name, '')}".rstrip())
        raise SystemExit(0)
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, has_value, value = arg[2:].partition("=")
        if not arg.startswith("--") or key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise SystemExit(f"unknown option {arg!r}" + (f" (did you mean --{close[0]}?)" if close else "") +
                             "; --help lists the options")
        current = getattr(cfg, key)
        if not has_value:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            elif isinstance(current, bool):
                value = "true"
            else:
                raise SystemExit(f"--{key} needs a value ({type(current).__name__})")
        try:
            if isinstance(current, bool):
                if value.lower() not in ("1", "0", "true", "false"):
                    raise ValueError
                value = value.lower() in ("1", "true")
            else:
                value = type(current)(value)
        except ValueError:
            kind = "true/false" if isinstance(current, bool) else "an " + type(current).__name__
            raise SystemExit(f"--{key} takes {kind}, got {value!r}") from None
        setattr(cfg, key, value)
        i += 1
    return cfg


class DummyWandb:
    """Stands in for a wandb run when no run name is given."""
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def append_report(title, lines):
    """Add a section to report.md in the base directory (speedrun.sh starts it afresh and copies it out at the end)."""
    path = os.path.join(base_dir(), "report.md")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n## {title}\n\n" + "\n".join(lines) + "\n")
    return path


def line_plot(series, path, x_label, y_label):
    """A PNG line chart, drawn with Pillow, of {name: [(x, y), ...]}: one coloured line (and legend entry) per name."""
    from PIL import Image, ImageDraw, ImageFont
    W, H, m = 900, 600, 70
    colours = [(200, 40, 40), (40, 90, 200), (30, 150, 60), (200, 130, 0), (120, 40, 160)]
    image = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(image)
    f = ImageFont.load_default(size=16)
    points = [p for pts in series.values() for p in pts]
    x0, x1 = min([x for x, _ in points] + [0]), max([x for x, _ in points] + [1e-9]) * 1.05
    y1 = max([y for _, y in points] + [1e-9]) * 1.1

    def xy(x, y):
        return m + (W - 2 * m) * (x - x0) / (x1 - x0), H - m - (H - 2 * m) * y / y1
    d.line((m, H - m, W - m, H - m), fill=(0, 0, 0), width=2)
    d.line((m, m, m, H - m), fill=(0, 0, 0), width=2)
    for k in range(6):
        d.text((m - 55, xy(0, y1 * k / 5)[1] - 8), f"{y1 * k / 5:.3g}", font=f, fill=(0, 0, 0))
        x = x0 + (x1 - x0) * k / 5
        d.text((xy(x, 0)[0] - 10, H - m + 8), f"{x:.3g}", font=f, fill=(0, 0, 0))
    d.text((W // 2 - 100, H - 30), x_label, font=f, fill=(0, 0, 0))
    d.text((10, 20), y_label, font=f, fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        line = [xy(x, y) for x, y in pts]
        if len(line) > 1:
            d.line(line, fill=colour, width=3)
        for x, y in line:
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        d.text((W - m - 220, m + 24 * i), name, font=f, fill=colour)
    image.save(path)
    return path


@contextmanager
def atomic_open(path, mode="w", encoding=None):
    """Write to a temporary file beside `path` and rename it over `path` when the block ends: a reader (or a crash)
    never sees half a file. The temporary name carries the pid, so loader workers writing the same file do not clash."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
