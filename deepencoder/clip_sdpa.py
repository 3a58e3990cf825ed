"""
CLIP-L/14 vision transformer, DeepSeek-OCR style: the compressed SAM grid replaces the patch embedding.
Pre-LN blocks with quick_gelu, fused qkv (rows q; k; v), no post-layernorm, no projection head.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CLIPConfig:
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        # kept only so CLIP checkpoints load; the SAM grid stands in for patches, so it never trains
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.patch_embedding.requires_grad_(False)
        self.num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size)

    def positions(self, num_patches):
        """Position embeddings for 1 + num_patches tokens: CLS kept, the grid resized bicubically (in fp32)."""
        pos = self.position_embedding.weight
        if num_patches + 1 == self.num_positions:
            return pos
        src, tgt = int(math.sqrt(self.num_positions - 1)), int(math.sqrt(num_patches))
        assert tgt * tgt == num_patches, "the SAM grid must be square"
        grid = pos[1:].reshape(1, src, src, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", antialias=True, align_corners=False)
        grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(tgt * tgt, -1)
        return torch.cat([pos[:1], grid])

    def forward(self, patch_embeds):
        B, C, h, w = patch_embeds.shape
        x = patch_embeds.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(B, 1, C), x], dim=1)
        return x + self.positions(h * w).to(x.dtype)


class CLIPAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid_(1.702 * x))  # quick_gelu; in place, one (tokens x 4096) temporary less


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class VitModel(nn.Module):
    """(B, hidden, h, w) SAM grid -> (B, 1 + h*w, hidden), CLS first."""
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.transformer = CLIPTransformer(config)

    def forward(self, sam_grid):
        return self.transformer(self.pre_layrnorm(self.embeddings(sam_grid)))


def build_clip_l():
    return VitModel(CLIPConfig())
