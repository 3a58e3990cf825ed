"""
The nanochat GPT (Oct 2025 architecture, the one of the published d20/d32 checkpoints):
- rotary embeddings (base 10000), no learned positions
- QK norm, parameter-free RMSNorm, norm right after the token embedding
- ReLU^2 MLP, untied wte / lm_head, no biases, logit softcap 15
- grouped-query attention (n_kv_head), SDPA
Added for vision: forward(inputs_embeds=...) in place of wte(idx), vocab growth that keeps old logits,
and a KV cache that also takes left-padded batches.
"""
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import get_dist_info, print0
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


class KVCache:
    """
    Keys/values of every layer for generation. `valid` (B, T) marks real (not left-pad) positions,
    so prompts of different lengths share one batch; rotary is relative, so left padding costs nothing else.
    """
    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype, valid=None):
        self.k = torch.zeros(num_layers, batch_size, num_heads, seq_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        if valid is not None:
            self.valid[:, :valid.size(1)] = valid
        self.pos = 0

    def attention_mask(self, T):
        """(B, 1, T, pos+T) boolean mask: causal, skipping pad keys (a pad query still sees itself, so no row is empty)."""
        q_pos = torch.arange(self.pos, self.pos + T, device=self.k.device)[:, None]
        k_pos = torch.arange(self.pos + T, device=self.k.device)[None, :]
        keep = (k_pos <= q_pos)[None] & (self.valid[:, None, :self.pos + T] | (k_pos == q_pos)[None])
        return keep[:, None]

    def insert_kv(self, layer_idx, k, v):
        t0, t1 = self.pos, self.pos + k.size(2)
        assert t1 <= self.k.size(3), "KV cache is full"
        self.k[layer_idx, :, :, t0:t1] = k
        self.v[layer_idx, :, :, t0:t1] = v
        if layer_idx == self.k.size(0) - 1:
            self.pos = t1
        return self.k[layer_idx, :, :, :t1], self.v[layer_idx, :, :, :t1]


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
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        gqa = self.n_kv_head != self.n_head
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
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
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return freqs.cos().to(dtype)[None, :, None, :], freqs.sin().to(dtype)[None, :, None, :]

    def get_device(self):
        return self.transformer.wte.weight.device

    @torch.no_grad()
    def resize_vocab(self, new_vocab_size):
        """Append rows for new tokens: wte rows drawn like the init, lm_head rows zero, so old-token logits don't move."""
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
                         extra_adamw_groups=(), adamw_only=False):
        """
        nanochat's split: AdamW for wte/lm_head (lr scaled by 1/sqrt(d_model/768)), Muon for the block matrices.
        extra_adamw_groups brings in other parameters (the vision tower); adamw_only puts everything on AdamW.
        Frozen parameters are dropped here, so no optimizer ever holds them.
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
        if adamw_only:
            adam_groups.append(dict(params=groups["matrix"], lr=matrix_lr))
        for g in adam_groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
        adam_groups = [g for g in adam_groups if g["params"]]
        adamw_kwargs = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        fused = self.get_device().type == "cuda"
        AdamWFactory = DistAdamW if ddp else partial(torch.optim.AdamW, fused=fused)
        optimizers = [AdamWFactory(adam_groups, **adamw_kwargs)]
        matrix_params = [p for p in groups["matrix"] if p.requires_grad]
        if not adamw_only and matrix_params:
            MuonFactory = DistMuon if ddp else Muon
            optimizers.append(MuonFactory(matrix_params, lr=matrix_lr, momentum=0.95))
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx=None, targets=None, kv_cache=None, loss_reduction="mean", inputs_embeds=None):
        assert (idx is None) != (inputs_embeds is None), "pass exactly one of idx / inputs_embeds"
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        T0 = 0 if kv_cache is None else kv_cache.pos
        assert T0 + T <= self.cos.size(1), f"sequence of {T0 + T} exceeds the rotary cache ({self.cos.size(1)})"
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        attn_mask = None if kv_cache is None else kv_cache.attention_mask(T)
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache, attn_mask)
        x = norm(x)
        softcap = 15
        logits = self.lm_head(x)
        logits = softcap * torch.tanh(logits / softcap)
        if targets is None:
            return logits
        logits = logits.float()
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="sum"
                               if loss_reduction == "mean" else loss_reduction)
        if loss_reduction == "mean":
            # a batch whose targets are all -1 gives 0, not 0/0
            loss = loss / (targets != -1).sum().clamp(min=1)
        return loss


# -----------------------------------------------------------------------------
# nanochat checkpoints: model_XXXXXX.pt + meta_XXXXXX.json (+ tokenizer.pkl), in a directory or an HF repo

def pick_nanochat_files(paths, step=None):
    """From a checkpoint tree's file list: (model .pt, meta .json, tokenizer.pkl), preferring base_checkpoints/,
    the last step unless `step` is given, and the tokenizer nearest the model."""
    models = {}
    for p in paths:
        m = re.search(r"model_(\d+)\.pt$", p)
        if m:
            models.setdefault(int(m.group(1)), []).append(p)
    if step is not None:
        models = {s: ps for s, ps in models.items() if s == step}
    if not models:
        raise FileNotFoundError("no nanochat checkpoint (model_XXXXXX.pt)" + (f" for step {step}" if step is not None else ""))
    candidates = [p for ps in models.values() for p in ps]
    base = [p for p in candidates if "base_checkpoints" in p] or candidates
    model = max(base, key=lambda p: int(re.search(r"model_(\d+)\.pt$", p).group(1)))
    meta = re.sub(r"model_(\d+)\.pt$", r"meta_\1.json", model)
    tokenizers = sorted((p for p in paths if p.endswith("tokenizer.pkl")),
                        key=lambda p: (os.path.dirname(p) != os.path.dirname(model), len(p)))
    if not tokenizers:
        raise FileNotFoundError("no tokenizer.pkl next to the nanochat checkpoint")
    return model, meta, tokenizers[0]


def load_nanochat(source, step=None, device="cpu"):
    """
    Build a GPT from a nanochat base checkpoint: a local directory or an HF repo holding model_XXXXXX.pt,
    meta_XXXXXX.json and tokenizer.pkl (flat, or nanochat's base_checkpoints/dNN + tokenizer/ layout).
    Only the chosen files are downloaded. Returns (model, meta dict, directory of tokenizer.pkl).
    """
    if os.path.isdir(source):
        model_path, meta_path, tok_path = pick_nanochat_files(glob.glob(os.path.join(source, "**", "*"), recursive=True), step)
    else:
        from dataset import hub_list_files, hub_file
        files = pick_nanochat_files(hub_list_files(source, repo_type="model"), step)
        model_path, meta_path, tok_path = (hub_file(source, f, repo_type="model") for f in files)
    with open(meta_path) as f:
        meta = json.load(f)
    config = GPTConfig(**{k: v for k, v in meta["model_config"].items() if k in GPTConfig.__dataclass_fields__})
    state = torch.load(model_path, map_location=device, weights_only=True)
    state = {k.removeprefix("_orig_mod."): v.float() for k, v in state.items()}  # torch.compile prefix, bf16 -> fp32
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # rotary tables
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"nanochat checkpoint {model_path} does not match this GPT (newer nanochat adds value embeddings "
                           f"and smearing, which are not supported): missing {missing}, unexpected {unexpected}")
    return model, meta, os.path.dirname(tok_path)
