"""
Muon: SGD-momentum whose 2-D update is orthogonalised by a Newton-Schulz iteration
(Keller Jordan, https://kellerjordan.github.io/posts/muon/; nanochat / modded-nanogpt).
Only for 2-D matrices; embeddings, lm_head, convs, norms and biases go to AdamW.
Matrices of one shape are updated together: their gradients are stacked and orthogonalised in one batched
iteration (a d20 GPT has 120 matrices in 3 shapes: a few large matmuls instead of hundreds of small ones).
"""
import torch
import torch.distributed as dist

from common import compute_dtype, reduce_scatter_mean


def zeropower_via_newtonschulz5(G, steps):
    """
    Quintic Newton-Schulz towards the nearest semi-orthogonal matrix, for each matrix of a (..., m, n) stack.
    The coefficients maximise the slope at zero, so the result is U S' V^T with S' ~ U(0.5, 1.5), which trains
    as well as U V^T. In the device's compute dtype: bf16 where it multiplies bf16 natively (stable in bf16, as
    nanochat runs it), fp32 elsewhere, where bf16 matmuls are slow.
    """
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(compute_dtype(G.device))
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


def muon_update(grads, state, group):
    """(n, m, k) stacked gradients -> their updates: momentum, Nesterov look-ahead, orthogonalise, scale for the
    matrices' aspect ratio. The momentum buffer is the stack's, kept in `state`."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grads)
    buf = state["momentum_buffer"]
    buf.lerp_(grads, 1 - group["momentum"])
    g = grads.lerp_(buf, group["momentum"]) if group["nesterov"] else buf
    update = zeropower_via_newtonschulz5(g, steps=group["ns_steps"]).to(grads.dtype)
    return update.mul_(-group["lr"] * max(1, g.size(-2) / g.size(-1)) ** 0.5)


def shape_groups(params):
    """One parameter group per matrix shape, in the same order on every rank."""
    params = list(params)
    assert all(p.ndim == 2 for p in params), "Muon takes 2-D parameters only"
    return [dict(params=[p for p in params if p.shape == shape]) for shape in sorted({p.shape for p in params})]


def stacked_grads(params):
    """The gradients of same-shape parameters as one (n, m, k) tensor; one without a gradient counts as zeros."""
    return torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        super().__init__(shape_groups(params), dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            update = muon_update(stacked_grads(params), self.state[params[0]], group)  # the stack's state
            torch._foreach_add_(params, list(update.unbind(0)))


class DistMuon(torch.optim.Optimizer):
    """
    Muon across ranks. Each shape's stack is cut into world_size equal slices (zero-padded); a rank gets the
    averaged gradients of its slice (reduce-scatter), updates those matrices in one batched iteration, and the
    slices are all-gathered back to every rank. Momentum lives only with a slice's owner: state is saved per rank.
    """
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        super().__init__(shape_groups(params), dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        world_size = dist.get_world_size()
        for group in self.param_groups:
            params = group["params"]
            per_rank = -(-len(params) // world_size)
            grads = stacked_grads(params)
            grads = torch.cat([grads, grads.new_zeros(per_rank * world_size - len(params), *grads.shape[1:])])
            mine = torch.empty_like(grads[:per_rank])
            reduce_scatter_mean(mine, grads.chunk(world_size))
            update = muon_update(mine, self.state[params[0]], group)
            gathered = torch.empty_like(grads)
            dist.all_gather(list(gathered.chunk(world_size)), update.contiguous())
            torch._foreach_add_(params, list(gathered.unbind(0))[:len(params)])
