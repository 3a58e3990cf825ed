"""
Muon: SGD-momentum whose 2-D update is orthogonalised by a Newton-Schulz iteration
(Keller Jordan, https://kellerjordan.github.io/posts/muon/; nanochat / modded-nanogpt).
Only for 2-D matrices; embeddings, lm_head, convs, norms and biases go to AdamW.
"""
import torch
import torch.distributed as dist

from common import reduce_scatter_mean


def zeropower_via_newtonschulz5(G, steps):
    """
    Quintic Newton-Schulz towards the nearest semi-orthogonal matrix. The coefficients maximise the slope
    at zero, so the result is U S' V^T with S' ~ U(0.5, 1.5), which trains as well as U V^T.
    bf16 on GPU (fast and stable there); fp32 elsewhere, where bf16 matmuls are slow.
    """
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16() if G.is_cuda else G.float()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def muon_update(p, g, state, group):
    """Momentum, Nesterov look-ahead, orthogonalise, step scaled by the matrix's aspect ratio."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(g)
    buf = state["momentum_buffer"]
    buf.lerp_(g, 1 - group["momentum"])
    g = g.lerp_(buf, group["momentum"]) if group["nesterov"] else buf
    g = zeropower_via_newtonschulz5(g, steps=group["ns_steps"])
    p.add_(g.to(p.dtype), alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        params = list(params)
        assert all(p.ndim == 2 for p in params), "Muon takes 2-D parameters only"
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                muon_update(p, g, self.state[p], group)


class DistMuon(torch.optim.Optimizer):
    """
    Muon across ranks: parameters of one shape are taken world_size at a time; each rank owns one of them,
    gets its averaged gradient (reduce-scatter), updates it, and all-gathers the result to every rank.
    Momentum lives only on the owner, so optimizer state is saved per rank.
    """
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        params = list(params)
        assert all(p.ndim == 2 for p in params), "Muon takes 2-D parameters only"
        groups = []
        for shape in sorted({p.shape for p in params}):  # sorted: the same order on every rank
            group_params = [p for p in params if p.shape == shape]
            groups.append(dict(params=group_params, zero_buffer=torch.zeros_like(group_params[0])))
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        for group in self.param_groups:
            params, zero = group["params"], group["zero_buffer"]
            for base in range(0, len(params), world_size):
                chunk = params[base:base + world_size]
                # a parameter without a gradient (unused this step) contributes zeros, so no rank waits alone
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in chunk]
                grads += [zero] * (world_size - len(grads))
                owned = base + rank < len(params)
                g = torch.empty_like(zero)
                reduce_scatter_mean(g, grads)
                if owned:
                    p = params[base + rank]
                    muon_update(p, g, self.state[p], group)
                gathered = [p.data for p in chunk] + [torch.empty_like(zero) for _ in range(world_size - len(chunk))]
                dist.all_gather(gathered, params[base + rank].data if owned else zero)
