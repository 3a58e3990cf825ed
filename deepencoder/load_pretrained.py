"""
Pretrained weights into our module names. Every source is a hub id, a local directory or a file
(safetensors or torch). A load is all or nothing: missing, unexpected or mis-shaped keys raise an error
that names them; the only keys allowed to stay at random init are the ones with no pretrained source.

  SAM   facebook/sam-vit-base (transformers layout) | Meta's sam_vit_b_01ec64.pth (image_encoder.*) |
        deepseek-ai/DeepSeek-OCR (model.sam_model.*; a compressor conv of another width keeps its init)
  CLIP  openai/clip-vit-large-patch14 (with or without the vision_model. prefix)
  Qwen2 Qwen/Qwen2-0.5B (model.layers.*, model.norm; the embedding and head dropped)
  v1    deepseek-ai/DeepSeek-OCR: model.sam_model / vision_model / projector / image_newline / view_seperator
  v2    deepseek-ai/DeepSeek-OCR-2: model.sam_model / qwen2_model.model.model / qwen2_model.query_* / projector /
        view_seperator
"""
import glob
import os
import re

import torch
from safetensors import safe_open

from hub import hub_snapshot

WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pth", "*.pt", "*.json"]


def weight_files(source):
    """A file, a directory, or a hub id -> the weight files (safetensors preferred over torch pickles)."""
    if os.path.isfile(source):
        return [source]
    directory = source if os.path.isdir(source) else hub_snapshot(
        source, repo_type="model", allow_patterns=WEIGHT_PATTERNS,
        hint="or pass a local directory or file as the source")
    found = sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True))
    safetensors = [f for f in found if f.endswith(".safetensors")]
    pickles = [f for f in found if f.endswith((".bin", ".pth", ".pt"))]
    if not (safetensors or pickles):
        raise FileNotFoundError(f"no weight files (.safetensors/.bin/.pth/.pt) in {directory}")
    return safetensors or pickles


def read_tensors(files, keep=lambda key: True):
    """Read only the tensors whose names pass `keep` (DeepSeek-OCR's file also holds a 3B language model)."""
    state = {}
    for path in files:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if keep(key):
                        state[key] = f.get_tensor(key)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
            data = data.get("model", data) if isinstance(data.get("model"), dict) else data
            state.update({k: v for k, v in data.items() if keep(k)})
    return state


def load_checked(module, state, source, random_init=(), skip=()):
    """Strict load with a report. `random_init`: name prefixes allowed to be absent (they keep their init);
    `skip`: prefixes of the module this source does not cover at all."""
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(tuple(skip))}
    missing = [k for k in own if k not in state and not k.startswith(tuple(random_init))]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"cannot load {source} into {type(module).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise ValueError("\n".join(lines))
    module.load_state_dict(state, strict=False)
    return dict(source=source, loaded=len(state), random_init=[k for k in own if k not in state])


def sam_state_from_transformers(state):
    """facebook/sam-vit-base (SamModel, prefix vision_encoder.) -> SAM names. Prompt encoder / mask decoder dropped."""
    neck = {"conv1": "0", "layer_norm1": "1", "conv2": "2", "layer_norm2": "3"}
    out = {}
    for key, value in state.items():
        if not key.startswith("vision_encoder."):
            continue
        key = key[len("vision_encoder."):]
        if key.startswith("neck."):
            part, rest = key[len("neck."):].split(".", 1)
            key = f"neck.{neck[part]}.{rest}"
        else:
            key = key.replace("patch_embed.projection.", "patch_embed.proj.")
            key = re.sub(r"^layers\.(\d+)\.", r"blocks.\1.", key)
            key = key.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
        out[key] = value
    return out


def clip_state_from_transformers(state):
    """openai/clip-vit-large-patch14 -> our CLIP names: q/k/v fused into qkv_proj, post_layernorm and the text tower
    dropped."""
    out, qkv = {}, {}
    for key, value in state.items():
        key = key.removeprefix("vision_model.")
        if not key.startswith(("embeddings.", "pre_layrnorm.", "encoder.")) or key.endswith("position_ids"):
            continue  # text_model.*, post_layernorm, projections, logit_scale, the position_ids buffer
        key = key.replace("encoder.layers.", "transformer.layers.")
        m = re.match(r"(transformer\.layers\.\d+\.self_attn)\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{prefix}: incomplete q/k/v projections ({sorted(parts)})")
        out[f"{prefix}.qkv_proj.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def load_sam(sam, source):
    """SAM weights (transformers, Meta or DeepSeek-OCR layout, told by the keys) into an ImageEncoderViT. net_2 / net_3
    come only from DeepSeek-OCR, and only where their shapes fit (its net_3 is 1024 wide, DeepSeek-OCR 2's 896); else
    they stay at random init (reported)."""
    prefixes = ("vision_encoder.", "image_encoder.", "model.sam_model.")
    state = read_tensors(weight_files(source), keep=lambda k: k.startswith(prefixes))
    if any(k.startswith("vision_encoder.") for k in state):
        state = sam_state_from_transformers(state)
    elif state:
        state = {k.split(".", 2)[-1] if k.startswith("model.") else k.split(".", 1)[-1]: v for k, v in state.items()}
    else:
        raise ValueError(f"{source}: no SAM image encoder keys ({', '.join(p + '*' for p in prefixes)}) found")
    own = sam.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(("net_2.", "net_3.")) or v.shape == own[k].shape}
    return load_checked(sam, state, source, random_init=("net_2.", "net_3."))


def load_clip(clip, source):
    """CLIP-L/14 vision tower into a VitModel."""
    tensors = read_tensors(weight_files(source), keep=lambda k: not k.startswith("text_model."))
    state = clip_state_from_transformers(tensors)
    if not state:
        raise ValueError(f"{source}: no CLIP vision keys found")
    return load_checked(clip, state, source)


DEEPSEEK_PREFIXES = {
    "model.sam_model.": "encoder.sam_model.",
    "model.vision_model.": "encoder.vision_model.",
    "model.projector.": "encoder.projector.",
    "model.image_newline": "image_newline",
    "model.view_seperator": "view_seperator",
}


def load_deepseek_ocr_encoder(model, source="deepseek-ai/DeepSeek-OCR"):
    """DeepSeek-OCR's trained DeepEncoder + projector + newline/separator into a NanoDeepseekOCR (its GPT untouched).
    The projector is 2048 -> 1280, so the GPT must be 1280 wide (d20)."""
    state = read_tensors(weight_files(source), keep=lambda k: k.startswith(tuple(DEEPSEEK_PREFIXES)))
    if not state:
        raise ValueError(f"{source}: no DeepSeek-OCR vision keys (model.sam_model.*, model.vision_model.*, ...) found")
    mapped = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer of CLIP's, not a weight
        for theirs, ours in DEEPSEEK_PREFIXES.items():
            if key.startswith(theirs):
                mapped[ours + key[len(theirs):]] = value
    return load_checked(model, mapped, source, skip=("gpt.",))


def load_qwen2(qwen2, source="Qwen/Qwen2-0.5B"):
    """Qwen2-0.5B's decoder layers and final norm into a Qwen2Encoder (its embedding and head dropped); the queries
    have no source and stay at random init (reported)."""
    state = {k.removeprefix("model."): v for k, v in read_tensors(
        weight_files(source), keep=lambda k: k.startswith(("model.layers.", "model.norm."))).items()}
    if not state:
        raise ValueError(f"{source}: no Qwen2 decoder keys (model.layers.*, model.norm.*) found")
    return load_checked(qwen2, state, source, random_init=("query_",))


DEEPSEEK2_PREFIXES = {
    "model.sam_model.": "encoder.sam_model.",
    "model.qwen2_model.model.model.": "encoder.qwen2_model.",
    "model.qwen2_model.query_": "encoder.qwen2_model.query_",
    "model.projector.": "encoder.projector.",
    "model.view_seperator": "view_seperator",
}


def load_deepseek_ocr2_encoder(model, source="deepseek-ai/DeepSeek-OCR-2"):
    """DeepSeek-OCR 2's trained DeepEncoder V2 (SAM + compressor, Qwen2 stack, queries), projector and separator into a
    NanoDeepseekOCR of the v2 encoder (its GPT untouched). The projector is 896 -> 1280, so the GPT must be 1280 wide
    (d20)."""
    state = read_tensors(weight_files(source), keep=lambda k: k.startswith(tuple(DEEPSEEK2_PREFIXES)) and
                         not k.endswith(("inv_freq", "embed_tokens.weight")))  # buffers, and the unused embedding
    if not state:
        raise ValueError(f"{source}: no DeepSeek-OCR 2 vision keys (model.sam_model.*, model.qwen2_model.*, ...) found")
    mapped = {}
    for key, value in state.items():
        theirs = next(p for p in DEEPSEEK2_PREFIXES if key.startswith(p))
        mapped[DEEPSEEK2_PREFIXES[theirs] + key[len(theirs):]] = value
    return load_checked(model, mapped, source, skip=("gpt.",))
