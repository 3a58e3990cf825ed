"""
Small helpers every entry point uses: distributed info, printing, device choice, --key=value overrides.
"""
import os
import sys
import dataclasses
from contextlib import contextmanager, nullcontext

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


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast_context(device):
    """bf16 autocast on CUDA, plain fp32 elsewhere: the one precision policy for training and inference."""
    return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def compute_init(device_type=None):
    """Seed, pick the device, and join the process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    device_type = device_type or autodetect_device_type()
    torch.manual_seed(42)
    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", device_id=device if device_type == "cuda" else None)
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


def parse_overrides(cfg, argv=None):
    """nanochat-style --key=value overrides onto a config dataclass, with the field's type."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key not in fields:
            raise SystemExit(f"unknown option --{key}; options are: {', '.join(sorted(fields))}")
        current = getattr(cfg, key)
        if isinstance(current, bool):
            if value.lower() not in ("1", "0", "true", "false"):
                raise SystemExit(f"--{key} takes true/false, got {value!r}")
            value = value.lower() in ("1", "true")
        elif isinstance(current, int):
            value = int(value)
        elif isinstance(current, float):
            value = float(value)
        setattr(cfg, key, value)
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
