"""
The two encoders: (B, 3, S, S) uint8 views, normalised here -> (B, (S/64)^2, n_embd). SAM-ViT-B and its 16x conv
compressor make an (S/64) x (S/64) grid. DeepEncoder (DeepSeek-OCR): CLIP-L/14 runs over that grid (1024 channels) as
its patch embeddings, the two are concatenated per position (CLIP first) and projected to the GPT's width.
DeepEncoderV2 (DeepSeek-OCR 2): a Qwen2 stack reads the grid (896 channels) through as many learned queries, whose
outputs are projected.
"""
import torch
import torch.nn as nn

from deepencoder.build_linear import MlpProjector
from deepencoder.clip_sdpa import VitModel, CLIPConfig
from deepencoder.qwen2_encoder import Qwen2Encoder, Qwen2EncoderConfig
from deepencoder.sam_vary_sdpa import ImageEncoderViT, SAMConfig
from image_process import normalize


def tiny_encoder_configs():
    """A DeepEncoder small enough for CPU tests and the demo; same patch size and compression, so same slot counts.
    Windows of 16 tile Tiny's 32 x 32 grid exactly (SAM-B's 14 pad it to 42 x 42: 72% more tokens in the window
    block; the demo's step is 6% faster)."""
    sam = SAMConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=16, out_chans=32,
                    net2_chans=64, net3_chans=128)
    clip = CLIPConfig(hidden_size=128, num_layers=2, num_heads=2, ffn_dim=256)
    return sam, clip


ENCODERS = ("full", "tiny", "v2", "v2-tiny")


def encoder_configs(name):
    """The encoders the training scripts build by name -> (SAMConfig, CLIPConfig or None, Qwen2EncoderConfig or None):
    full (SAM-B + CLIP-L), tiny (the CPU demo's), v2 (SAM-B + Qwen2-0.5B, DeepSeek-OCR 2's), v2-tiny (its CPU size,
    with one query bank, for 512-px views)."""
    sam, clip = tiny_encoder_configs() if name.endswith("tiny") else (SAMConfig(), CLIPConfig())
    if name == "v2":
        return SAMConfig(net3_chans=896), None, Qwen2EncoderConfig()
    if name == "v2-tiny":
        return sam, None, Qwen2EncoderConfig(n_layer=2, hidden_size=128, num_heads=2, num_kv_heads=1,
                                             intermediate_size=256, query_sizes=(512,))
    return sam, clip, None


class DeepEncoder(nn.Module):
    """(B, 3, S, S) uint8 views -> (B, (S/64)^2, n_embd): SAM grid -> CLIP over that grid -> [CLIP, SAM] ->
    projector."""
    def __init__(self, sam_config, clip_config, n_embd):
        super().__init__()
        assert clip_config.hidden_size == sam_config.net3_chans, "CLIP takes the compressed SAM grid as its patches"
        self.sam_model = ImageEncoderViT(sam_config)
        self.vision_model = VitModel(clip_config)
        self.projector = MlpProjector(sam_config.net3_chans + clip_config.hidden_size, n_embd)

    def forward(self, pixels):
        sam = self.sam_model(normalize(pixels))
        clip = self.vision_model(sam)
        features = torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)  # CLIP first, as DeepSeek-OCR
        return self.projector(features)

    def init_weights(self):
        for module in self.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.sam_model.init_positions()
        emb = self.vision_model.embeddings
        nn.init.normal_(emb.class_embedding, std=emb.class_embedding.numel() ** -0.5)
        nn.init.normal_(emb.position_embedding.weight, std=0.02)

    def flops(self, size):
        """Forward FLOPs for one size x size view, by part (the submodules' names): SAM with its neck and compressor,
        CLIP over the q x q grid plus CLS, the projector on the q x q features."""
        c, q = self.vision_model.config, size // self.sam_model.config.patch_size // 4
        T, H = q * q + 1, c.hidden_size
        clip = c.num_layers * (2 * H * 3 * H * T + 2 * H * H * T + 4 * H * c.ffn_dim * T + 4 * T * T * H)
        projector = 2 * self.projector.layers.in_features * self.projector.layers.out_features * q * q
        return dict(sam_model=self.sam_model.flops(size), vision_model=clip, projector=projector)


class DeepEncoderV2(nn.Module):
    """(B, 3, S, S) uint8 views -> (B, (S/64)^2, n_embd): SAM grid -> Qwen2 over [grid tokens, queries] -> the
    queries' outputs -> projector."""
    def __init__(self, sam_config, qwen2_config, n_embd):
        super().__init__()
        assert qwen2_config.hidden_size == sam_config.net3_chans, "the Qwen2 stack reads the compressed SAM grid"
        self.sam_model = ImageEncoderViT(sam_config)
        self.qwen2_model = Qwen2Encoder(qwen2_config)
        self.projector = MlpProjector(qwen2_config.hidden_size, n_embd)

    def forward(self, pixels):
        return self.projector(self.qwen2_model(self.sam_model(normalize(pixels))))

    def init_weights(self):
        for module in self.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.sam_model.init_positions()
        self.qwen2_model.init_weights()

    def flops(self, size):
        """Forward FLOPs for one size x size view, by part (the submodules' names)."""
        q = size // self.sam_model.config.patch_size // 4
        return dict(sam_model=self.sam_model.flops(size), qwen2_model=self.qwen2_model.flops(q),
                    projector=2 * self.projector.layers.in_features * self.projector.layers.out_features * q * q)
