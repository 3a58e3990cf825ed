"""Run by test_optim.py under torchrun (gloo): a few optimizer steps on this rank's half of a fixed global batch."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import compute_init, compute_cleanup  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402


def build():
    torch.manual_seed(0)
    with torch.device("meta"):  # as build_model and load_nanochat do: this imports torch._dynamo after the group exists
        model = GPT(GPTConfig(sequence_len=32, vocab_size=61, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.1)
    extra = torch.nn.Parameter(torch.randn(3, 5, 3, 3))  # a conv-shaped tensor whose size does not split evenly
    return model, extra


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 61, (4, 16), generator=g), torch.randint(0, 61, (4, 16), generator=g)


def run(rank, world_size, steps=3):
    model, extra = build()
    optimizers = model.setup_optimizers(extra_adamw_groups=[dict(params=[extra], lr=0.01)])
    x, y = global_batch()
    per = x.size(0) // world_size
    x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    for _ in range(steps):
        loss = model(x, targets=y) + (extra ** 2).mean()
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        extra.grad = None
    return {**model.state_dict(), "extra": extra.detach().clone()}, [type(o).__name__ for o in optimizers]


def gloo_threads():
    """Names of this process's gloo threads (Linux): none may outlive the process group."""
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return [n for n in names if "gloo" in n]


if __name__ == "__main__":
    ddp, rank, _, world_size, _ = compute_init("cpu")
    state, names = run(rank, world_size)
    compute_cleanup()
    torch.save(dict(state=state, optimizers=names, gloo_threads_after_cleanup=gloo_threads()),
               os.path.join(sys.argv[1], f"rank{rank}.pt"))
