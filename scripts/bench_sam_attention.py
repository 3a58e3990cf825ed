"""
SAM's attention with its decomposed relative-position bias, three ways, at ViT-B's shapes (12 heads of 64; a global
block over the 64 x 64 grid of a 1024-px view, and a window block: 25 windows of 14 x 14 per view): forward and
backward time, the largest relative difference from the reference, and whether two backward passes are bitwise equal
(every gradient; --deterministic: under torch.use_deterministic_algorithms, which flex cannot honour).
  reference: the bias built as an SDPA mask (one head at a time at the global grid, to bound its memory)
  folded:    the bias folded into q and k, plain SDPA (the path the model runs)
  flex:      the bias as a FlexAttention score_mod (CUDA: compiled, backward by atomic adds; CPU: forward only)

  python -m scripts.bench_sam_attention [--views 2] [--device cuda] [--repeats 3]
"""
import argparse
import time

import torch

from deepencoder.sam_vary_sdpa import folded_attention, reference_attention, relative_position_terms


def flex_attention_with_bias(q, k, v, rel_h, rel_w, W):
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention) if q.is_cuda else flex_attention

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + rel_h[b, h, q_idx, kv_idx // W] + rel_w[b, h, q_idx, kv_idx % W]
    return flex(q, k, v, score_mod=add_bias)


def measure(name, attention, inputs, H, W, repeats, backward):
    """(seconds per forward[+backward], output, gradients of q, k, v and the bias tables)."""
    def once():
        leaves = [t.detach().clone().requires_grad_(backward) for t in inputs]
        q, k, v, rel_pos_h, rel_pos_w = leaves
        rel_h, rel_w = relative_position_terms(q, rel_pos_h, rel_pos_w, H, W)
        out = attention(q, k, v, rel_h, rel_w)
        if backward:
            out.float().square().mean().backward()
        return out.detach(), [t.grad for t in leaves] if backward else []
    once()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = once()
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    again = once()
    deterministic = all(torch.equal(a, b) for a, b in zip(result[1], again[1])) if backward else None
    return min(times), result, deterministic


def main():
    parser = argparse.ArgumentParser(description="SAM attention: bias as a mask, folded into q/k, or a flex score_mod")
    parser.add_argument("--views", type=int, default=2, help="1024-px views at once")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the best counts)")
    parser.add_argument("--deterministic", action="store_true", help="under torch.use_deterministic_algorithms(True)")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(args.deterministic)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(f"{args.device}, {dtype}, {args.views} view(s), {torch.get_num_threads()} threads"
          + (", deterministic algorithms" if args.deterministic else ""))
    print(f"{'block':<8} {'path':<10} {'fwd+bwd ms':>11} {'vs reference':>13} {'max rel diff':>13} {'bwd bitwise':>12}")
    g = torch.Generator().manual_seed(0)
    for block, (n, side) in (("global", (args.views, 64)), ("window", (25 * args.views, 14))):
        HW = side * side
        inputs = [torch.randn(n, 12, HW, 64, generator=g) for _ in range(3)]
        inputs += [0.02 * torch.randn(2 * side - 1, 64, generator=g) for _ in range(2)]
        inputs = [t.to(args.device, dtype) for t in inputs]
        paths = dict(reference=reference_attention,
                     folded=lambda q, k, v, rh, rw: folded_attention(q, k, v, rh, rw, side, side),
                     flex=lambda q, k, v, rh, rw: flex_attention_with_bias(q, k, v, rh, rw, side))
        results = {}
        for name, attention in paths.items():
            backward = args.device == "cuda" or name != "flex"  # CPU flex has no backward
            try:
                results[name] = measure(name, attention, inputs, side, side, args.repeats, backward)
            except RuntimeError as e:  # an op with no deterministic form refuses deterministic mode
                print(f"{block:<8} {name:<10} refused: {str(e).splitlines()[0][:90]}")
        ref_seconds, (ref_out, _), _ = results["reference"]
        for name, (seconds, (out, _), deterministic) in results.items():
            diff = ((out.float() - ref_out.float()).abs().max() / ref_out.float().abs().max()).item()
            kind = "" if deterministic is not None else " (fwd only)"
            print(f"{block:<8} {name:<10} {1000 * seconds:>11.1f} {seconds / ref_seconds:>12.2f}x {diff:>13.1e} "
                  f"{'-' if deterministic is None else str(deterministic):>12}{kind}")


if __name__ == "__main__":
    main()
