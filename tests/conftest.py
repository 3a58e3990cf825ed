"""Tests run on the CPU, offline, with every file under a temporary base directory. Under pytest-xdist (the test
command runs one worker per core) each worker has a directory of its own and one thread, and the long learning test
starts first, so the other workers share out the rest meanwhile."""
import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["NANO_DEEPSEEK_OCR_FP32"] = "1"  # exact comparisons in fp32; the learning test opts into the CPU's bf16
if "NANO_DEEPSEEK_OCR_DIR" not in os.environ:  # a base directory of the session's own, removed when it ends
    os.environ["NANO_DEEPSEEK_OCR_DIR"] = tempfile.mkdtemp(prefix="ndo-tests-")
    atexit.register(shutil.rmtree, os.environ["NANO_DEEPSEEK_OCR_DIR"], ignore_errors=True)
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
# under xdist: checkpoints of two tests that run at once must not meet; one thread per worker and its subprocesses
# (torch reads OMP_NUM_THREADS when it is imported, below)
if WORKER:
    os.environ["NANO_DEEPSEEK_OCR_DIR"] = os.path.join(os.environ["NANO_DEEPSEEK_OCR_DIR"], WORKER)
    os.makedirs(os.environ["NANO_DEEPSEEK_OCR_DIR"], exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from gpt import GENERATIONS, GPTConfig  # noqa: E402
from deepencoder.encoder import encoder_configs  # noqa: E402
from nano_deepseek_ocr import NanoDeepseekOCRConfig, build_model  # noqa: E402
from scripts.tok_train import train_tokenizer  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # tests of the CUDA paths run where there is one


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(512, num_docs=1000)


@pytest.fixture(scope="session")
def make_model(tokenizer):
    return lambda **kwargs: tiny_model(tokenizer, **kwargs)


def tiny_model(tokenizer, n_layer=2, n_embd=64, seed=0, sequence_len=1024, generation="2025", encoder="tiny"):
    """A tiny NanoDeepseekOCR (a tiny encoder, v1 or v2, and a 2-layer GPT of nanochat's 2025 or 2026 generation)
    with the tokenizer's vocabulary."""
    torch.manual_seed(seed)
    sam, clip, qwen2 = encoder_configs(encoder)
    gpt = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=n_layer, n_head=2, n_kv_head=2,
                    n_embd=n_embd, **GENERATIONS[generation])
    model = build_model(NanoDeepseekOCRConfig(sam, clip, gpt, tokenizer.image_token_id, qwen2))
    informative(model.gpt)
    return model


@torch.no_grad()
def informative(gpt):
    """nanochat zero-inits lm_head and the output projections, and smear starts switched off: give the tests
    non-trivial logits and every part of the GPT something to do."""
    gpt.lm_head.weight.normal_(0, 0.05)
    for block in gpt.transformer.h:
        block.attn.c_proj.weight.normal_(0, 0.05)
        block.mlp.c_proj.weight.normal_(0, 0.05)
        if block.attn.ve_gate is not None:
            block.attn.ve_gate.weight.normal_(0, 0.5)
    if gpt.smear_gate is not None:
        gpt.smear_gate.weight.normal_(0, 0.5)
        gpt.smear_lambda.fill_(0.8)
    return gpt


@pytest.fixture
def exact_fp32():
    """fp32 on CUDA without TF32 (cuDNN's default for convolutions, compute_init's for matmuls), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(path))
    return str(path)


def tiny_train_config(tokenizer_dir, **overrides):
    """Stage-1 config of a tiny model on synthetic formula pages, for CPU tests."""
    from train import TrainConfig
    cfg = TrainConfig(encoder="tiny", depth=2, modes="tiny", init_encoder="random", tokenizer=tokenizer_dir, num_synthetic=8,
                      synthetic_kinds="formula", synthetic_max_size=640, device_batch_size=2, num_workers=0, seq_len=256,
                      num_iterations=4, warmup_steps=1, eval_every=0, sample_count=0, save_every=0, vision_lr=1e-5)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="session")
def overfit_run(tokenizer_dir):
    """Tier 1: a tiny model trained to memorise 8 synthetic pages. Returns (config, training summary)."""
    from train import train
    cfg = tiny_train_config(tokenizer_dir, model_tag="overfit", depth=4, device_batch_size=3, num_iterations=70, warmup_steps=10)
    return cfg, train(cfg)


def pytest_collection_modifyitems(items):
    """The tests of the trained overfit model are long too (every worker trains it once, 80 s); the long ones go
    first: a worker takes each at once and the others run everything else meanwhile."""
    for item in items:
        if "overfit_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.long)
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
