"""
DeepSeek-OCR 2's language model as a vision encoder: Qwen2-0.5B's decoder layers (no embedding, no head) over the m
tokens of the compressed SAM grid (raster order) followed by m learned queries, under a mixed mask (the paper's Eq. 1):
the visual tokens see each other and no query; query i sees every visual token and queries 0..i. Only the queries'
outputs, after the final RMSNorm, go on. Module names follow HF's Qwen2, so Qwen/Qwen2-0.5B's layers load 1:1; rotary
is HF's rotate-half over positions 0..2m-1 (nanochat's GPT turns the other way).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import COMPRESSION, PATCH_SIZE


@dataclass
class Qwen2EncoderConfig:
    n_layer: int = 24
    hidden_size: int = 896
    num_heads: int = 14
    num_kv_heads: int = 2
    intermediate_size: int = 4864
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    query_sizes: tuple = (768, 1024)  # view sizes with a bank of (size / 64)^2 queries: query_768 (tiles), query_1024


class RMSNorm(nn.Module):
    """Qwen2's: computed in fp32, scaled by a learned weight."""
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def mixed_mask(m, device):
    """(2m, 2m) boolean mask, True where query row i may attend key column j: visual rows (i < m) every visual column;
    query rows every visual column and the queries up to their own."""
    i = torch.arange(2 * m, device=device)
    return (i[None, :] < m) | ((i[:, None] >= m) & (i[None, :] <= i[:, None]))


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.hidden_size // config.num_heads
        kv = config.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, kv)
        self.v_proj = nn.Linear(config.hidden_size, kv)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Encoder(nn.Module):
    """(B, hidden, q, q) compressed SAM grid -> (B, q*q, hidden): the outputs of the q*q queries of its view size."""
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        for size in config.query_sizes:  # query_768, query_1024: DeepSeek-OCR 2's names
            setattr(self, f"query_{size}", nn.Embedding((size // PATCH_SIZE // COMPRESSION) ** 2, config.hidden_size))

    def init_weights(self):
        """Qwen2's init (normal 0.02, zero biases, unit norms), the queries too (as transformers' port inits them:
        DeepSeek-OCR 2's nn.Embedding default, N(0, 1), drowns what the queries read, and every page's outputs start
        alike, 0.99999 similar against 0.996)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def queries(self, q):
        """The query bank of a q x q grid."""
        size = q * PATCH_SIZE * COMPRESSION
        if size not in self.config.query_sizes:
            raise ValueError(f"no query bank for {size}-px views: this encoder has {list(self.config.query_sizes)} "
                             "(DeepSeek-OCR 2's has 768 and 1024)")
        return getattr(self, f"query_{size}").weight

    def hidden(self, grid):
        """The final normed states of all 2m positions: the m visual tokens, then the m queries."""
        B, C, q, _ = grid.shape
        m = q * q
        x = torch.cat([grid.flatten(2).transpose(1, 2), self.queries(q).to(grid.dtype).expand(B, m, C)], dim=1)
        head_dim = C // self.config.num_heads
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, head_dim, 2, device=x.device).float() / head_dim)
        freqs = torch.arange(2 * m, device=x.device).float()[:, None] * inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)  # rotate-half's layout: each frequency twice
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = mixed_mask(m, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)

    def forward(self, grid):
        q = grid.size(-1)
        return self.hidden(grid)[:, q * q:]

    def flops(self, q):
        """Forward FLOPs over a q x q grid and its queries (2m positions, attention over all of them)."""
        c, T = self.config, 2 * q * q
        H, kv = c.hidden_size, c.num_kv_heads * c.hidden_size // c.num_heads
        return c.n_layer * (2 * T * (2 * H * H + 2 * H * kv + 3 * H * c.intermediate_size) + 4 * T * T * H)
