"""
NanoDeepseekOCR: DeepSeek-OCR's DeepEncoder (SAM-ViT-B -> 16x conv compressor -> CLIP-L/14 -> projector)
feeding a nanochat GPT. Images become runs of <image> slots in the token sequence; their embeddings are laid
out DeepSeek-style (a newline vector after every grid row, tiles before the global view, a separator last)
and scattered over the slots. The loss is nanochat's: cross-entropy with ignore_index=-1.
"""
import math
from collections import defaultdict
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn

from deepencoder.clip_sdpa import CLIPConfig
from deepencoder.encoder import DeepEncoder
from deepencoder.sam_vary_sdpa import SAMConfig
from gpt import GENERATIONS, GPT, GPTConfig
from image_process import normalize


@dataclass
class NanoDeepseekOCRConfig:
    sam: SAMConfig = field(default_factory=SAMConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    image_token_id: int = 0

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        sam = dict(d["sam"], global_attn_indexes=tuple(d["sam"]["global_attn_indexes"]))
        return cls(SAMConfig(**sam), CLIPConfig(**d["clip"]), GPTConfig(**d["gpt"]), d["image_token_id"])


class NanoDeepseekOCR(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        n_embd = config.gpt.n_embd
        self.encoder = DeepEncoder(config.sam, config.clip, n_embd)
        self.image_newline = nn.Parameter(torch.empty(n_embd))
        self.view_seperator = nn.Parameter(torch.empty(n_embd))  # sic: DeepSeek-OCR's checkpoint spelling
        self.gpt = GPT(config.gpt)
        self.image_token_id = config.image_token_id

    def gpt_generation(self):
        """Which of nanochat's GPT generations this model's GPT is (gpt.GENERATIONS)."""
        return next(g for g, fields in sorted(GENERATIONS.items(), reverse=True)
                    if all(getattr(self.config.gpt, k) == v for k, v in fields.items()))

    def init_weights(self):
        self.encoder.init_weights()
        std = self.config.gpt.n_embd ** -0.5
        nn.init.normal_(self.image_newline, std=std)
        nn.init.normal_(self.view_seperator, std=std)
        self.gpt.init_weights()

    # ---- images -> slot embeddings -------------------------------------------------------------

    def layout(self, global_features, tile_features=None, tiles=(1, 1)):
        """DeepSeek-OCR's slot order: [tiles grid + newlines] [global grid + newlines] [view_seperator]."""
        C = global_features.size(-1)
        newline = self.image_newline.to(global_features.dtype)
        q = math.isqrt(global_features.size(0))
        rows = torch.cat([global_features.view(q, q, C), newline.expand(q, 1, C)], dim=1).view(-1, C)
        parts = [rows, self.view_seperator.to(global_features.dtype)[None]]
        if tiles != (1, 1):
            n_w, n_h = tiles
            qt = math.isqrt(tile_features.size(1))
            grid = tile_features.view(n_h, n_w, qt, qt, C).permute(0, 2, 1, 3, 4).reshape(n_h * qt, n_w * qt, C)
            parts.insert(0, torch.cat([grid, newline.expand(n_h * qt, 1, C)], dim=1).view(-1, C))
        return torch.cat(parts)

    def encode_images(self, images):
        """
        images: dicts with pixel_values (3,S,S), images_crop (P,3,s,s) or None, images_spatial_crop (nW,nH).
        Views of one size go through the encoder together (a batch may mix modes). Returns one
        (slots, n_embd) tensor per image.
        """
        device = self.image_newline.device
        by_size = defaultdict(list)
        for i, image in enumerate(images):
            for kind, view in image_views(image):
                by_size[view.shape[-1]].append((i, kind, view))
        features = defaultdict(list)
        for views in by_size.values():
            stack = torch.stack([v for _, _, v in views]).to(device, non_blocking=True)
            out = self.encoder(normalize(stack) if stack.dtype == torch.uint8 else stack)
            for (i, kind, _), f in zip(views, out):
                features[(i, kind)].append(f)
        return [self.layout(features[(i, "global")][0],
                            torch.stack(features[(i, "tiles")]) if features[(i, "tiles")] else None,
                            tuple(int(t) for t in image["images_spatial_crop"]))
                for i, image in enumerate(images)]

    def embed(self, input_ids, images=None):
        """Token embeddings with the image embeddings scattered, in order, over the <image> slots."""
        x = self.gpt.transformer.wte(input_ids)
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        features = torch.cat(self.encode_images(images)) if images else x.new_zeros(0, x.size(-1))
        if features.size(0) != n_slots:
            raise ValueError(f"{n_slots} <image> slots in the tokens but {features.size(0)} image embeddings "
                             f"from {len(images or [])} image(s): slot counts and images disagree")
        if n_slots:
            x = x.masked_scatter(slots.unsqueeze(-1), features.to(x.dtype))
        return x

    def forward(self, input_ids, targets=None, images=None, loss_reduction="mean", doc_ids=None, positions=None):
        """Packed rows carry doc_ids and positions (see dataloader.pack): attention then stays inside each sample."""
        return self.gpt(input_ids, targets, inputs_embeds=self.embed(input_ids, images), loss_reduction=loss_reduction,
                        positions=positions, doc_ids=doc_ids)

    # ---- optimizers and FLOPs --------------------------------------------------------------------

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, vision_lr=1e-4,
                         weight_decay=0.0, adamw_lr=None):
        """GPT as nanochat (Muon on block matrices); the whole vision side, newline/separator included, on AdamW.
        adamw_lr: AdamW for everything at that lr instead."""
        vision = [p for name, p in self.named_parameters() if not name.startswith("gpt.")]
        return self.gpt.setup_optimizers(unembedding_lr, embedding_lr, matrix_lr, weight_decay,
                                         extra_adamw_groups=[dict(params=vision, lr=vision_lr)],
                                         adamw_lr=adamw_lr)

    def train_flops(self, doc_lengths, images):
        """
        FLOPs of one training micro-batch, counting only work done: the GPT forward+backward over each packed sample
        (nanochat's count, a sample attending itself), plus each view the encoder ran: 3x forward for the parts that
        train, 1x for frozen ones (nothing to backprop). Padding is not work.
        """
        flops = self.gpt.flops(doc_lengths)
        trains = dict(sam=any(p.requires_grad for p in self.encoder.sam_model.parameters()),
                      clip=any(p.requires_grad for p in self.encoder.vision_model.parameters()),
                      projector=any(p.requires_grad for p in self.encoder.projector.parameters()))
        for size in [view.shape[-1] for image in images for _, view in image_views(image)]:
            for part, f in self.encoder.flops(size).items():
                flops += 3 * f if trains[part] else f
        return flops


def image_views(image):
    """The views the encoder sees for one processed image: ("global", (3,S,S)), then ("tiles", (3,s,s)) per tile."""
    yield "global", image["pixel_values"]
    n_w, n_h = tuple(image["images_spatial_crop"])
    if (n_w, n_h) != (1, 1):  # a single tile would only repeat the global view
        for tile in image["images_crop"][:n_w * n_h]:
            yield "tiles", tile


def build_model(config, device="cpu"):
    """Build on the meta device, materialise on `device`, initialise (nanochat's pattern: fast for big models)."""
    with torch.device("meta"):
        model = NanoDeepseekOCR(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
