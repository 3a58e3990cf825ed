"""
The DeepEncoder: (B, 3, S, S) views -> (B, (S/64)^2, n_embd). SAM-ViT-B and its 16x conv compressor make an
(S/64) x (S/64) grid of 1024 channels; CLIP-L/14 runs over that grid as its patch embeddings; the two are
concatenated per position (CLIP first, as DeepSeek-OCR) and projected to the GPT's width.
"""
import math

import torch
import torch.nn as nn

from deepencoder.build_linear import MlpProjector
from deepencoder.clip_sdpa import VitModel, CLIPConfig
from deepencoder.sam_vary_sdpa import ImageEncoderViT, SAMConfig, folded_width


def tiny_encoder_configs():
    """A DeepEncoder small enough for CPU tests and the demo; same patch size and compression, so same slot counts."""
    sam = SAMConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), out_chans=32, net2_chans=64,
                    net3_chans=128)
    clip = CLIPConfig(hidden_size=128, num_layers=2, num_heads=2, ffn_dim=256)
    return sam, clip


class DeepEncoder(nn.Module):
    """(B, 3, S, S) views -> (B, (S/64)^2, n_embd): SAM grid -> CLIP over that grid -> [CLIP, SAM] -> projector."""
    def __init__(self, sam_config, clip_config, n_embd):
        super().__init__()
        assert clip_config.hidden_size == sam_config.net3_chans, "CLIP takes the compressed SAM grid as its patches"
        self.sam_model = ImageEncoderViT(sam_config)
        self.vision_model = VitModel(clip_config)
        self.projector = MlpProjector(sam_config.net3_chans + clip_config.hidden_size, n_embd)

    def forward(self, pixel_values):
        sam = self.sam_model(pixel_values)
        clip = self.vision_model(sam)
        features = torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)  # CLIP first, as DeepSeek-OCR
        return self.projector(features)

    def freeze_sam(self):
        """Stage 2: SAM + net_2 + net_3 stop training."""
        self.sam_model.requires_grad_(False)

    def set_activation_checkpointing(self, enabled):
        """Recompute SAM's global-attention blocks in backward: they dominate activation memory at 1024 px."""
        self.sam_model.grad_checkpointing = enabled

    def init_weights(self):
        for module in self.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        nn.init.normal_(self.sam_model.pos_embed, std=0.02)
        for block in self.sam_model.blocks:
            nn.init.zeros_(block.attn.rel_pos_h)  # SAM's rel_pos_zero_init
            nn.init.zeros_(block.attn.rel_pos_w)
        emb = self.vision_model.embeddings
        nn.init.normal_(emb.class_embedding, std=emb.class_embedding.numel() ** -0.5)
        nn.init.normal_(emb.position_embedding.weight, std=0.02)

    def flops(self, size):
        """Forward FLOPs for one size x size view, per part: sam (with neck and compressor), clip, projector."""
        s, c = self.sam_model.config, self.vision_model.config
        g = size // s.patch_size
        C = s.embed_dim
        # SAM: patch embedding, then per block qkv/proj, attention with its relative-position terms, and the MLP
        sam = 2 * 3 * s.patch_size ** 2 * C * g * g
        for i in range(s.depth):
            w = g if i in s.global_attn_indexes else s.window_size
            t_attn = g * g if w == g else math.ceil(g / w) ** 2 * w * w  # window blocks attend over padded windows
            sam += 2 * C * 3 * C * t_attn + 2 * C * C * t_attn            # qkv, proj
            folded = s.num_heads * folded_width(C // s.num_heads, w, w)  # q.k with the bias folded in
            sam += 2 * t_attn * w * w * (folded + C) + 4 * t_attn * w * C  # attention, relative-position einsums
            n_rel, n_stored = 2 * w - 1, 2 * (s.img_size // s.patch_size if w == g else s.window_size) - 1
            sam += 2 * (2 * w * w * n_stored * C // s.num_heads)          # relative-position tables (h and w)
            sam += 2 * (2 * w * w * n_rel * n_stored) if n_rel != n_stored else 0  # their resize
            sam += 4 * C * int(C * s.mlp_ratio) * g * g                    # mlp
        # the neck (1x1 and 3x3 convs), then the two stride-2 convs of the compressor
        sam += 2 * C * s.out_chans * g * g + 2 * 9 * s.out_chans ** 2 * g * g
        sam += 2 * 9 * s.out_chans * s.net2_chans * (g // 2) ** 2 + 2 * 9 * s.net2_chans * s.net3_chans * (g // 4) ** 2
        # CLIP over the q x q grid plus CLS, then the projector on the q x q features
        q = g // 4
        T, H = q * q + 1, c.hidden_size
        clip = c.num_layers * (2 * H * 3 * H * T + 2 * H * H * T + 4 * H * c.ffn_dim * T + 4 * T * T * H)
        projector = 2 * self.projector.layers.in_features * self.projector.layers.out_features * q * q
        return dict(sam=sam, clip=clip, projector=projector)
