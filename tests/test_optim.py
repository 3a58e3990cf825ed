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
