"""
Small helpers every entry point uses: distributed info, printing, device choice, --key=value overrides, the report,
files written whole.
"""
import dataclasses
import difflib
import inspect
import io
import math
import os
import re
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
        result = main(*args)
        sys.stdout.flush()
        return result
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except BrokenPipeError:
        drop_stdout()
        raise SystemExit(0)


def drop_stdout():
    """The reader of stdout has gone (--help | head): what is left goes unsaid, not into a traceback at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


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


@lru_cache(maxsize=None)
def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16: 2.1-2.4x its fp32 rate on the demo's
    machine); elsewhere bf16 is emulated and slower than fp32. From the kernel's CPU flags: torch's own check
    (mkldnn._is_mkldnn_bf16_supported) asks for AVX512BW only."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", f.read()))
    except OSError:  # not Linux: fp32
        return False


def compute_dtype(device):
    """The dtype a device computes in: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere (and everywhere but
    CUDA when NANO_DEEPSEEK_OCR_FP32=1). The one precision rule: training autocasts to it, and the engine and the
    evals read with weights and KV cache in it."""
    device = torch.device(device)
    native = device.type == "cuda" or device.type == "cpu" and cpu_has_bf16()
    fp32 = device.type != "cuda" and os.environ.get("NANO_DEEPSEEK_OCR_FP32", "") not in ("", "0")
    return torch.bfloat16 if native and not fp32 else torch.float32


def autocast_context(device, cache_enabled=True):
    """Autocast to the device's compute dtype, or nothing where that is fp32. cache_enabled=False inside a CUDA graph,
    where autocast's cast cache cannot live."""
    dtype = compute_dtype(device)
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype, cache_enabled=cache_enabled)


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
    """{field name: the comment after it} in a dataclass's source, its bases' included: what --help says of each
    option."""
    comments = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        line_start = None
        try:
            tokens = tokenize.generate_tokens(io.StringIO(textwrap.dedent(inspect.getsource(klass))).readline)
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


def choice(default, allowed, many=False, weighted=False):
    """A config field that takes one of `allowed`, declared beside it; many: a comma-separated list of them;
    weighted: each may carry a positive :weight (grid:1,type:3). check_choices holds every field to it."""
    return dataclasses.field(default=default, metadata=dict(allowed=tuple(allowed), many=many, weighted=weighted))


def check_choices(cfg):
    """Each choice field of a config holds allowed values, or a UserError names the field and what it takes."""
    for f in (f for f in dataclasses.fields(cfg) if "allowed" in f.metadata):
        value, m = getattr(cfg, f.name), f.metadata
        for part in value.split(",") if m["many"] else [value]:
            name, _, weight = part.partition(":") if m["weighted"] else (part, "", "")
            positive = not weight or re.fullmatch(r"\d*\.?\d+", weight) and float(weight) > 0
            if name not in m["allowed"] or not positive:
                form = " (a comma-separated list" + (", each with an optional :weight)" if m["weighted"] else ")")
                raise UserError(f"--{f.name}={value}: {part!r} is not one of "
                                f"{', '.join(a or repr(a) for a in m['allowed'])}{form if m['many'] else ''}")


def parse_overrides(cfg, argv=None, description=""):
    """
    nanochat-style overrides onto a config dataclass: --key=value, --key value, or a bare --flag for true, each
    converted to the field's type. --help lists every option with its type, this command's default and comment.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if "-h" in argv or "--help" in argv:
        comments = field_comments(type(cfg))
        try:
            print(description.strip() + "\n\noptions (--key=value, --key value, or --flag for a true bool):")
            for name in fields:
                value = getattr(cfg, name)
                print(f"  --{name:<26} {type(value).__name__:<5} {value!r:<32} {comments.get(name, '')}".rstrip())
            sys.stdout.flush()
        except BrokenPipeError:
            drop_stdout()
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
    try:  # a value outside a field's declared choices stops here, before anything slow
        check_choices(cfg)
    except UserError as e:
        raise SystemExit(str(e)) from None
    return cfg


class DummyWandb:
    """Stands in for a wandb run when no run name is given."""
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def append_report(title, lines):
    """This section of report.md in the base directory (speedrun.sh starts it afresh and copies it out at the end):
    written again in its place when a command runs twice, before the closing wall time otherwise. Paths under the
    base directory are written relative to it, not as on the machine that trained."""
    path = os.path.join(base_dir(), "report.md")
    section = f"## {title}\n\n" + "\n".join(lines).replace(base_dir() + os.sep, "") + "\n"
    header, *sections = re.split(r"\n(?=## )", open(path, encoding="utf-8").read() if os.path.exists(path) else "")
    titles = [s.split("\n", 1)[0] for s in sections]
    if f"## {title}" in titles:
        sections[titles.index(f"## {title}")] = section
    else:
        sections.insert(titles.index("## Wall time") if "## Wall time" in titles else len(sections), section)
    with atomic_open(path, encoding="utf-8") as f:
        f.write(header + "".join("\n" + s for s in sections))
    return path


def nice_ticks(high, count=5):
    """Round tick values from 0 to at least `high`: steps of 1, 2 or 5 times a power of ten."""
    raw = max(high, 1e-9) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [step * k for k in range(math.ceil(max(high, 1e-9) / step) + 1)]


def line_plot(series, path, x_label, y_label, title=""):
    """A PNG line chart, drawn with Pillow, of {name: [(x, y), ...]}: one coloured line (and legend entry) per name,
    round ticks from zero, the title above."""
    from PIL import Image, ImageDraw, ImageFont
    W, H, m = 900, 600, 80
    colours = [(200, 40, 40), (40, 90, 200), (30, 150, 60), (200, 130, 0), (120, 40, 160)]
    image = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(image)
    f = ImageFont.load_default(size=16)
    points = [p for pts in series.values() for p in pts]
    x_ticks = nice_ticks(max([x for x, _ in points] + [0]))
    y_ticks = nice_ticks(max([y for _, y in points] + [0]) or 1)  # all zero: a 0 to 1 axis, not 0 to 1e-9

    def xy(x, y):
        return m + (W - 2 * m) * x / x_ticks[-1], H - m - (H - 2 * m) * y / y_ticks[-1]
    d.line((m, H - m, W - m, H - m), fill=(0, 0, 0), width=2)
    d.line((m, m, m, H - m), fill=(0, 0, 0), width=2)
    for y in y_ticks:  # labels left of the axis, x labels below it: none on the line
        d.text((m - 12, xy(0, y)[1]), f"{y:g}", font=f, fill=(0, 0, 0), anchor="rm")
    for x in x_ticks:
        d.text((xy(x, 0)[0], H - m + 12), f"{x:g}", font=f, fill=(0, 0, 0), anchor="mt")
    d.text((W // 2, H - 24), x_label, font=f, fill=(0, 0, 0), anchor="mm")
    d.text((10, 20), y_label, font=f, fill=(0, 0, 0))
    d.text((W // 2, 20), title, font=f, fill=(0, 0, 0), anchor="mm")
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
