import os
import subprocess
import sys

import torch

from muon import Muon, zeropower_via_newtonschulz5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import dist_optim_worker  # noqa: E402


def test_newton_schulz_orthogonalises():
    G = torch.randn(16, 48)
    X = zeropower_via_newtonschulz5(G, steps=5)
    s = torch.linalg.svdvals(X)
    assert X.shape == G.shape and 0.5 < s.min() and s.max() < 1.5  # singular values pulled towards 1
    assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 2


def test_newton_schulz_runs_in_the_compute_dtype(monkeypatch):
    """bf16 where the CPU multiplies it natively (the precision rule's), and it orthogonalises there too."""
    import common
    monkeypatch.delenv("NANO_DEEPSEEK_OCR_FP32", raising=False)
    G = torch.randn(3, 16, 48)
    for native, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(common, "cpu_has_bf16", lambda: native)
        X = zeropower_via_newtonschulz5(G, steps=5)
        s = torch.linalg.svdvals(X.float())
        assert X.dtype == dtype and 0.5 < s.min() and s.max() < 1.5


def test_batched_muon_equals_muon_one_matrix_at_a_time():
    """Same-shape matrices stacked into one Newton-Schulz iteration give what updating each alone gives."""
    torch.manual_seed(0)
    shapes = [(16, 48), (48, 16), (16, 48), (32, 32), (16, 48)]
    batched = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in batched]
    optimizer = Muon(batched, lr=0.05)
    assert len(optimizer.param_groups) == 3  # one per shape
    buffers = [torch.zeros_like(p) for p in alone]
    for step in range(4):
        grads = [torch.randn(*s) for s in shapes]
        for p, g in zip(batched, grads):
            p.grad = g.clone()
        optimizer.step()
        with torch.no_grad():  # the update as it was written for one matrix: momentum, Nesterov, orthogonalise, scale
            for p, g, buf in zip(alone, grads, buffers):
                buf.lerp_(g, 1 - 0.95)
                update = zeropower_via_newtonschulz5(g.lerp(buf, 0.95), steps=5)
                p.add_(update, alpha=-0.05 * max(1, p.size(0) / p.size(1)) ** 0.5)
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_muon_only_takes_matrices():
    try:
        Muon([torch.nn.Parameter(torch.zeros(3))])
    except AssertionError:
        return
    raise AssertionError("Muon accepted a 1-D parameter")


def test_distributed_optimizers_match_single_process(tmp_path):
    single, names = dist_optim_worker.run(rank=0, world_size=1)
    assert names == ["AdamW", "Muon"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "tests", "dist_optim_worker.py"), str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["optimizers"] == ["DistAdamW", "DistMuon"]
    # the group is really gone after compute_cleanup: a gloo worker left running can abort the process at exit
    assert ranks[0]["gloo_threads_after_cleanup"] == ranks[1]["gloo_threads_after_cleanup"] == []
    initial = dist_optim_worker.build()[0].state_dict()
    for name, value in single.items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0]["state"][name], value, atol=2e-5, rtol=1e-4, msg=f"{name} vs single process")
        if name in initial:
            assert not torch.equal(value, initial[name]), f"{name} never moved"
