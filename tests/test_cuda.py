"""The paths only a CUDA device takes, each against the path the CPU tests prove: the decode step as a CUDA graph,
SAM's folded attention in bf16, the compiled encoder (packed rows with FlexAttention's block masks: test_vlm, on every
device there is). Skipped without CUDA (CI has none); scripts/gpu_session.sh runs them first on the GPU machine."""
import pytest
import torch

from engine import Engine
from test_engine import pages

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.5, top_k=20, seed=7)])
def test_cuda_graph_decode_gives_the_eager_tokens(make_model, tokenizer, sampling):
    """The decode step replayed as a CUDA graph (the cache, stops, n-gram rule and sampler's generator inside it)
    emits exactly the tokens of the same step run eagerly, with slots reused mid-run; bf16 weights, as readers run."""
    model = make_model(seed=3, generation="2026", sequence_len=512).eval().to(CUDA, torch.bfloat16)
    requests = pages(tokenizer)
    runs = []
    for cuda_graph in (False, True):
        engine = Engine(model, tokenizer, batch_size=2, sync_every=3, cuda_graph=cuda_graph)
        runs.append(dict(engine.generate_iter(requests, 24, no_repeat_ngram_size=3, ngram_window=8, **sampling)))
    assert runs[0] == runs[1]
    assert all(len(tokens) == 24 for tokens in runs[0].values())  # nothing stopped early: every step was compared


@pytest.mark.parametrize("side", [14, 64])  # a window block, and the global grid of a 1024-px view
def test_folded_sam_attention_in_bf16_is_close_and_deterministic_when_asked(side):
    """The fused path the model trains with on a GPU (bias folded into q/k, SDPA's memory-efficient kernel, bf16)
    against the fp32 bias-as-mask reference; and with torch.use_deterministic_algorithms its backward is bitwise the
    same twice. (Left to itself that kernel splits the 4096 keys of a global block and adds dq atomically, as CUDA's
    embedding backward does: a GPU run is bitwise repeatable only in deterministic mode. Flex's score_mod gradient
    is an atomic add with no deterministic form at all.)"""
    from deepencoder.sam_vary_sdpa import folded_attention, reference_attention, relative_position_terms
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 12, side * side, 64, generator=g) for _ in range(3)]
    inputs += [0.02 * torch.randn(2 * side - 1, 64, generator=g) for _ in range(2)]
    cotangent = torch.randn(2, 12, side * side, 64, generator=g).to(CUDA)

    def run(attention, dtype):
        leaves = [t.to(CUDA, dtype).requires_grad_() for t in inputs]
        q, k, v, rel_pos_h, rel_pos_w = leaves
        out = attention(q, k, v, *relative_position_terms(q, rel_pos_h, rel_pos_w, side, side))
        (out.float() * cotangent).sum().backward()
        return out.float().detach(), [t.grad.float() for t in leaves]
    folded = lambda q, k, v, rh, rw: folded_attention(q, k, v, rh, rw, side, side)  # noqa: E731
    out, grads = run(folded, torch.bfloat16)
    ref_out, ref_grads = run(reference_attention, torch.float32)
    assert (out - ref_out).norm() / ref_out.norm() < 2e-2
    for grad, ref in zip(grads, ref_grads):
        assert (grad - ref).norm() / ref.norm() < 5e-2
    torch.use_deterministic_algorithms(True)
    try:
        first, again = run(folded, torch.bfloat16), run(folded, torch.bfloat16)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


def test_the_compiled_encoder_equals_the_eager_one_for_every_view_count(make_model):
    """torch.compile (inductor) of the DeepEncoder: the eager outputs for 1, 2, 3 and 5 views, in at most two graphs."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    encoder = make_model(seed=4).encoder.to(CUDA).eval()
    compiled = torch.compile(encoder)
    with torch.no_grad():
        for n in (1, 2, 3, 5):
            views = torch.randn(n, 3, 512, 512, device=CUDA)
            torch.testing.assert_close(compiled(views), encoder(views), rtol=1e-3, atol=1e-3)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()
