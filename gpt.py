"""
The nanochat GPT, both generations of it, in one class (each part of the newer one a GPTConfig field):
- 2025 (the published d20/d32 checkpoints, nanochat up to 2c4473d): rotary (base 10000), QK norm, parameter-free
  RMSNorm after the token embedding, ReLU^2 MLP, untied wte / lm_head, no biases, logit softcap 15, GQA.
- 2026 (nanochat from a825e63, 2026-03-14, what its speedrun trains today): the above plus per-layer resid / x0
  lambdas, sliding-window attention, value embeddings, smear, backout, RoPE base 100000, q/k x 1.2, wte / lm_head
  padded to a multiple of 64.
Added for vision: forward(inputs_embeds=...) beside the token ids, packed rows kept apart (attention, windows and
smear stay inside a sample), vocab growth that keeps old logits, and a static KV cache with per-row positions.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from common import compiled_flex_attention, get_dist_info, print0
from muon import Muon, DistMuon
from adamw import DistAdamW


# ---- the config: nanochat's GPT in either generation --------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = ""        # nanochat's, tiled over the layers: L sequence_len, S a quarter of it; "" none
    generation: str = "2025"        # which of nanochat's GPTs: its init and optimizer settings follow the name
    # what nanochat's GPT gained in 2026; the defaults are the 2025 generation
    lambdas: bool = False           # per-layer resid_lambdas and x0_lambdas (x0: the normed embedding)
    value_embeds: bool = False      # ResFormer value embeddings on alternating layers, gated per head (ve_gate)
    smear: bool = False             # the previous token's normed embedding mixed in (smear_gate, smear_lambda)
    backout: bool = False           # backout_lambda x the residual after layer n_layer // 2, taken out at the end
    rope_base: float = 10000.0
    qk_scale: float = 1.0           # q and k scaled after QK norm
    softcap: float = 15.0
    pad_vocab_size_to: int = 1      # wte / lm_head rows rounded up to a multiple (logits sliced back to vocab_size)
    rotary_in_compute_dtype: bool = False  # rotary tables fp32 on the CPU, bf16 on CUDA; else bf16 everywhere


# nanochat's two generations, as GPTConfig fields (nano_deepseek_ocr.read_nanochat recognises them)
GENERATIONS = {
    "2025": dict(),
    "2026": dict(generation="2026", window_pattern="SSSL", lambdas=True, value_embeds=True, smear=True, backout=True,
                 rope_base=100000.0, qk_scale=1.2, pad_vocab_size_to=64, rotary_in_compute_dtype=True),
}
VE_GATE_CHANNELS, SMEAR_CHANNELS = 12, 24  # the input channels nanochat's gates read


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # no learned scale: nanochat's RMSNorm is parameter-free


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2  # halves rotated against each other (nanochat's sign: HF's rotate_half turns the other way)
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)


def has_ve(layer, n_layer):
    """nanochat's value-embedding layers: every other one, the last always among them."""
    return layer % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Each layer's left window (keys i - w .. i), as nanochat computes it: L = sequence_len, S = a quarter of it
    rounded up to a multiple of 128 (FA3's tile); the last layer is always L. None (unlimited) without a pattern:
    the 2025 generation attends to everything, however long the sequence."""
    pattern = config.window_pattern.upper()
    if not pattern:
        return [None] * config.n_layer
    assert set(pattern) <= {"S", "L"}, f"window_pattern takes S and L only, got {config.window_pattern!r}"
    long = config.sequence_len
    short = -(-long // 4 // 128) * 128
    sizes = [short if pattern[i % len(pattern)] == "S" else long for i in range(config.n_layer)]
    return sizes[:-1] + [long]


def binds(window, T):
    """Whether a left window of this size limits attention among T tokens."""
    return window is not None and window + 1 < T


def gpt_config_for_depth(depth, vocab_size, sequence_len, generation="2025"):
    """nanochat's sizing rule: width 64 per layer, 128-wide heads (d20 -> 1280 wide, 10 heads)."""
    n_embd = depth * 64
    n_head = max(1, (n_embd + 127) // 128)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                     n_embd=n_embd, **GENERATIONS[generation])


# ---- the KV cache of generation ------------------------------------------------------------------------------------

class KVCache:
    """
    Keys and values for generation, preallocated: `rows` sequences of up to `length` positions in every layer, each
    row's fill level, and each row's last normed embedding (smear). Shapes never change, so a decode step can be
    captured in a CUDA graph. Inside prefilling(rows, lengths), a forward writes new sequences (right-padded, from
    position 0, `lengths` long) into those rows; otherwise a forward decodes one token per row, at its own position,
    and advance() moves the rows on by what they took.
    """
    def __init__(self, n_layer, rows, n_kv_head, length, head_dim, device, dtype, n_embd):
        self.k = torch.zeros(n_layer, rows, n_kv_head, length, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.previous = torch.zeros(rows, 1, n_embd, device=device, dtype=dtype)  # smear's previous token
        self.rows = torch.arange(rows, device=device)
        self.key_positions = torch.arange(length, device=device)
        self.filling = self.filling_lengths = None  # rows being prefilled, and their prompts' lengths

    @contextmanager
    def prefilling(self, rows, lengths):
        """A forward inside writes new sequences into `rows`; once it has gone through, they hold `lengths` keys."""
        self.filling, self.filling_lengths = rows, lengths
        try:
            yield
        finally:
            self.filling = self.filling_lengths = None
        self.lengths[rows] = lengths  # not reached when the forward failed: the rows keep what they held

    def advance(self, taken):
        """After a decode step: each row moves on by `taken` (1, or a per-row 0/1 tensor: a finished row stays)."""
        self.lengths += taken

    def positions(self):
        """Rotary positions of the incoming tokens: None (0, 1, ...) in a prefill, each row's length in a decode."""
        return None if self.filling is not None else self.lengths[:, None]

    def attention_mask(self, window, T):
        """A prefill is causal within the new tokens (None, or a banded mask under a window shorter than them); a
        decode attends each row's keys up to its new token (and no further back than its window)."""
        if self.filling is not None:
            return band(T, window, self.k.device)[None, None] if binds(window, T) else None
        mask = self.key_positions <= self.lengths[:, None]
        if binds(window, self.key_positions.numel()):
            mask &= self.key_positions >= self.lengths[:, None] - window
        return mask[:, None, None, :]

    def insert(self, layer, k, v):
        """Store this layer's new keys/values; returns the keys/values to attend to."""
        if self.filling is not None:
            self.k[layer, self.filling, :, :k.size(2)] = k
            self.v[layer, self.filling, :, :v.size(2)] = v
            return k, v
        self.k[layer, self.rows, :, self.lengths] = k[:, :, 0]
        self.v[layer, self.rows, :, self.lengths] = v[:, :, 0]
        return self.k[layer], self.v[layer]

    def swap_previous(self, x):
        """Smear in a cache: store each row's last normed embedding, hand back the one stored before (a decode's
        previous token; in a prefill the earlier tokens are in x itself)."""
        if self.filling is not None:
            self.previous[self.filling] = x[torch.arange(x.size(0), device=x.device), self.filling_lengths - 1][:, None]
            return None
        previous = self.previous.clone()
        self.previous.copy_(x)
        return previous


# ---- attention masks: causal, windowed, packed samples ---------------------------------------------------------------

def band(T, window, device):
    """(T, T) causal mask whose queries see at most `window` keys back."""
    i = torch.arange(T, device=device)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window)


def document_mask(doc_ids, window=None):
    """
    Causal attention within each packed sample only (doc_ids (B, T), -1 on padding), and no more than `window` keys
    back when one is given: a BlockMask for FlexAttention on CUDA, which skips the blocks between samples altogether;
    a boolean (B, 1, T, T) mask for SDPA elsewhere.
    """
    if doc_ids.is_cuda:
        return document_block_mask(doc_ids, window)
    allowed = band(doc_ids.size(1), doc_ids.size(1) if window is None else window, doc_ids.device)
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & allowed)[:, None]


def document_block_mask(doc_ids, window=None, block=128):
    """
    The document mask as a FlexAttention BlockMask, built from the samples' extents block by block rather than by
    evaluating every (query, key) pair (create_block_mask uncompiled materialises all T x T of them). Samples are
    contiguous runs of a row, so with padding counted last a block's samples are a range of ids: a (query block, key
    block) pair is skipped when their ranges do not meet or the window cannot reach, taken whole when both hold the
    same single sample and every pair is causal and in the window, and masked element-wise otherwise.
    """
    B, T = doc_ids.shape

    def same_sample(b, h, q, k):
        keep = (doc_ids[b, q] == doc_ids[b, k]) & (q >= k)
        return keep if window is None else keep & (q - k <= window)
    if T % block:
        return create_block_mask(same_sample, B, None, T, T, device=doc_ids.device)
    docs = torch.where(doc_ids < 0, T, doc_ids).view(B, T // block, block)  # padding last: ids never decrease
    lo, hi = docs.min(-1).values, docs.max(-1).values
    q_blk = torch.arange(T // block, device=doc_ids.device)[:, None]
    k_blk = q_blk.T
    meet = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None]) & (k_blk <= q_blk)
    whole = (lo == hi)[:, :, None] & (lo == hi)[:, None, :] & (lo[:, :, None] == lo[:, None, :]) & (k_blk < q_blk)
    if window is not None:
        meet &= (q_blk - k_blk - 1) * block + 1 <= window  # the nearest pair of the two blocks is in the window
        whole &= (q_blk - k_blk + 1) * block - 1 <= window  # the farthest pair too
    partial = meet & ~whole

    def listed(chosen):  # (B, 1, nq) counts and (B, 1, nq, nk) block indices, the chosen ones first
        order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)
        return chosen.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]
    return BlockMask.from_kv_blocks(*listed(partial), *listed(whole), BLOCK_SIZE=block, mask_mod=same_sample)


def attention(q, k, v, mask, enable_gqa):
    """Causal attention when mask is None, SDPA where a boolean mask allows, FlexAttention with a BlockMask."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if isinstance(mask, BlockMask):
        return compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


# ---- the transformer ------------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.qk_scale = config.qk_scale
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        with_ve = config.value_embeds and has_ve(layer_idx, config.n_layer)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if with_ve else None

    def forward(self, x, ve, cos_sin, kv_cache, attn_mask):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: the token's value embedding, gated per head by the input (0 to 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q) * self.qk_scale, norm(k) * self.qk_scale  # QK norm after rotary, as nanochat
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        y = attention(q, k, v, attn_mask, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, kv_cache, attn_mask):
        x = x + self.attn(norm(x), ve, cos_sin, kv_cache, attn_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = window_sizes(config)
        rows = self.padded_vocab_size(config.vocab_size)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(rows, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, rows, bias=False)
        n, kv_dim = config.n_layer, config.n_kv_head * (config.n_embd // config.n_head)
        self.resid_lambdas = nn.Parameter(torch.ones(n)) if config.lambdas else None
        self.x0_lambdas = nn.Parameter(torch.zeros(n)) if config.lambdas else None
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(rows, kv_dim) for i in range(n)
                                           if config.value_embeds and has_ve(i, n)})
        # rotary tables are cheap: over-compute 10x the training length so generation never runs out; not in the
        # state dict, so every built model computes them (build_rotary)
        self.rotary_seq_len = config.sequence_len * 10
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self.build_rotary()

    # ---- init and vocabulary ----

    def padded_vocab_size(self, vocab_size):
        pad = self.config.pad_vocab_size_to
        return -(-vocab_size // pad) * pad

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init for the generation: the 2025 one (fan-in normal), or the 2026 one (uniform, small c_fc,
        lm_head at 1e-3, decaying lambdas, small positive gates)."""
        if self.config.generation == "2026":
            self._init_2026()
        else:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    fan_out, fan_in = module.weight.shape  # https://arxiv.org/pdf/2310.17813
                    std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                    torch.nn.init.normal_(module.weight, mean=0.0, std=std)
                elif isinstance(module, nn.Embedding):
                    torch.nn.init.normal_(module.weight, mean=0.0, std=1.0)
            torch.nn.init.zeros_(self.lm_head.weight)
            for block in self.transformer.h:
                torch.nn.init.zeros_(block.mlp.c_proj.weight)
                torch.nn.init.zeros_(block.attn.c_proj.weight)
        self.build_rotary()

    def _init_2026(self):
        n_layer, s = self.config.n_layer, 3 ** 0.5 * self.config.n_embd ** -0.5  # uniform with std 1/sqrt(n_embd)
        nn.init.normal_(self.transformer.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -s, s)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        depth = torch.arange(n_layer, dtype=torch.float32) / max(n_layer - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth)  # stronger residual early, weaker deep
        self.x0_lambdas.copy_(0.20 - 0.15 * depth)     # more of the embedding mixed in early
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        if self.smear_gate is not None:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            nn.init.zeros_(self.smear_lambda)
        if self.backout_lambda is not None:
            nn.init.constant_(self.backout_lambda, 0.2)

    def build_rotary(self):
        """The rotary tables (cos, sin) for rotary_seq_len positions, on the weights' device."""
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        device = self.transformer.wte.weight.device
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (cfg.rope_base ** (channel / head_dim))
        freqs = torch.outer(torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device), inv_freq)
        # as nanochat keeps them, so its checkpoints give its logits: bf16 (2025), or the compute dtype (2026)
        dtype = torch.float32 if cfg.rotary_in_compute_dtype and device.type != "cuda" else torch.bfloat16
        self.cos, self.sin = freqs.cos().to(dtype)[None, :, None, :], freqs.sin().to(dtype)[None, :, None, :]

    def get_device(self):
        return self.transformer.wte.weight.device

    @torch.no_grad()
    def resize_vocab(self, new_vocab_size):
        """Rows for new tokens: wte (and value-embedding) rows drawn like the init, lm_head rows zero, so old-token
        logits stay; the padding to pad_vocab_size_to is kept."""
        old = self.config.vocab_size
        assert new_vocab_size >= old, "resize_vocab only grows the vocabulary"
        if new_vocab_size == old:
            return
        rows, s = self.padded_vocab_size(new_vocab_size), 3 ** 0.5 * self.config.n_embd ** -0.5

        def grown(weight, draw):
            new = weight.new_zeros(rows, weight.size(1))
            new[:old] = weight[:old]
            draw(new[old:new_vocab_size])
            return nn.Parameter(new)
        wte_std = 0.8 if self.config.generation == "2026" else 1.0
        self.transformer.wte.weight = grown(self.transformer.wte.weight, lambda w: w.normal_(0.0, wte_std))
        self.lm_head.weight = grown(self.lm_head.weight, lambda w: w.zero_())
        for ve in self.value_embeds.values():
            ve.weight = grown(ve.weight, lambda w: w.uniform_(-s, s))
            ve.num_embeddings = rows
        self.transformer.wte.num_embeddings = self.lm_head.out_features = rows
        self.config.vocab_size = new_vocab_size

    # ---- FLOPs and optimizers ----

    def flops(self, doc_lengths):
        """Training FLOPs (forward + backward) of packed samples of these lengths: each token attends its own sample."""
        return sum(n * self.estimate_flops(n) for n in doc_lengths)

    def estimate_flops(self, seq_len=None):
        """Training FLOPs per token (forward + backward), as nanochat counts them (https://arxiv.org/abs/2204.02311):
        6 per matmul weight (embeddings are lookups, lambdas scalars), and attention over min(window, seq_len)."""
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        h, q = self.config.n_head, self.config.n_embd // self.config.n_head
        t = seq_len or self.config.sequence_len
        return 6 * matmul + sum(12 * h * q * (t if w is None else min(w, t)) for w in self.window_sizes)

    def optimizer_groups(self):
        """Muon takes the 2-D matrices of the blocks; AdamW the rest: embedding, unembedding, and the 2026 parts (value
        embeddings, the two kinds of layer lambdas, smear and backout), empty in the 2025 generation."""
        present = lambda *params: [p for p in params if p is not None]
        return dict(matrix=list(self.transformer.h.parameters()), embedding=list(self.transformer.wte.parameters()),
                    lm_head=list(self.lm_head.parameters()), value_embeds=list(self.value_embeds.parameters()),
                    resid=present(self.resid_lambdas), x0=present(self.x0_lambdas),
                    smear=present(self.smear_gate and self.smear_gate.weight, self.smear_lambda, self.backout_lambda))

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         extra_adamw_groups=(), adamw_lr=None):
        """
        nanochat's split: AdamW for wte/lm_head (lr scaled by 1/sqrt(d_model/768)), Muon for the block matrices; the
        2026 parts with nanochat's own settings. extra_adamw_groups brings in other parameters (the vision tower).
        adamw_lr puts everything on AdamW at that lr instead (the plain option). Frozen parameters are dropped here,
        so no optimizer ever holds them.
        """
        ddp = get_dist_info()[0]
        groups = self.optimizer_groups()
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        print0(f"Scaling the LR for the AdamW parameters by 1/sqrt({self.config.n_embd}/768) = {dmodel_lr_scale:.6f}")
        tuned = self.config.generation == "2026"  # nanochat's betas and weight decays for that generation
        adam_groups = [
            dict(params=groups["lm_head"], lr=unembedding_lr * dmodel_lr_scale,
                 **(dict(betas=(0.8, 0.96), weight_decay=0.01) if tuned else {})),
            dict(params=groups["embedding"], lr=embedding_lr * dmodel_lr_scale,
                 **(dict(betas=(0.8, 0.995), weight_decay=0.001) if tuned else {})),
            dict(params=groups["value_embeds"], lr=embedding_lr * dmodel_lr_scale * 0.5, betas=(0.8, 0.995),
                 weight_decay=0.01),
            dict(params=groups["resid"], lr=0.005, weight_decay=0.05),
            dict(params=groups["x0"], lr=0.5, betas=(0.96, 0.95)),
            dict(params=groups["smear"], lr=0.2),
        ] + [dict(g) for g in extra_adamw_groups]
        if adamw_lr is not None:
            adam_groups.append(dict(params=groups["matrix"]))
            for g in adam_groups:
                g["lr"] = adamw_lr
        for g in adam_groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
        adam_groups = [g for g in adam_groups if g["params"]]  # frozen parts, and the 2026 parts of a 2025 GPT
        adamw_kwargs = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        fused = self.get_device().type == "cuda"
        AdamWFactory = DistAdamW if ddp else partial(torch.optim.AdamW, fused=fused)
        optimizers = [AdamWFactory(adam_groups, **adamw_kwargs)]
        matrix_params = [p for p in groups["matrix"] if p.requires_grad]
        if adamw_lr is None and matrix_params:
            MuonFactory = DistMuon if ddp else Muon
            optimizers.append(MuonFactory(matrix_params, lr=matrix_lr, momentum=0.95))
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    # ---- forward ----

    def rotary(self, T, positions=None):
        """cos/sin for T tokens at positions 0..T-1, or at `positions` (B, T): per-row positions in a decode step."""
        if positions is None:
            assert T <= self.cos.size(1), f"sequence of {T} exceeds the rotary cache ({self.cos.size(1)})"
            return self.cos[:, :T], self.sin[:, :T]
        return self.cos[0, positions], self.sin[0, positions]

    def attention_masks(self, T, kv_cache, doc_ids):
        """The mask for each distinct window size: from the cache (prefill / decode), the packed samples' document
        mask, or None (plain causal) where a window does not bind."""
        windows = set(self.window_sizes)
        if kv_cache is not None:
            return {w: kv_cache.attention_mask(w, T) for w in windows}
        if doc_ids is not None:
            return {w: document_mask(doc_ids, w if binds(w, T) else None) for w in windows}
        return {w: band(T, w, self.get_device()) if binds(w, T) else None for w in windows}

    def smeared(self, x, kv_cache, doc_ids):
        """Smear: each token's normed embedding plus a gated share of the previous one's, never across a sample
        boundary of a packed row (a sample's first token gets none, as alone in a row)."""
        previous = kv_cache.swap_previous(x) if kv_cache is not None else None
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        if previous is not None:  # a decode step: the previous token lives in the cache
            return x + gate * previous
        if doc_ids is not None:
            gate = gate[:, 1:] * (doc_ids[:, 1:] == doc_ids[:, :-1]).unsqueeze(-1).to(x.dtype)
        else:
            gate = gate[:, 1:]
        return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)

    def hidden(self, idx, inputs_embeds=None, *, doc_ids=None, positions=None, kv_cache=None):
        """
        The final normed hidden states (B, T, n_embd). idx: the token ids (value embeddings are keyed by id: an <image>
        slot gets the <image> row, harmless, as nanochat would give any token its row); inputs_embeds: their
        embeddings when they are not wte(idx) (images scattered in). Packed rows pass doc_ids and positions; a KV cache
        sets the positions and masks itself.
        """
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds
        if kv_cache is not None:
            positions = kv_cache.positions()
        cos_sin = self.rotary(x.size(1), positions)
        masks = self.attention_masks(x.size(1), kv_cache, doc_ids)
        x = norm(x)
        if self.smear_gate is not None:
            x = self.smeared(x, kv_cache, doc_ids)
        x0, backout = x, None
        for i, block in enumerate(self.transformer.h):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, kv_cache, masks[self.window_sizes[i]])
            if i == self.config.n_layer // 2:
                backout = x
        if self.backout_lambda is not None:  # the mid-layer residual taken back out: fewer low-level features
            x = x - self.backout_lambda.to(x.dtype) * backout
        return norm(x)

    def logits(self, hidden):
        """Softcapped logits in fp32 (a bf16 tanh ties near-equal logits), the vocab padding sliced off."""
        logits = self.lm_head(hidden)[..., :self.config.vocab_size].float()
        return self.config.softcap * torch.tanh(logits / self.config.softcap)

    def forward(self, idx, targets=None, *, inputs_embeds=None, doc_ids=None, positions=None, kv_cache=None,
                loss_reduction="mean"):
        hidden = self.hidden(idx, inputs_embeds, doc_ids=doc_ids, positions=positions, kv_cache=kv_cache)
        if targets is None:
            return self.logits(hidden)
        hidden, targets = hidden.flatten(0, -2), targets.reshape(-1)
        if loss_reduction != "none" and not torch.compiler.is_compiling():
            # logits only where there is a target: image slots and prompts are most of a row (a compiled graph keeps
            # its static shapes instead)
            keep = targets != -1
            hidden, targets = hidden[keep], targets[keep]
        loss = F.cross_entropy(self.logits(hidden), targets, ignore_index=-1,
                               reduction="sum" if loss_reduction == "mean" else loss_reduction)
        if loss_reduction == "mean":
            # a batch whose targets are all -1 gives 0, not 0/0
            loss = loss / (targets != -1).sum().clamp(min=1)
        return loss
