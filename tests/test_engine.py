"""The engine against uncached generation: same greedy tokens with mixed prompts, modes, stops and the n-gram rule;
continuous batching; the n-gram rule on the device against its plain-Python statement."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, ngram_bans, table_whitelist
from image_process import DeepseekOCRProcessor


def reference_bans(tokens, n, window, whitelist=()):
    """DeepSeek-OCR's NoRepeatNGramLogitsProcessor, as their OCR scripts run it, over the generated tokens."""
    if len(tokens) < n:
        return set()
    prefix = tuple(tokens[len(tokens) - (n - 1):])
    start = max(0, len(tokens) - window)
    banned = {tokens[i + n - 1] for i in range(start, len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}
    return banned - set(whitelist)


@torch.no_grad()
def uncached_greedy(model, ids, images, max_new, stops, n=0, window=90, whitelist=()):
    """The whole sequence recomputed by the GPT for every new token (the images encoded once, which changes no
    value): what the engine must reproduce."""
    out = []
    prompt = model.embed(torch.tensor([ids]), images)
    for _ in range(max_new):
        embeds = torch.cat([prompt, model.gpt.transformer.wte(torch.tensor([out], dtype=torch.long))], dim=1)
        logits = model.gpt(torch.tensor([ids + out]), inputs_embeds=embeds)[0, -1].float()
        logits[model.image_token_id] = -float("inf")
        for t in reference_bans(out, n, window, whitelist) if n else ():
            logits[t] = -float("inf")
        token = int(logits.argmax())
        if token in stops:
            break
        out.append(token)
    return out


def device_bans(tokens, n, window, whitelist=()):
    W = max(window, n)
    recent = torch.zeros(1, W, dtype=torch.long)
    tail = tokens[-W:]
    if tail:
        recent[0, W - len(tail):] = torch.tensor(tail)
    bans = ngram_bans(recent, torch.tensor([len(tokens)]), n, torch.tensor(list(whitelist), dtype=torch.long), 99)
    return set(bans[0].tolist()) - {99}


@pytest.mark.parametrize("bans", [reference_bans, device_bans])
def test_no_repeat_ngram_rule(bans):
    tokens = [1, 2, 3, 9, 1, 2]
    assert bans(tokens, 3, window=90) == {3}  # "1 2 3" again would repeat a 3-gram
    assert bans(tokens, 3, window=90, whitelist={3}) == set()
    assert bans(tokens, 3, window=3) == set()  # the first "1 2 3" is outside the window
    assert bans([1, 1, 1, 1], 2, window=90) == {1}


def test_ngram_bans_match_the_reference():
    rng = random.Random(0)
    for trial in range(300):
        n, window = rng.choice([(1, 5), (2, 6), (3, 10), (4, 90), (3, 3)])
        tokens = [rng.randrange(4) for _ in range(rng.randrange(0, 40))]
        whitelist = [1] if trial % 3 == 0 else []
        assert device_bans(tokens, n, window, whitelist) == reference_bans(tokens, n, window, whitelist), (tokens, n)


def pages(tokenizer):
    """Mixed requests: different images, modes and prompts, so prompt lengths differ (73 to 1000+ slots)."""
    rng = np.random.default_rng(1)
    specs = [((300, 400), "tiny", "Free OCR."), ((1400, 900), "gundam", "Parse the figure."),
             ((500, 500), "small", "<|grounding|>Convert the document to markdown."), ((640, 480), "tiny", "Hi.")]
    requests = []
    for i, ((w, h), mode, prompt) in enumerate(specs):
        item = DeepseekOCRProcessor(mode).process_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
        ids = tokenizer.render_for_completion(f"<image>\n{prompt}", [item.slots])
        requests.append((i, ids, [item]))
    return requests


@pytest.mark.parametrize("ngram,generation", [(0, "2025"), (3, "2025"), (3, "2026")])
def test_engine_equals_uncached_generation(make_model, tokenizer, ngram, generation):
    model = make_model(seed=3, generation=generation, sequence_len=512).eval()  # 2026: windows of 128 keys bind
    requests = pages(tokenizer)
    free = {i: uncached_greedy(model, ids, images, 14, stops=[], n=ngram, window=8) for i, ids, images in requests}
    # stop tokens that end requests at different steps: tokens the free-running reference emits (a run with stops is
    # the free run cut before the first of them)
    def ends(stops):
        return {next((k for k, t in enumerate(v) if t in stops), len(v)) for v in free.values()}
    stops = next([a, b] for a in free[0][2:] for b in free[2][4:] if len(ends((a, b))) > 1)
    expected = {i: uncached_greedy(model, ids, images, 14, stops, n=ngram, window=8) for i, ids, images in requests}
    assert len({len(v) for v in expected.values()}) > 1  # the requests really stop at different steps
    for batch_size in (1, 2, 4):  # one slot at a time, slots reused mid-run, everything at once
        engine = Engine(model, tokenizer, batch_size=batch_size, sync_every=3)
        got = dict(engine.generate_iter(requests, 14, stop_tokens=stops, no_repeat_ngram_size=ngram, ngram_window=8))
        assert got == expected


def test_a_page_never_waits_behind_a_finished_one(make_model, tokenizer):
    model = make_model(seed=3).eval()
    requests = pages(tokenizer)[:3]
    free = {i: uncached_greedy(model, ids, images, 30, stops=[]) for i, ids, images in requests}
    # stops that end request 1 within 3 tokens and request 2 within 10, while request 0 runs all 30
    stops = next([a, b] for a in free[1][:3] for b in free[2][:10] if a not in free[0] and b not in free[0])
    expected = {i: uncached_greedy(model, ids, images, 30, stops) for i, ids, images in requests}
    assert len(expected[1]) < 3 and len(expected[2]) < 10 and len(expected[0]) == 30
    engine = Engine(model, tokenizer, batch_size=2, sync_every=2)
    finished = list(engine.generate_iter(requests, 30, stop_tokens=stops))
    assert dict(finished) == expected
    # two slots: 0 and 1 start; 1 ends at once and 2 takes its slot, so 2 finishes before 0 though it came later
    assert [key for key, _ in finished] == [1, 2, 0]


def test_image_token_is_never_generated(make_model, tokenizer):
    model = make_model()
    with torch.no_grad():
        model.gpt.lm_head.weight[tokenizer.image_token_id] = 50.0  # the model would love to emit <image>
    out = Engine(model, tokenizer).generate([[tokenizer.get_bos_token_id(), 5, 6]], max_new_tokens=5)[0]
    assert tokenizer.image_token_id not in out and len(out) == 5


def test_sampling_is_seeded_and_top_k_one_is_greedy(make_model, tokenizer):
    engine = Engine(make_model(seed=5).eval(), tokenizer)
    prompt = [[tokenizer.get_bos_token_id(), 40, 41, 42]]
    greedy = engine.generate(prompt, max_new_tokens=8)
    assert engine.generate(prompt, max_new_tokens=8, temperature=1.0, top_k=1) == greedy
    a = engine.generate(prompt, max_new_tokens=8, temperature=2.0, seed=1)
    assert a == engine.generate(prompt, max_new_tokens=8, temperature=2.0, seed=1)
    assert any(engine.generate(prompt, max_new_tokens=8, temperature=2.0, seed=s) != a for s in range(2, 6))


def test_read_matches_reading_one_page_at_a_time(make_model, tokenizer):
    engine = Engine(make_model(seed=3).eval(), tokenizer, batch_size=2)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (900, 1400, 3), dtype=np.uint8))]
    together = engine.read(images, ["Free OCR.", "Parse the figure."], "gundam", 12)
    alone = [engine.read([im], p, "gundam", 12)[0] for im, p in zip(images, ["Free OCR.", "Parse the figure."])]
    assert together == alone and all(len(tokenizer.encode(t)) > 3 for t in together)  # it really generated


def test_table_cells_are_exempt_from_the_ngram_rule(tokenizer):
    whitelist = table_whitelist(tokenizer)
    assert "".join(tokenizer.decode([t]) for t in tokenizer.encode("<td>1</td><td>1</td>") if t in whitelist) == \
        "<td></td><td></td>"  # every token of the tags, and nothing of the cells
    repeated = tokenizer.encode("<td>1</td>") * 3
    assert device_bans(repeated, 3, 90) and not device_bans(repeated, 3, 90, whitelist) - set(tokenizer.encode("1"))


def test_the_cache_is_sized_once_per_mode(make_model, tokenizer):
    """Reading allocates the cache for the mode's largest page at once: pages of every size and prompt reuse it, and
    a prompt past that size still fits (the cache grows, keeping the rows at work)."""
    engine = Engine(make_model(seed=3).eval(), tokenizer, batch_size=2)
    pages = [(i, Image.new("RGB", size, (255, 255, 255)), prompt) for i, (size, prompt) in
             enumerate([((300, 400), "Free OCR."), ((1400, 900), "Parse the figure."), ((2000, 500), "Hi.")])]
    dict(engine.read_iter(pages[:2], "gundam", 5))
    cache = engine.cache
    assert cache.k.size(3) == -(-(933 + 256 + 5) // 128) * 128  # Gundam's largest page: 273 + 6 tiles' worth
    dict(engine.read_iter(pages, "gundam", 5))
    assert engine.cache is cache
    long_prompt = tokenizer.encode("word " * 1500)
    assert len(engine.generate([long_prompt], max_new_tokens=3)[0]) <= 3 and engine.cache.k.size(3) >= len(long_prompt)
