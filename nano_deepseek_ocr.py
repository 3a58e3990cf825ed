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

from deepencoder.sam_vary_sdpa import ImageEncoderViT, SAMConfig
from deepencoder.clip_sdpa import VitModel, CLIPConfig
from deepencoder.build_linear import MlpProjector
from gpt import GPT, GPTConfig, KVCache
from image_process import DeepseekOCRProcessor
from config import IMAGE_TOKEN


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


def tiny_encoder_configs():
    """A DeepEncoder small enough for CPU tests and the demo; same patch size and compression, so same slot counts."""
    sam = SAMConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), out_chans=32, net2_chans=64, net3_chans=128)
    clip = CLIPConfig(hidden_size=128, num_layers=2, num_heads=2, ffn_dim=256)
    return sam, clip


def gpt_config_for_depth(depth, vocab_size, sequence_len):
    """nanochat's sizing rule: width 64 per layer, 128-wide heads (d20 -> 1280 wide, 10 heads)."""
    n_embd = depth * 64
    n_head = max(1, (n_embd + 127) // 128)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head, n_embd=n_embd)


class DeepEncoder(nn.Module):
    """(B, 3, S, S) views -> (B, (S/64)^2, n_embd): SAM grid -> CLIP over that grid -> concat [CLIP, SAM] -> projector."""
    def __init__(self, sam_config, clip_config, n_embd):
        super().__init__()
        assert clip_config.hidden_size == sam_config.net3_chans, "CLIP takes the compressed SAM grid as its patch embeddings"
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
        sam = 2 * 3 * s.patch_size ** 2 * C * g * g
        for i in range(s.depth):
            w = g if i in s.global_attn_indexes else s.window_size
            t_attn = g * g if w == g else math.ceil(g / w) ** 2 * w * w  # window blocks attend over padded windows
            sam += 2 * C * 3 * C * t_attn + 2 * C * C * t_attn            # qkv, proj
            sam += 4 * t_attn * w * w * C + 4 * t_attn * w * C            # attention, relative-position einsums
            n_rel, n_stored = 2 * w - 1, 2 * (s.img_size // s.patch_size if w == g else s.window_size) - 1
            sam += 2 * (2 * w * w * n_stored * C // s.num_heads)          # relative-position tables (h and w)
            sam += 2 * (2 * w * w * n_rel * n_stored) if n_rel != n_stored else 0  # their resize
            sam += 4 * C * int(C * s.mlp_ratio) * g * g                    # mlp
        sam += 2 * C * s.out_chans * g * g + 2 * 9 * s.out_chans ** 2 * g * g
        sam += 2 * 9 * s.out_chans * s.net2_chans * (g // 2) ** 2 + 2 * 9 * s.net2_chans * s.net3_chans * (g // 4) ** 2
        q = g // 4
        T, H = q * q + 1, c.hidden_size
        clip = c.num_layers * (2 * H * 3 * H * T + 2 * H * H * T + 4 * H * c.ffn_dim * T + 4 * T * T * H)
        projector = 2 * self.projector.layers.in_features * self.projector.layers.out_features * q * q
        return dict(sam=sam, clip=clip, projector=projector)


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
            out = self.encoder(torch.stack([v for _, _, v in views]).to(device, non_blocking=True))
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

    def forward(self, input_ids, targets=None, images=None, loss_reduction="mean"):
        return self.gpt(inputs_embeds=self.embed(input_ids, images), targets=targets, loss_reduction=loss_reduction)

    # ---- optimizers and FLOPs --------------------------------------------------------------------

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, vision_lr=1e-4,
                         weight_decay=0.0, adamw_only=False):
        """GPT as nanochat (Muon on block matrices); the whole vision side, newline/separator included, on AdamW."""
        vision = [p for name, p in self.named_parameters() if not name.startswith("gpt.")]
        return self.gpt.setup_optimizers(unembedding_lr, embedding_lr, matrix_lr, weight_decay,
                                         extra_adamw_groups=[dict(params=vision, lr=vision_lr)], adamw_only=adamw_only)

    def train_flops(self, num_tokens, seq_len, images):
        """
        FLOPs of one training step: GPT forward+backward over num_tokens (nanochat's count at this seq_len), plus each
        image view through the encoder: 3x forward for the parts that train, 1x for frozen ones (nothing to backprop).
        """
        flops = self.gpt.estimate_flops(seq_len) * num_tokens
        trains = dict(sam=any(p.requires_grad for p in self.encoder.sam_model.parameters()),
                      clip=any(p.requires_grad for p in self.encoder.vision_model.parameters()),
                      projector=any(p.requires_grad for p in self.encoder.projector.parameters()))
        for size in [view.shape[-1] for image in images for _, view in image_views(image)]:
            for part, f in self.encoder.flops(size).items():
                flops += 3 * f if trains[part] else f
        return flops

    # ---- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, images=None, max_new_tokens=256, stop_token_id=None, temperature=0.0, top_k=None,
                 seed=42, no_repeat_ngram_size=0, ngram_window=90, ngram_whitelist=(), use_cache=True):
        """
        Batched generation. prompts: token id lists (left-padded together); images: image dicts in order of
        appearance across the prompts. Images are encoded once at prefill, then each step decodes one token
        with the KV cache (use_cache=False recomputes everything each step, for testing). The <image> logit
        is never sampled. Returns the new token ids per prompt, without the stop token.
        """
        device = self.image_newline.device
        B, L = len(prompts), max(len(p) for p in prompts)
        pad = 0 if self.image_token_id != 0 else 1
        ids = torch.full((B, L), pad, dtype=torch.long, device=device)
        valid = torch.zeros(B, L, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p, device=device)
            valid[b, L - len(p):] = True
        cfg = self.config.gpt
        head_dim = cfg.n_embd // cfg.n_head
        autocast = torch.is_autocast_enabled(device.type)  # keys/values come out in the autocast dtype when it is on
        dtype = torch.get_autocast_dtype(device.type) if autocast else self.gpt.lm_head.weight.dtype

        def new_cache(length, valid_mask):
            return KVCache(B, cfg.n_kv_head, length, head_dim, cfg.n_layer, device, dtype, valid_mask)
        rng = torch.Generator(device=device).manual_seed(seed)
        embeds = self.embed(ids, images)
        cache = new_cache(L + max_new_tokens, valid)
        logits = self.gpt(inputs_embeds=embeds, kv_cache=cache)[:, -1]
        out = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new_tokens):
            logits = logits.float()
            logits[:, self.image_token_id] = -float("inf")
            if no_repeat_ngram_size > 0:
                for b in range(B):
                    banned = no_repeat_ngram_bans(out[b], no_repeat_ngram_size, ngram_window, ngram_whitelist)
                    if banned:
                        logits[b, list(banned)] = -float("inf")
            next_ids = sample_next(logits, temperature, top_k, rng)
            for b in range(B):
                if not done[b]:
                    token = int(next_ids[b])
                    if token == stop_token_id:
                        done[b] = True
                    else:
                        out[b].append(token)
            if all(done) or step == max_new_tokens - 1:
                break
            if use_cache:
                logits = self.gpt(idx=next_ids[:, None], kv_cache=cache)[:, -1]
            else:  # recompute the whole sequence, images included
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                valid = torch.cat([valid, valid.new_ones(B, 1)], dim=1)
                logits = self.gpt(inputs_embeds=self.embed(ids, images), kv_cache=new_cache(ids.size(1), valid))[:, -1]
        return out


def image_views(image):
    """The views the encoder sees for one processed image: ("global", (3,S,S)), then ("tiles", (3,s,s)) per tile."""
    yield "global", image["pixel_values"]
    n_w, n_h = tuple(image["images_spatial_crop"])
    if (n_w, n_h) != (1, 1):  # a single tile would only repeat the global view
        for tile in image["images_crop"][:n_w * n_h]:
            yield "tiles", tile


def sample_next(logits, temperature, top_k, rng):
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng)[:, 0]


def no_repeat_ngram_bans(tokens, n, window, whitelist=()):
    """DeepSeek-OCR's no-repeat n-gram rule: within the last `window` tokens, a token that would complete an
    n-gram already seen is banned (unless whitelisted, e.g. table cells that legitimately repeat)."""
    if len(tokens) < n:
        return set()
    prefix = tuple(tokens[-(n - 1):]) if n > 1 else ()
    start = max(0, len(tokens) - window)
    banned = {tokens[i + n - 1] for i in range(start, len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}
    return banned - set(whitelist)


def ocr(model, tokenizer, images, prompts, mode="base", max_new_tokens=512, **generate_kwargs):
    """Read PIL images: prompts (one, or one per image) -> generated texts. The whole inference path in one call."""
    processor = DeepseekOCRProcessor(mode)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else prompts
    items = [processor.process_image(image) for image in images]
    ids = [tokenizer.render_vision_pretraining(p if IMAGE_TOKEN in p else f"{IMAGE_TOKEN}\n{p}", 1 << 30, [it["num_image_tokens"]])[0]
           for p, it in zip(prompts, items)]
    outputs = model.generate(ids, items, max_new_tokens, stop_token_id=tokenizer.stop_token_id, **generate_kwargs)
    return [tokenizer.decode(o) for o in outputs]


def build_model(config, device="cpu"):
    """Build on the meta device, materialise on `device`, initialise (nanochat's pattern: fast for big models)."""
    with torch.device("meta"):
        model = NanoDeepseekOCR(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
