"""
The nanochat GPT (Oct 2025 architecture, the one of the published d20/d32 checkpoints):
- rotary embeddings (base 10000), no learned positions
- QK norm, parameter-free RMSNorm, norm right after the token embedding
- ReLU^2 MLP, untied wte / lm_head, no biases, logit softcap 15
- grouped-query attention (n_kv_head), SDPA
Added for vision: forward(inputs_embeds=...) in place of wte(idx), vocab growth that keeps old logits, and a
static KV cache with per-row positions for the engine.
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


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)


def gpt_config_for_depth(depth, vocab_size, sequence_len):
    """nanochat's sizing rule: width 64 per layer, 128-wide heads (d20 -> 1280 wide, 10 heads)."""
    n_embd = depth * 64
    n_head = max(1, (n_embd + 127) // 128)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                     n_embd=n_embd)


class KVCache:
    """
    Keys and values for generation, preallocated: `rows` sequences of up to `length` positions in every layer, and
    each row's fill level. Shapes never change, so a decode step can be captured in a CUDA graph. Inside
    prefilling(rows), a forward writes new sequences (right-padded, from position 0) into those rows; otherwise a
    forward decodes one token per row, at that row's own position.
    """
    def __init__(self, n_layer, rows, n_kv_head, length, head_dim, device, dtype):
        self.k = torch.zeros(n_layer, rows, n_kv_head, length, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.rows = torch.arange(rows, device=device)
        self.key_positions = torch.arange(length, device=device)
        self.filling = None  # rows being prefilled

    @contextmanager
    def prefilling(self, rows):
        self.filling = rows
        try:
            yield
        finally:
            self.filling = None

    def positions(self):
        """Rotary positions of the incoming tokens: None (0, 1, ...) in a prefill, each row's length in a decode."""
        return None if self.filling is not None else self.lengths[:, None]

    def attention_mask(self):
        """None in a prefill (causal within the new tokens); in a decode, every row's keys up to its new token."""
        return None if self.filling is not None else (self.key_positions <= self.lengths[:, None])[:, None, None, :]

    def insert(self, layer, k, v):
        """Store this layer's new keys/values; returns the keys/values to attend to."""
        if self.filling is not None:
            self.k[layer, self.filling, :, :k.size(2)] = k
            self.v[layer, self.filling, :, :v.size(2)] = v
            return k, v
        self.k[layer, self.rows, :, self.lengths] = k[:, :, 0]
        self.v[layer, self.rows, :, self.lengths] = v[:, :, 0]
        return self.k[layer], self.v[layer]


def document_mask(doc_ids):
    """
    Causal attention within each packed sample only (doc_ids (B, T), -1 on padding): a BlockMask for FlexAttention
    on CUDA, which skips the blocks between samples altogether; a boolean (B, 1, T, T) mask for SDPA elsewhere.
    """
    if doc_ids.is_cuda:
        def same_sample(b, h, q, k):
            return (doc_ids[b, q] == doc_ids[b, k]) & (q >= k)
        B, T = doc_ids.shape
        return create_block_mask(same_sample, B, None, T, T, device=doc_ids.device)
    causal = torch.ones(doc_ids.size(1), doc_ids.size(1), dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def attention(q, k, v, mask, enable_gqa):
    """Causal attention when mask is None, SDPA where a boolean mask allows, FlexAttention with a BlockMask."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if isinstance(mask, BlockMask):
        return compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache, attn_mask):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
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

    def forward(self, x, cos_sin, kv_cache, attn_mask):
        x = x + self.attn(norm(x), cos_sin, kv_cache, attn_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables are cheap: over-compute 10x the training length so generation never runs out
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def init_weights(self):
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
        self.cos, self.sin = self._precompute_rotary_embeddings(self.rotary_seq_len)

    def _precompute_rotary_embeddings(self, seq_len, base=10000):
        head_dim = self.config.n_embd // self.config.n_head
        device = self.transformer.wte.weight.device
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        # bf16 on every device, as nanochat keeps them: its checkpoints then give its logits here too
        return freqs.cos().bfloat16()[None, :, None, :], freqs.sin().bfloat16()[None, :, None, :]

    def get_device(self):
        return self.transformer.wte.weight.device

    @torch.no_grad()
    def resize_vocab(self, new_vocab_size):
        """Append rows for new tokens: wte rows drawn like the init, lm_head rows zero (old-token logits stay)."""
        old = self.config.vocab_size
        assert new_vocab_size >= old, "resize_vocab only grows the vocabulary"
        if new_vocab_size == old:
            return
        wte, head = self.transformer.wte.weight, self.lm_head.weight
        new_wte = torch.empty(new_vocab_size - old, wte.size(1), device=wte.device, dtype=wte.dtype).normal_(0.0, 1.0)
        new_head = torch.zeros(new_vocab_size - old, head.size(1), device=head.device, dtype=head.dtype)
        self.transformer.wte.weight = nn.Parameter(torch.cat([wte, new_wte]))
        self.lm_head.weight = nn.Parameter(torch.cat([head, new_head]))
        self.transformer.wte.num_embeddings = self.lm_head.out_features = new_vocab_size
        self.config.vocab_size = new_vocab_size

    def flops(self, doc_lengths):
        """Training FLOPs (forward + backward) of packed samples of these lengths: each token attends its own sample."""
        return sum(n * self.estimate_flops(n) for n in doc_lengths)

    def estimate_flops(self, seq_len=None):
        """Training FLOPs per token (forward + backward), as nanochat counts them (https://arxiv.org/abs/2204.02311)."""
        nparams = sum(p.numel() for p in self.parameters())
        nparams_embedding = self.transformer.wte.weight.numel()
        l, h, q = self.config.n_layer, self.config.n_head, self.config.n_embd // self.config.n_head
        t = seq_len or self.config.sequence_len
        return 6 * (nparams - nparams_embedding) + 12 * l * h * q * t

    def optimizer_groups(self):
        """Muon takes the 2-D matrices of the blocks; AdamW the embedding and the unembedding."""
        return dict(matrix=list(self.transformer.h.parameters()),
                    embedding=list(self.transformer.wte.parameters()),
                    lm_head=list(self.lm_head.parameters()))

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         extra_adamw_groups=(), adamw_lr=None):
        """
        nanochat's split: AdamW for wte/lm_head (lr scaled by 1/sqrt(d_model/768)), Muon for the block matrices.
        extra_adamw_groups brings in other parameters (the vision tower). adamw_lr puts everything on AdamW at that
        lr instead (the plain option). Frozen parameters are dropped here, so no optimizer ever holds them.
        """
        ddp = get_dist_info()[0]
        groups = self.optimizer_groups()
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        print0(f"Scaling the LR for the AdamW parameters by 1/sqrt({self.config.n_embd}/768) = {dmodel_lr_scale:.6f}")
        adam_groups = [
            dict(params=groups["lm_head"], lr=unembedding_lr * dmodel_lr_scale),
            dict(params=groups["embedding"], lr=embedding_lr * dmodel_lr_scale),
            *[dict(g) for g in extra_adamw_groups],
        ]
        if adamw_lr is not None:
            adam_groups.append(dict(params=groups["matrix"]))
            for g in adam_groups:
                g["lr"] = adamw_lr
        for g in adam_groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
        adam_groups = [g for g in adam_groups if g["params"]]
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

    def rotary(self, T, positions=None):
        """cos/sin for T tokens at positions 0..T-1, or at `positions` (B, T): per-row positions in a decode step."""
        if positions is None:
            assert T <= self.cos.size(1), f"sequence of {T} exceeds the rotary cache ({self.cos.size(1)})"
            return self.cos[:, :T], self.sin[:, :T]
        return self.cos[0, positions], self.sin[0, positions]

    def hidden(self, idx=None, inputs_embeds=None, kv_cache=None, positions=None, attn_mask=None):
        """The final normed hidden states (B, T, n_embd). A KV cache sets the positions and the mask itself."""
        assert (idx is None) != (inputs_embeds is None), "pass exactly one of idx / inputs_embeds"
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds
        if kv_cache is not None:
            positions, attn_mask = kv_cache.positions(), kv_cache.attention_mask()
        cos_sin = self.rotary(x.size(1), positions)
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache, attn_mask)
        return norm(x)

    def logits(self, hidden):
        softcap = 15
        logits = self.lm_head(hidden)
        return softcap * torch.tanh(logits / softcap)

    def forward(self, idx=None, targets=None, kv_cache=None, loss_reduction="mean", inputs_embeds=None, positions=None,
                attn_mask=None):
        logits = self.logits(self.hidden(idx, inputs_embeds, kv_cache, positions, attn_mask))
        if targets is None:
            return logits
        logits = logits.float()
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction="sum" if loss_reduction == "mean" else loss_reduction)
        if loss_reduction == "mean":
            # a batch whose targets are all -1 gives 0, not 0/0
            loss = loss / (targets != -1).sum().clamp(min=1)
        return loss
