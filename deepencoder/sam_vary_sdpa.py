"""
SAM ViT-B image encoder (Kirillov et al. 2023) with DeepSeek-OCR's 16x conv compressor (net_2, net_3).
Window attention in most blocks, global attention in a few, decomposed relative positions folded into the query
and key so that plain fused SDPA computes them, on every device (the bias-as-mask path is the reference it is
tested against). Module names follow Meta's SAM so its weights (and DeepSeek-OCR's sam_model) load 1:1.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class SAMConfig:
    img_size: int = 1024          # the resolution pos_embed is stored at (64x64 grid)
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple = (2, 5, 8, 11)
    out_chans: int = 256          # neck
    net2_chans: int = 512
    net3_chans: int = 1024        # the channels CLIP receives


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor."""
    def __init__(self, num_channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def resize_pos_embed(pos_embed, size):
    """(1, H, W, C) absolute positions -> (1, size, size, C): bicubic with antialias, computed in fp32."""
    if pos_embed.size(1) == size:
        return pos_embed
    x = pos_embed.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.to(pos_embed.dtype).permute(0, 2, 3, 1)


def linear_resize_matrix(n_in, n_out, device):
    """(n_out, n_in) matrix doing F.interpolate(mode="linear", align_corners=False) along one axis."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32, device=device)  # fp32 indices, as PyTorch computes them
    src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, device=device)
    m[torch.arange(n_out), i0] += 1 - w1
    m[torch.arange(n_out), i1] += w1
    return m


def get_rel_pos(q_size, k_size, rel_pos):
    """
    Relative position embeddings for every (query, key) pair along one axis, linearly interpolated if the grid
    changed. Written as one matmul (one-hot selection, resize folded in) rather than indexing: the backward of
    PyTorch's CPU indexing and interpolation is not deterministic, and a resumed run must match exactly.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    select = F.one_hot(relative_coords.long(), max_rel_dist).float()  # (q, k, max_rel_dist)
    if rel_pos.shape[0] != max_rel_dist:
        select = select @ linear_resize_matrix(rel_pos.shape[0], max_rel_dist, rel_pos.device)
    return (select @ rel_pos.float()).to(rel_pos.dtype)


def relative_position_terms(q, rel_pos_h, rel_pos_w, H, W):
    """SAM's decomposed relative positions, from the unscaled queries (B, heads, H*W, C): rel_h (B, heads, H*W, H)
    and rel_w (B, heads, H*W, W). The bias of query i on key (kh, kw) is rel_h[..., i, kh] + rel_w[..., i, kw]."""
    B, n, _, C = q.shape
    r_q = q.reshape(B, n, H, W, C)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(H, H, rel_pos_h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(W, W, rel_pos_w))
    return rel_h.reshape(B, n, H * W, H), rel_w.reshape(B, n, H * W, W)


def folded_width(head_dim, H, W):
    """Width of q' and k' in folded_attention: the head, one column per key row and column, padded to 8."""
    return head_dim + H + W + -(head_dim + H + W) % 8


def folded_attention(q, k, v, rel_h, rel_w, H, W):
    """
    Attention with the decomposed bias folded into the dot product: q' = [q / sqrt(C), rel_h, rel_w] and
    k' = [k, one-hot(key row), one-hot(key column)], so q'.k' = q.k / sqrt(C) + rel_h[i, kh] + rel_w[i, kw], and
    plain SDPA (scale 1) computes SAM's attention exactly, with its fused kernels and their backward, which needs no
    atomic add for the bias (a tensor captured by a FlexAttention score_mod gets its gradient that way). Widths are
    padded to a multiple of 8, as fused kernels want.
    """
    B, n, HW, C = q.shape
    key_h = F.one_hot(torch.arange(H, device=q.device).repeat_interleave(W), H)  # (HW, H): each key's row
    key_w = F.one_hot(torch.arange(W, device=q.device).repeat(H), W)            # (HW, W): each key's column
    pad = folded_width(C, H, W) - (C + H + W)
    q = torch.cat([q * C ** -0.5, rel_h.to(q.dtype), rel_w.to(q.dtype), q.new_zeros(B, n, HW, pad)], dim=-1)
    onehots = torch.cat([key_h, key_w, key_h.new_zeros(HW, pad)], dim=-1).to(k.dtype)
    k = torch.cat([k, onehots.expand(B, n, HW, H + W + pad)], dim=-1)
    if not pads_value(q):
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    v = torch.cat([v, v.new_zeros(B, n, HW, q.size(-1) - C)], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :C]


def pads_value(q):
    """Whether folded_attention widens v to q's width: the CPU's fused kernel wants them equal (else the math path
    materialises every score, 1.2-1.5x slower); CUDA's memory-efficient kernel takes a narrower v, and the FLOP count
    (DeepEncoder.flops, for MFU) is of that."""
    return not q.is_cuda


def reference_attention(q, k, v, rel_h, rel_w):
    """The same attention with the bias built as an SDPA mask; at large grids one head at a time keeps it small."""
    B, n, HW, H = rel_h.shape
    step = n if HW <= 1024 else 1
    out = []
    for h0 in range(0, n, step):
        bias = (rel_h[:, h0:h0 + step, :, :, None] + rel_w[:, h0:h0 + step, :, None, :]).reshape(B, -1, HW, HW)
        out.append(F.scaled_dot_product_attention(q[:, h0:h0 + step], k[:, h0:h0 + step], v[:, h0:h0 + step],
                                                  attn_mask=bias.to(q.dtype)))
    return torch.cat(out, dim=1)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, input_size):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x):
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, HW, head_dim)
        rel_h, rel_w = relative_position_terms(q, self.rel_pos_h, self.rel_pos_w, H, W)
        y = folded_attention(q, k, v, rel_h, rel_w, H, W)
        return self.proj(y.transpose(1, 2).reshape(B, H, W, -1))


class MLPBlock(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))


def window_partition(x, window):
    """(B, H, W, C) -> (B * nWindows, window, window, C), zero-padding H and W up to a multiple of window."""
    B, H, W, C = x.shape
    pad_h, pad_w = (window - H % window) % window, (window - W % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(windows, window, padded_hw, hw):
    Hp, Wp = padded_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window // window)
    x = windows.view(B, Hp // window, Wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W, :].contiguous()


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, window_size, input_size):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, input_size if window_size == 0 else (window_size, window_size))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, padded_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded_hw, (H, W))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)  # channels last: (B, H, W, C)


class ImageEncoderViT(nn.Module):
    """(B, 3, S, S) pixels -> (B, net3_chans, S/64, S/64) compressed grid."""
    def __init__(self, config):
        super().__init__()
        self.config = config
        grid = config.img_size // config.patch_size
        self.patch_embed = PatchEmbed(config.patch_size, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
        self.blocks = nn.ModuleList([
            Block(config.embed_dim, config.num_heads, config.mlp_ratio,
                  0 if i in config.global_attn_indexes else config.window_size, (grid, grid))
            for i in range(config.depth)
        ])
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )
        self.net_2 = nn.Conv2d(config.out_chans, config.net2_chans, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(config.net2_chans, config.net3_chans, kernel_size=3, stride=2, padding=1, bias=False)
        self.grad_checkpointing = False  # recompute the global blocks in backward: they dominate memory at 1024 px

    def init_positions(self):
        """SAM's own init of its positions, after every module's reset_parameters: pos_embed small, rel_pos zero."""
        nn.init.normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.attn.rel_pos_h)
            nn.init.zeros_(block.attn.rel_pos_w)

    def forward_neck(self, x):
        """SAM proper: patches -> blocks -> neck, (B, out_chans, S/16, S/16)."""
        x = self.patch_embed(x)
        x = x + resize_pos_embed(self.pos_embed, x.size(1))
        for i, blk in enumerate(self.blocks):
            recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
            if recompute and i in self.config.global_attn_indexes:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward(self, x):
        return self.net_3(self.net_2(self.forward_neck(x)))

    def flops(self, size):
        """Forward FLOPs for one size x size view, the neck and the compressor included."""
        s = self.config
        g, C = size // s.patch_size, s.embed_dim
        flops = 2 * 3 * s.patch_size ** 2 * C * g * g  # patch embedding
        for i in range(s.depth):  # per block: qkv/proj, attention with its relative-position terms, the MLP
            w = g if i in s.global_attn_indexes else s.window_size
            t_attn = g * g if w == g else math.ceil(g / w) ** 2 * w * w  # window blocks attend over padded windows
            flops += 2 * C * 3 * C * t_attn + 2 * C * C * t_attn            # qkv, proj
            folded = s.num_heads * folded_width(C // s.num_heads, w, w)    # q.k with the bias folded in
            flops += 2 * t_attn * w * w * (folded + C) + 4 * t_attn * w * C  # attention, relative-position einsums
            n_rel, n_stored = 2 * w - 1, 2 * (s.img_size // s.patch_size if w == g else s.window_size) - 1
            flops += 2 * (2 * w * w * n_stored * C // s.num_heads)          # relative-position tables (h and w)
            flops += 2 * (2 * w * w * n_rel * n_stored) if n_rel != n_stored else 0  # their resize
            flops += 4 * C * int(C * s.mlp_ratio) * g * g                    # mlp
        # the neck (1x1 and 3x3 convs), then the two stride-2 convs of the compressor
        flops += 2 * C * s.out_chans * g * g + 2 * 9 * s.out_chans ** 2 * g * g
        return flops + 18 * (s.out_chans * s.net2_chans * (g // 2) ** 2 + s.net2_chans * s.net3_chans * (g // 4) ** 2)


def build_sam_vit_b():
    return ImageEncoderViT(SAMConfig())
