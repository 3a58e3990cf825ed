"""
DistAdamW: AdamW with sharded state (ZeRO-2 style). Each parameter is flattened and cut into world_size
slices; a rank gets the averaged gradient of its slice (reduce-scatter), updates it with AdamW's exact
arithmetic (same as torch.optim.AdamW), and all-gathers the slices back. Works for any shape, NCCL or gloo.
"""
import math

import torch
import torch.distributed as dist

from common import reduce_scatter_mean


class DistAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                n = p.numel()
                shard = math.ceil(n / world_size)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                flat_grad = torch.zeros(shard * world_size, device=p.device, dtype=grad.dtype)
                flat_grad[:n] = grad.reshape(-1)
                g = torch.empty(shard, device=p.device, dtype=grad.dtype)
                reduce_scatter_mean(g, flat_grad.chunk(world_size))
                flat_param = torch.zeros(shard * world_size, device=p.device, dtype=p.dtype)
                flat_param[:n] = p.reshape(-1)
                own = flat_param[rank * shard:(rank + 1) * shard].clone()
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(own)
                    state["exp_avg_sq"] = torch.zeros_like(own)
                state["step"] += 1
                step = state["step"].item()
                own.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
                own.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))
                dist.all_gather(list(flat_param.chunk(world_size)), own)
                p.copy_(flat_param[:n].view_as(p))
