"""nanochat's GPT in both generations: names and sizes, cached and packed forwards equal to plain ones, vocab growth,
and checkpoints in nanochat's own layout loaded with the writer's logits (or refused by name)."""
import json
import os
import pickle

import pytest
import torch

from checkpoint import CheckpointError
from conftest import informative
from gpt import GENERATIONS, GPT, GPTConfig, KVCache, window_sizes
from nano_deepseek_ocr import load_nanochat

GENS = list(GENERATIONS)


def small_gpt(generation="2025", seed=0, vocab=97, n_kv_head=2, n_layer=4, sequence_len=512):
    """A 4-layer GPT; at sequence_len 512 the 2026 generation's short windows (128 keys) bind beyond 129 tokens."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab, n_layer=n_layer, n_head=4, n_kv_head=n_kv_head,
                          n_embd=32, **GENERATIONS[generation]))
    model.init_weights()
    return informative(model).eval()


def d20(generation, vocab):
    with torch.device("meta"):
        return GPT(GPTConfig(sequence_len=2048, vocab_size=vocab, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280,
                             **GENERATIONS[generation]))


def test_d20_has_nanochat_names_and_size():
    model = d20("2025", 65536)
    expected = ["transformer.wte.weight"]
    for i in range(20):
        expected += [f"transformer.h.{i}.attn.c_{x}.weight" for x in ("q", "k", "v", "proj")]
        expected += [f"transformer.h.{i}.mlp.c_fc.weight", f"transformer.h.{i}.mlp.c_proj.weight"]
    expected.append("lm_head.weight")
    state = model.state_dict()
    assert list(state) == expected
    assert sum(p.numel() for p in model.parameters()) == 560_988_160
    assert state["transformer.h.0.mlp.c_fc.weight"].shape == (5120, 1280)
    assert state["lm_head.weight"].shape == (65536, 1280)


def test_d20_of_2026_has_nanochat_names_and_size():
    model = d20("2026", 32768)
    state = model.state_dict()
    assert list(state)[:5] == ["resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda", "transformer.wte.weight"]
    ve_layers = [i for i in range(20) if i % 2 == 1]  # alternating, the last (19) among them
    assert [k for k in state if k.startswith("value_embeds")] == [f"value_embeds.{i}.weight" for i in ve_layers]
    assert [i for i in range(20) if f"transformer.h.{i}.attn.ve_gate.weight" in state] == ve_layers
    assert state["transformer.h.1.attn.ve_gate.weight"].shape == (10, 12) and state["smear_gate.weight"].shape == (1, 24)
    assert sum(p.numel() for p in model.parameters()) == 896_533_746  # nanochat's own GPT at its head, on meta
    assert window_sizes(model.config) == [512, 512, 512, 2048] * 5  # a quarter of 2048, the last layer long
    assert d20("2026", 65530).lm_head.weight.shape == (65536, 1280)  # padded to a multiple of 64


@pytest.mark.parametrize("generation", GENS)
def test_inputs_embeds_equals_idx(generation):
    model = small_gpt(generation)
    idx = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    embeds = model.transformer.wte(idx)
    torch.testing.assert_close(model(idx, inputs_embeds=embeds), model(idx), rtol=0, atol=0)
    torch.testing.assert_close(model(idx, targets, inputs_embeds=embeds), model(idx, targets=targets), rtol=0, atol=0)


def new_cache(model, rows, length):
    cfg = model.config
    return KVCache(cfg.n_layer, rows, cfg.n_kv_head, length, cfg.n_embd // cfg.n_head, "cpu", torch.float32, cfg.n_embd)


def greedy(model, prompt, steps, use_cache):
    ids = list(prompt)
    if not use_cache:
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt):]
    cache = new_cache(model, 1, len(prompt) + steps)
    with cache.prefilling(torch.tensor([0]), torch.tensor([len(prompt)])):
        logits = model(torch.tensor([ids]), kv_cache=cache)[0, -1]
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)[0, -1]
        cache.advance(1)
    return out


@pytest.mark.parametrize("generation", GENS)
@pytest.mark.parametrize("n_kv_head", [4, 2])  # plain multi-head and grouped-query attention
def test_generation_with_and_without_kv_cache(generation, n_kv_head):
    model = small_gpt(generation, n_kv_head=n_kv_head)
    prompt = torch.randint(0, 97, (140,), generator=torch.Generator().manual_seed(1)).tolist()  # past the short window
    with torch.no_grad():
        assert greedy(model, prompt, 24, use_cache=True) == greedy(model, prompt, 24, use_cache=False)


@pytest.mark.parametrize("generation", GENS)
def test_right_padded_batch_matches_single_rows(generation):
    """Prompts of different lengths prefilled together (right-padded), then decoded at their own positions."""
    model = small_gpt(generation)
    prompts = [torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(2)).tolist(), [7, 1]]
    L = max(map(len, prompts))
    ids = torch.zeros(2, L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    with torch.no_grad():
        cache = new_cache(model, 2, L + 1)
        with cache.prefilling(torch.tensor([0, 1]), lengths):
            prefill = model(ids, kv_cache=cache)
        batched = model(torch.tensor([[11], [12]]), kv_cache=cache)[:, -1]
        for b, p in enumerate(prompts):
            torch.testing.assert_close(prefill[b, len(p) - 1], model(torch.tensor([p]))[0, -1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched[b], model(torch.tensor([p + [11 + b]]))[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("generation", GENS)
def test_packed_rows_equal_one_sample_per_row(generation):
    """Samples packed into one row (document ids, positions restarting) give each sample's own logits: attention,
    sliding windows and smear stay inside a sample."""
    model = small_gpt(generation)
    g = torch.Generator().manual_seed(3)
    samples = [torch.randint(0, 97, (n,), generator=g) for n in (160, 7, 140)]
    ids = torch.cat(samples)[None]
    doc_ids = torch.cat([torch.full((len(s),), d) for d, s in enumerate(samples)])[None]
    positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids, positions=positions)[0]
        alone = torch.cat([model(s[None])[0] for s in samples])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("generation", GENS)
def test_resize_vocab_keeps_old_logits(generation):
    model = small_gpt(generation)
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        before = model(idx)
        model.resize_vocab(103)
        after = model(idx)
    assert after.shape[-1] == 103 and model.config.vocab_size == 103
    torch.testing.assert_close(after[..., :97], before, rtol=0, atol=0)
    assert (after[..., 97:] == 0).all()  # new unembedding rows start at zero
    assert model.transformer.wte.weight[97:103].std() > 0.5  # new embedding rows drawn like nanochat's init
    rows = 128 if generation == "2026" else 103  # the padding to a multiple of 64 stays
    assert model.transformer.wte.weight.shape[0] == model.lm_head.weight.shape[0] == rows
    assert all(ve.weight.shape[0] == rows for ve in model.value_embeds.values())


def test_all_ignored_targets_give_zero_loss_not_nan():
    model = small_gpt()
    loss = model(torch.randint(0, 97, (2, 8)), targets=torch.full((2, 8), -1))
    assert loss.item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_loss_on_target_rows_equals_the_loss_over_all_logits(reduction):
    """Training computes logits only where a target is (image slots and prompts have none): the loss and every
    gradient equal those of all the row's logits ("none" keeps them all)."""
    model = small_gpt().train()
    idx, targets = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 24))
    targets[0, :10], targets[1, 5:20] = -1, -1  # ignored runs, as image slots and prompts are
    losses, grads = [], []
    for whole in (False, True):
        model.zero_grad(set_to_none=True)
        loss = model(idx, targets, loss_reduction="none" if whole else reduction)
        if whole:
            loss = loss.sum() / ((targets != -1).sum() if reduction == "mean" else 1)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def write_nanochat_checkpoint(directory, model, step, tokenizer, generation):
    """The files nanochat's base_train writes: the state dict with torch.compile's prefix and bf16 embeddings (as a
    CUDA run keeps wte and the value embeddings), meta_XXXXXX.json with nanochat's model_config, tokenizer.pkl."""
    os.makedirs(directory, exist_ok=True)
    state = {f"_orig_mod.{k}": v.bfloat16() if "wte" in k or "value_embeds" in k else v
             for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(directory, f"model_{step:06d}.pt"))
    c = model.config
    config = dict(sequence_len=c.sequence_len, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                  n_kv_head=c.n_kv_head, n_embd=c.n_embd, **(dict(window_pattern="SSSL") if generation == "2026" else {}))
    with open(os.path.join(directory, f"meta_{step:06d}.json"), "w") as f:
        json.dump(dict(step=step, val_bpb=1.0, model_config=config, user_config={}), f)
    with open(os.path.join(directory, "tokenizer.pkl"), "wb") as f:
        pickle.dump(tokenizer.enc, f)


def rounded(model, generation):
    """The model as its checkpoint holds it: embeddings through bf16."""
    copy = small_gpt(generation)
    copy.load_state_dict({k: v.bfloat16().float() if "wte" in k or "value_embeds" in k else v
                          for k, v in model.state_dict().items()})
    return copy


@pytest.mark.parametrize("generation", GENS)
def test_nanochat_checkpoint_loads_with_the_writers_logits(tmp_path, tokenizer, generation):
    model = small_gpt(generation)
    write_nanochat_checkpoint(tmp_path / "base_checkpoints" / "d4", model, 100, tokenizer, generation)
    write_nanochat_checkpoint(tmp_path / "base_checkpoints" / "d4", small_gpt(generation, seed=1), 50, tokenizer, generation)
    loaded, meta, tok_dir = load_nanochat(str(tmp_path))
    assert meta["step"] == 100  # the last step by default
    assert {k: getattr(loaded.config, k) for k in GENERATIONS["2026"]} == \
        {k: getattr(model.config, k) for k in GENERATIONS["2026"]}  # the generation, recognised
    idx = torch.randint(0, 97, (2, 150))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(idx), rounded(model, generation)(idx), rtol=0, atol=0)
    assert load_nanochat(str(tmp_path), step=50)[1]["step"] == 50
    assert os.path.exists(os.path.join(tok_dir, "tokenizer.pkl"))


def test_an_in_between_checkpoint_is_refused(tmp_path, tokenizer):
    """nanochat of Jan-Mar 2026: lambdas and value embeddings but no smear or backout; its RoPE base, q/k scale and
    softcap are not recorded, so it could only be loaded wrong."""
    write_nanochat_checkpoint(tmp_path, small_gpt("2026"), 7, tokenizer, "2026")
    state = torch.load(tmp_path / "model_000007.pt")
    for key in ("_orig_mod.smear_gate.weight", "_orig_mod.smear_lambda", "_orig_mod.backout_lambda"):
        del state[key]
    torch.save(state, tmp_path / "model_000007.pt")
    with pytest.raises(CheckpointError, match=r"between the supported generations.*'smear_gate.weight'.*2c4473d.*a825e63"):
        load_nanochat(str(tmp_path))


def test_unknown_meta_keys_and_stray_tensors_are_refused(tmp_path, tokenizer):
    write_nanochat_checkpoint(tmp_path, small_gpt(), 7, tokenizer, "2025")
    meta = json.load(open(tmp_path / "meta_000007.json"))
    json.dump(dict(meta, model_config=dict(meta["model_config"], rope_theta=5e5)), open(tmp_path / "meta_000007.json", "w"))
    with pytest.raises(CheckpointError, match="rope_theta"):
        load_nanochat(str(tmp_path))
    json.dump(meta, open(tmp_path / "meta_000007.json", "w"))
    state = torch.load(tmp_path / "model_000007.pt")
    state["_orig_mod.transformer.h.0.attn.c_gate.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "model_000007.pt")
    with pytest.raises(CheckpointError, match="c_gate"):
        load_nanochat(str(tmp_path))


@pytest.mark.parametrize("window", [None, 200])
def test_the_document_block_mask_equals_the_element_mask(window):
    """The BlockMask built from the samples' extents (CUDA's) attends exactly where the element-wise document mask
    (the CPU's) does, on random packings: FlexAttention with one equals SDPA with the other."""
    import warnings
    from torch.nn.attention.flex_attention import flex_attention
    from gpt import document_block_mask, document_mask
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (12, 12, 1):  # two rows of many samples, one of a single long one
        lengths = torch.randint(1, 300, (n,), generator=g).tolist() if n > 1 else [600]
        row = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[:640]
        rows.append(torch.cat([row, torch.full((640 - len(row),), -1)]))  # padding at the end
    doc_ids = torch.stack(rows)
    q, k, v = (torch.randn(3, 2, 640, 16, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex uncompiled: the reference form, fine on the CPU
        blocks = flex_attention(q, k, v, block_mask=document_block_mask(doc_ids, window))
    elements = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc_ids, window))
    torch.testing.assert_close(blocks, elements, atol=1e-5, rtol=1e-5)
    mask = document_block_mask(doc_ids, window)
    assert (mask.kv_num_blocks + mask.full_kv_num_blocks).sum() < 3 * 15  # fewer than causal: blocks between samples skipped
    assert (mask.full_kv_num_blocks.sum() > 0) == (window is None)  # inside one sample, whole (a window of 200 cuts them)
