"""
Generation (nanochat's name for it): pages stream through a fixed number of slots. A new page's images are
encoded and its prompt prefilled into a free slot of a preallocated KV cache; then every slot decodes one token
per step at its own position, and the step is one CUDA graph replay on a GPU. Stops and DeepSeek's no-repeat
n-gram rule are tensor ops over the whole batch, and the host looks at the batch only every `sync_every` steps:
to hand back finished pages and give their slots to the next ones (continuous batching).

  engine = Engine(model, tokenizer)
  texts = engine.read(images, "Free OCR.", mode="base", max_new_tokens=512)
  for key, text in engine.read_iter(pages, "base", 512): ...   # pages: (key, PIL image, prompt), any length
"""
import itertools
import re
from collections.abc import Sized
from contextlib import nullcontext
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import autocast_context, compute_dtype
from config import image_prompt
from gpt import KVCache
from image_process import DeepseekOCRProcessor, max_image_slots


PROMPT_TEXT_TOKENS = 256  # room for a prompt's text beside its image slots when the cache is sized


class Slots:
    """What each of S slots holds on the device while it decodes: its generated tokens (out) and their count (n_out),
    its last W tokens (recent, for the n-gram rule), whether it is finished (done), its next input token (tokens)."""
    def __init__(self, S, max_new_tokens, W, device):
        self.out = torch.zeros(S, max_new_tokens, dtype=torch.long, device=device)
        self.n_out = torch.zeros(S, dtype=torch.long, device=device)
        self.recent = torch.zeros(S, W, dtype=torch.long, device=device)
        self.done = torch.ones(S, dtype=torch.bool, device=device)  # every slot free
        self.tokens = torch.zeros(S, 1, dtype=torch.long, device=device)
        self.rows = torch.arange(S, device=device)

    def tensors(self):
        """What a decode step changes."""
        return self.out, self.n_out, self.recent, self.done, self.tokens


class Engine:
    def __init__(self, model, tokenizer, batch_size=64, sync_every=8, cuda_graph=True):
        self.model, self.tokenizer = model, tokenizer
        self.device = model.device
        self.batch_size, self.sync_every = batch_size, sync_every
        cuda = self.device.type == "cuda"
        self.cuda_graph = cuda_graph and cuda
        # the weights may be fp32 while training; autocast's cast cache cannot live inside a CUDA graph
        self.autocast = autocast_context(self.device, cache_enabled=False)
        # decode attends with a fixed-shape mask: a fused kernel that takes masks, not one planned per shape (a new
        # context each step: sdpa_kernel's cannot be entered twice)
        self.kernels = partial(sdpa_kernel, [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]) if cuda else nullcontext
        self.cache = self.graph = self.setup_key = None

    # ---- reading pages ---------------------------------------------------------------------------

    def read_iter(self, pages, mode="base", max_new_tokens=512, count=None, **generate_kwargs):
        """pages: iterable of (key, PIL image, prompt), consumed only as slots free up; count: how many there are, when
        a generator cannot say (no more slots than pages). Yields (key, text) as each page finishes."""
        processor = DeepseekOCRProcessor(mode)

        def requests():
            for key, image, prompt in pages:
                item = processor.process_image(image)
                yield key, self.tokenizer.render_for_completion(image_prompt(prompt), [item.slots]), [item]
        count = len(pages) if isinstance(pages, Sized) else count
        batch = min(self.batch_size, count or self.batch_size)
        prompt_len = max_image_slots(mode) + PROMPT_TEXT_TOKENS  # the cache is sized once, for the mode's largest page
        for key, tokens in self.generate_iter(requests(), max_new_tokens, batch_size=batch, prompt_len=prompt_len,
                                              **generate_kwargs):
            yield key, self.tokenizer.decode(tokens)

    def read(self, images, prompts, mode="base", max_new_tokens=512, **generate_kwargs):
        """PIL images and one prompt (or one per image) -> their texts, in order."""
        prompts = [prompts] * len(images) if isinstance(prompts, str) else prompts
        done = dict(self.read_iter([(i, im, p) for i, (im, p) in enumerate(zip(images, prompts))], mode, max_new_tokens,
                                   **generate_kwargs))
        return [done[i] for i in range(len(images))]

    def generate(self, prompts, images=(), max_new_tokens=256, **generate_kwargs):
        """Token id prompts (and the processed images their <image> slots take, in order) -> new token ids, in order."""
        images, requests = iter(images), []
        for i, ids in enumerate(prompts):
            slots, mine = sum(t == self.model.image_token_id for t in ids), []
            while sum(item.slots for item in mine) < slots:
                mine.append(next(images))
            requests.append((i, ids, mine))
        done = dict(self.generate_iter(requests, max_new_tokens, batch_size=min(self.batch_size, len(prompts)),
                                       prompt_len=max(map(len, prompts)), **generate_kwargs))
        return [done[i] for i in range(len(prompts))]

    # ---- the batch loop --------------------------------------------------------------------------

    @torch.no_grad()
    def generate_iter(self, requests, max_new_tokens, batch_size=None, temperature=0.0, top_k=None, seed=42,
                      stop_tokens=None, no_repeat_ngram_size=0, ngram_window=90, ngram_whitelist=(), prompt_len=0):
        """
        requests: iterable of (key, prompt ids, processed images). Yields (key, new token ids without the stop token)
        as each request finishes (a stop token, or max_new_tokens). Greedy unless temperature > 0. The <image> token
        is never generated; with no_repeat_ngram_size n, a token completing an n-gram already generated within the
        last ngram_window tokens is banned (DeepSeek-OCR's rule; ngram_whitelist tokens are exempt). prompt_len: the
        longest prompt expected, so the cache is allocated once (a longer one still fits: the cache grows).
        """
        S = batch_size or self.batch_size
        stops = tuple(stop_tokens) if stop_tokens is not None else (self.tokenizer.stop_token_id,)
        self.setup(S, prompt_len, max_new_tokens, dict(
            stops=stops, whitelist=tuple(ngram_whitelist), n=no_repeat_ngram_size, W=max(ngram_window, no_repeat_ngram_size),
            temperature=temperature, top_k=top_k, seed=seed))
        owner = [None] * S  # the request key each slot is working on
        pending = iter(requests)
        while True:
            # admit new requests into the free slots: encode their images, prefill their prompts, first token
            free = [s for s in range(S) if owner[s] is None]
            new = list(itertools.islice(pending, len(free)))
            if new:
                rows = torch.tensor(free[:len(new)], device=self.device)
                for s, (key, _, _) in zip(free, new):
                    owner[s] = key
                logits = self.prefill(rows, [r[1] for r in new], [im for r in new for im in r[2]])
                self.admit(rows, logits)
            if all(o is None for o in owner):
                return
            # decode sync_every steps without looking: finished rows just stop recording
            for _ in range(self.sync_every):
                self.step()
            # one look at the batch: hand back the finished requests and free their slots
            finished = self.slots.done.cpu().tolist()
            counts = self.slots.n_out.cpu().tolist()
            for s in range(S):
                if owner[s] is not None and finished[s]:
                    yield owner[s], self.slots.out[s, :counts[s]].tolist()
                    owner[s] = None

    def setup(self, S, prompt_len, max_new_tokens, settings):
        """The device state of a generation: the KV cache (allocated once for the longest prompt plus the new tokens;
        the old one is let go first), the slots, the stop and whitelist tokens, and the sampling generator. A decode
        graph is kept while none of it changes."""
        if self.cache is None or self.cache.k.size(1) != S or self.cache.k.size(3) < prompt_len + max_new_tokens:
            self.cache = self.graph = None  # freed before the new one is allocated
            self.cache = self.new_cache(S, prompt_len + max_new_tokens)
        key = (S, max_new_tokens, tuple(sorted(settings.items())))
        if key != self.setup_key:
            self.setup_key, self.settings, self.graph = key, settings, None
            self.slots = Slots(S, max_new_tokens, settings["W"], self.device)
            self.stops = torch.tensor(settings["stops"], dtype=torch.long, device=self.device)
            self.whitelist = torch.tensor(settings["whitelist"], dtype=torch.long, device=self.device)
            self.rng = torch.Generator(device=self.device)
        self.slots.done.fill_(True)  # every slot free
        self.rng.manual_seed(settings["seed"])

    def choose(self, logits, n_out, recent):
        """The next token of each row: the n-gram bans and the <image> ban applied, then greedy or sampled."""
        s = self.settings
        banned = ngram_bans(recent, n_out, s["n"], self.whitelist, self.model.image_token_id)
        logits = logits.float().scatter(1, banned, -float("inf"))  # the <image> token is always in `banned`
        return sample(logits, s["temperature"], s["top_k"], self.rng)

    def record(self, rows, token):
        """Append each row's new token unless the row is finished; a stop token or a full row finishes it."""
        s = self.slots
        going = ~s.done[rows]
        write = going & ~torch.isin(token, self.stops)
        column = s.n_out[rows].clamp(max=s.out.size(1) - 1)
        s.out[rows, column] = torch.where(write, token, s.out[rows, column])
        s.n_out[rows] += write
        s.done[rows] |= going & ~write | (s.n_out[rows] >= s.out.size(1))
        s.recent[rows] = torch.where(write[:, None], torch.cat([s.recent[rows, 1:], token[:, None]], 1), s.recent[rows])
        return write

    def admit(self, rows, logits):
        """New requests in `rows`: their slot state reset, their first token chosen and recorded."""
        s = self.slots
        s.n_out[rows], s.done[rows], s.recent[rows] = 0, False, 0
        s.tokens[rows] = self.choose(logits, s.n_out[rows], s.recent[rows])[:, None]
        self.record(rows, s.tokens[rows, 0])

    # ---- model calls -----------------------------------------------------------------------------

    def prefill(self, rows, prompts, images):
        """Encode the images and run the prompts (right-padded) into the cache rows `rows`; last-token logits."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        T = max(len(p) for p in prompts)
        if T + self.slots.out.size(1) > self.cache.k.size(3):
            self.grow_cache(T + self.slots.out.size(1))
        ids = torch.full((len(prompts), T), self.tokenizer.get_bos_token_id(), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, device=self.device)
        gpt = self.model.gpt
        with self.autocast, self.cache.prefilling(rows, lengths):
            hidden = gpt.hidden(ids, self.model.embed(ids, images), kv_cache=self.cache)
            logits = gpt.logits(hidden[torch.arange(len(prompts), device=self.device), lengths - 1])
        return logits

    def new_cache(self, S, length):
        """A KV cache of S rows in the compute dtype, `length` rounded up to whole blocks of 128 positions (a slightly
        longer prompt still fits)."""
        cfg = self.model.gpt.config
        return KVCache(cfg.n_layer, S, cfg.n_kv_head, -(-length // 128) * 128, cfg.n_embd // cfg.n_head, self.device,
                       compute_dtype(self.device), cfg.n_embd)

    def grow_cache(self, length):
        """A prompt longer than the cache was sized for: the rows at work keep their keys, staged through host memory so
        the old and the new cache are never both on the device."""
        old = self.cache
        keep = [t.cpu() for t in (old.k, old.v, old.lengths, old.previous)]
        self.cache = self.graph = old = None
        self.cache = self.new_cache(keep[0].size(1), length)
        self.cache.k[..., :keep[0].size(3), :] = keep[0].to(self.device)
        self.cache.v[..., :keep[1].size(3), :] = keep[1].to(self.device)
        self.cache.lengths.copy_(keep[2])
        self.cache.previous.copy_(keep[3])

    def decode_step(self):
        """One token for every slot, all on the device: the forward at each row's position, the choice, the record.
        Every row attends over the whole preallocated length under its mask (a split-KV decode would read only each
        row's own keys: the later fix when long pages make the cache long)."""
        s = self.slots
        with self.autocast, self.kernels():
            logits = self.model.gpt.logits(self.model.gpt.hidden(s.tokens, kv_cache=self.cache)[:, -1])
        token = self.choose(logits, s.n_out, s.recent)
        self.cache.advance(self.record(s.rows, token))  # a finished row takes nothing
        s.tokens[:, 0] = token

    def step(self):
        """decode_step, as one CUDA graph replay on a GPU: captured once per setup, the sampling generator registered
        (a torch that cannot register one samples eagerly)."""
        sampling = self.settings["temperature"] > 0
        if not self.cuda_graph or sampling and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            return self.decode_step()
        if self.graph is None:
            changing = (*self.slots.tensors(), self.cache.lengths, self.cache.previous)
            state = [t.clone() for t in changing]
            rng_state = self.rng.get_state()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm up outside the graph, then undo what the warm-up step did
                self.decode_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            for t, saved in zip(changing, state):
                t.copy_(saved)
            self.rng.set_state(rng_state)
            self.graph = torch.cuda.CUDAGraph()
            if sampling:  # the draws inside the graph come from this generator
                self.graph.register_generator_state(self.rng)
            with torch.cuda.graph(self.graph):
                self.decode_step()
        self.graph.replay()


def ngram_bans(recent, n_generated, n, whitelist, always_banned):
    """
    (rows, k) token ids to ban per row: DeepSeek-OCR's no-repeat n-gram rule over `recent`, each row's last W
    generated tokens (right-aligned, n_generated of them real): a token that would complete an n-gram seen in the
    window is banned unless whitelisted. Non-bans are filled with `always_banned` (the <image> token), so one
    scatter applies both rules at a fixed shape.
    """
    rows, W = recent.shape
    if n <= 0:
        return torch.full((rows, 1), always_banned, dtype=torch.long, device=recent.device)
    windows = recent.unfold(1, n, 1)  # (rows, W - n + 1, n)
    match = (windows[..., :n - 1] == recent[:, W - n + 1:].unsqueeze(1)).all(-1)
    start = torch.arange(W - n + 1, device=recent.device)
    match &= start >= (W - n_generated).clamp(min=0)[:, None]  # windows wholly inside the generated tokens
    match &= ~torch.isin(windows[..., -1], whitelist)
    return torch.where(match, windows[..., -1], always_banned)


def sample(logits, temperature, top_k, rng):
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng)[:, 0]


def document_ngram_rule(tokenizer):
    """DeepSeek-OCR's no-repeat rule for reading documents, as generate_iter takes it: no 20-gram twice within 90
    tokens, table tags exempt."""
    return dict(no_repeat_ngram_size=20, ngram_window=90, ngram_whitelist=table_whitelist(tokenizer))


def table_whitelist(tokenizer):
    """DeepSeek-OCR exempts <td> and </td> from the n-gram rule (table cells repeat). Our split pattern cuts them into
    pieces whose merges depend on the neighbours ('<', 'td', '></', ...): the exempt tokens are 'td' and every token
    made only of '<', '/' and '>'."""
    return [i for i in range(tokenizer.get_vocab_size()) if re.fullmatch(r"td|[</>]+", tokenizer.decode([i]))]
