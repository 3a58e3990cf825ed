import json
import os
import pickle

import pytest
import torch

from checkpoint import load_nanochat
from gpt import GPT, GPTConfig, KVCache


def small_gpt(seed=0, vocab=97, n_kv_head=2):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32))
    model.init_weights()
    with torch.no_grad():  # the nanochat init zeroes lm_head and output projections; make the logits informative
        for name, p in model.named_parameters():
            if "c_proj" in name or "lm_head" in name:
                p.normal_(0, 0.1)
    return model.eval()


def test_d20_has_nanochat_names_and_size():
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280))
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


def test_inputs_embeds_equals_idx():
    model = small_gpt()
    idx = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    embeds = model.transformer.wte(idx)
    torch.testing.assert_close(model(inputs_embeds=embeds), model(idx), rtol=0, atol=0)
    torch.testing.assert_close(model(inputs_embeds=embeds, targets=targets), model(idx, targets=targets), rtol=0, atol=0)
    with pytest.raises(AssertionError):
        model(idx, inputs_embeds=embeds)


def new_cache(model, rows, length):
    cfg = model.config
    return KVCache(cfg.n_layer, rows, cfg.n_kv_head, length, cfg.n_embd // cfg.n_head, "cpu", torch.float32)


def greedy(model, prompt, steps, use_cache):
    ids = list(prompt)
    if not use_cache:
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt):]
    cache = new_cache(model, 1, len(prompt) + steps)
    with cache.prefilling(torch.tensor([0])):
        logits = model(torch.tensor([ids]), kv_cache=cache)[0, -1]
    cache.lengths[0] = len(prompt)
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)[0, -1]
        cache.lengths += 1
    return out


@pytest.mark.parametrize("n_kv_head", [4, 2])  # plain multi-head and grouped-query attention
def test_generation_with_and_without_kv_cache(n_kv_head):
    model = small_gpt(n_kv_head=n_kv_head)
    prompt = [5, 17, 3, 88, 42, 9]
    with torch.no_grad():
        assert greedy(model, prompt, 20, use_cache=True) == greedy(model, prompt, 20, use_cache=False)


def test_right_padded_batch_matches_single_rows():
    """Prompts of different lengths prefilled together (right-padded), then decoded at their own positions."""
    model = small_gpt()
    prompts = [[5, 17, 3, 88, 42, 9], [7, 1]]
    L = max(map(len, prompts))
    ids = torch.zeros(2, L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    with torch.no_grad():
        cache = new_cache(model, 2, L + 1)
        with cache.prefilling(torch.tensor([0, 1])):
            prefill = model(ids, kv_cache=cache)
        cache.lengths[:] = torch.tensor([len(p) for p in prompts])
        batched = model(torch.tensor([[11], [12]]), kv_cache=cache)[:, -1]
        for b, p in enumerate(prompts):
            torch.testing.assert_close(prefill[b, len(p) - 1], model(torch.tensor([p]))[0, -1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched[b], model(torch.tensor([p + [11 + b]]))[0, -1], atol=1e-5, rtol=1e-5)


def test_resize_vocab_keeps_old_logits():
    model = small_gpt()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        before = model(idx)
        model.resize_vocab(103)
        after = model(idx)
    assert after.shape[-1] == 103 and model.config.vocab_size == 103
    torch.testing.assert_close(after[..., :97], before, rtol=0, atol=0)
    assert (after[..., 97:] == 0).all()  # new unembedding rows start at zero
    assert model.transformer.wte.weight[97:].std() > 0.5  # new embedding rows drawn like nanochat's init (std 1)


def test_all_ignored_targets_give_zero_loss_not_nan():
    model = small_gpt()
    loss = model(torch.randint(0, 97, (2, 8)), targets=torch.full((2, 8), -1))
    assert loss.item() == 0.0


def write_nanochat_checkpoint(directory, model, step, tokenizer):
    """The files nanochat's base_train writes: bf16 weights with torch.compile's prefix, meta json, tokenizer.pkl."""
    os.makedirs(directory, exist_ok=True)
    state = {f"_orig_mod.{k}": v.bfloat16() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(directory, f"model_{step:06d}.pt"))
    config = dict(sequence_len=64, vocab_size=model.config.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    with open(os.path.join(directory, f"meta_{step:06d}.json"), "w") as f:
        json.dump(dict(step=step, val_bpb=1.0, model_config=config, user_config={}), f)
    with open(os.path.join(directory, "tokenizer.pkl"), "wb") as f:
        pickle.dump(tokenizer.enc, f)


def test_nanochat_checkpoint_round_trips(tmp_path, tokenizer):
    model = small_gpt(vocab=tokenizer.get_vocab_size())
    write_nanochat_checkpoint(tmp_path / "base_checkpoints" / "d2", model, 100, tokenizer)
    write_nanochat_checkpoint(tmp_path / "base_checkpoints" / "d2", small_gpt(seed=1, vocab=tokenizer.get_vocab_size()), 50, tokenizer)
    loaded, meta, tok_dir = load_nanochat(str(tmp_path))
    assert meta["step"] == 100  # the last step by default
    idx = torch.randint(0, 97, (2, 12))
    expected = small_gpt(vocab=tokenizer.get_vocab_size())
    expected.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(idx), expected(idx))
    assert load_nanochat(str(tmp_path), step=50)[1]["step"] == 50
    assert os.path.exists(os.path.join(tok_dir, "tokenizer.pkl"))


def test_nanochat_checkpoint_with_foreign_keys_is_refused(tmp_path, tokenizer):
    model = small_gpt(vocab=tokenizer.get_vocab_size())
    write_nanochat_checkpoint(tmp_path, model, 7, tokenizer)
    state = torch.load(tmp_path / "model_000007.pt")
    state["value_embeds.0.weight"] = torch.zeros(3, 3)  # newer nanochat's value embeddings
    torch.save(state, tmp_path / "model_000007.pt")
    with pytest.raises(RuntimeError, match="value_embeds"):
        load_nanochat(str(tmp_path))
