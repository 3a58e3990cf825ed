import time

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig as HFCLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
from transformers import SamConfig as HFSamConfig, SamModel, SamVisionConfig

import hub
from deepencoder.build_linear import MlpProjector
from deepencoder.clip_sdpa import CLIPConfig, VitModel, build_clip_l
from deepencoder.load_pretrained import load_clip, load_deepseek_ocr_encoder, load_sam
from deepencoder.sam_vary_sdpa import ImageEncoderViT, SAMConfig, build_sam_vit_b
from deepencoder.encoder import DeepEncoder, tiny_encoder_configs

n_params = lambda module: sum(p.numel() for p in module.parameters())


def test_full_size_parameter_counts():
    with torch.device("meta"):
        sam, clip, projector = build_sam_vit_b(), build_clip_l(), MlpProjector(2048, 1280)
    assert n_params(sam) == 95_569_152
    assert n_params(sam) - n_params(sam.net_2) - n_params(sam.net_3) == 89_670_912
    assert n_params(clip) == 303_177_728
    assert n_params(projector) == 2_622_720
    state = sam.state_dict()
    assert state["pos_embed"].shape == (1, 64, 64, 768)
    assert state["blocks.0.attn.rel_pos_h"].shape == (27, 64) and state["blocks.2.attn.rel_pos_h"].shape == (127, 64)
    assert state["blocks.0.attn.qkv.weight"].shape == (2304, 768)
    assert state["neck.0.weight"].shape == (256, 768, 1, 1) and state["net_3.weight"].shape == (1024, 512, 3, 3)
    assert clip.state_dict()["transformer.layers.23.self_attn.qkv_proj.weight"].shape == (3072, 1024)


@pytest.mark.parametrize("size,grid", [(512, 8), (640, 10), (1024, 16), (1280, 20)])
def test_output_grids(size, grid):
    torch.manual_seed(0)
    sam = ImageEncoderViT(SAMConfig(embed_dim=16, depth=2, num_heads=1, global_attn_indexes=(1,), out_chans=8, net2_chans=8, net3_chans=16))
    clip = VitModel(CLIPConfig(hidden_size=16, num_layers=1, num_heads=1, ffn_dim=32))
    with torch.no_grad():
        out = sam(torch.randn(1, 3, size, size))
        tokens = clip(out)
    assert out.shape == (1, 16, grid, grid)
    assert tokens.shape == (1, grid * grid + 1, 16)


def randomize(module, std=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def tiny_sam_pair():
    hf = SamVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=256, patch_size=16,
                         output_channels=24, window_size=6, global_attn_indexes=[1], mlp_dim=128)
    ours = SAMConfig(img_size=256, embed_dim=32, depth=3, num_heads=2, window_size=6, global_attn_indexes=(1,),
                     out_chans=24, net2_chans=8, net3_chans=16)
    return randomize(SamModel(HFSamConfig(vision_config=hf.to_dict()))).eval(), ImageEncoderViT(ours).eval()


def test_sam_matches_transformers_from_hub_layout(tmp_path):
    torch.manual_seed(0)
    reference, ours = tiny_sam_pair()
    reference.save_pretrained(tmp_path)  # model.safetensors with vision_encoder.*, prompt encoder, mask decoder
    report = load_sam(ours, str(tmp_path))
    assert report["random_init"] == ["net_2.weight", "net_3.weight"]
    x = torch.randn(2, 3, 256, 256)  # 16x16 grid with 6x6 windows: window padding is exercised
    with torch.no_grad():
        expected = reference.vision_encoder(pixel_values=x).last_hidden_state
        assert (ours.forward_neck(x) - expected).abs().max() < 1e-4
        # other resolutions interpolate pos_embed and the global blocks' rel_pos
        assert ours(torch.randn(1, 3, 320, 320)).shape == (1, 16, 5, 5)


def test_sam_matches_transformers_from_meta_layout(tmp_path):
    torch.manual_seed(1)
    reference, ours = tiny_sam_pair()
    donor = ImageEncoderViT(ours.config)
    load_sam(donor, _save(reference, tmp_path / "hub"))
    meta_state = {f"image_encoder.{k}": v for k, v in donor.state_dict().items() if not k.startswith("net_")}
    meta_state["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 8)
    torch.save(meta_state, tmp_path / "sam_vit_b_01ec64.pth")
    load_sam(ours, str(tmp_path / "sam_vit_b_01ec64.pth"))
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert (ours.forward_neck(x) - reference.vision_encoder(pixel_values=x).last_hidden_state).abs().max() < 1e-4


def _save(model, path):
    model.save_pretrained(path)
    return str(path)


def tiny_clip_pair():
    hf = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
    ours = VitModel(CLIPConfig(hidden_size=32, num_layers=2, num_heads=2, ffn_dim=64, image_size=56, patch_size=14)).eval()
    return hf, ours


@pytest.mark.parametrize("with_prefix", [False, True])
def test_clip_matches_transformers(tmp_path, with_prefix):
    torch.manual_seed(2)
    hf, ours = tiny_clip_pair()
    if with_prefix:  # openai/clip-vit-large-patch14 is a full CLIPModel: vision_model.* plus a text tower
        full = randomize(CLIPModel(HFCLIPConfig(vision_config=hf.to_dict(), text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)))).eval()
        full.save_pretrained(tmp_path)
        reference = full.vision_model
    else:
        reference = randomize(CLIPVisionModel(hf)).eval()
        reference.save_pretrained(tmp_path)
        reference = reference.vision_model if hasattr(reference, "vision_model") else reference
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert any(k.startswith("vision_model.") for k in f.keys()) == with_prefix
    load_clip(ours, str(tmp_path))
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state  # no post_layernorm on the tokens
        grid = reference.embeddings.patch_embedding(pixels)  # the same embeddings fed to both
        assert (ours(grid) - expected).abs().max() < 1e-4


def test_clip_resizes_positions_and_keeps_cls():
    torch.manual_seed(0)
    clip = randomize(VitModel(CLIPConfig(hidden_size=16, num_layers=1, num_heads=1, ffn_dim=32)))
    pos = clip.embeddings.positions(100)
    assert pos.shape == (101, 16)
    assert torch.equal(pos[0], clip.embeddings.position_embedding.weight[0])
    assert torch.equal(clip.embeddings.positions(256), clip.embeddings.position_embedding.weight)


def tiny_encoder(seed):
    torch.manual_seed(seed)
    sam, clip = tiny_encoder_configs()
    return randomize(DeepEncoder(sam, clip, 64)).eval()


def test_deepseek_layout_round_trips(tmp_path, make_model):
    source = make_model(seed=3)
    randomize(source.encoder)
    state = {f"model.{k.replace('encoder.', '', 1)}": v for k, v in source.state_dict().items() if not k.startswith("gpt.")}
    state["model.embed_tokens.weight"] = torch.zeros(4, 4)  # the language model's tensors are skipped
    state["model.vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    save_file(state, str(tmp_path / "model-00001-of-000001.safetensors"))
    target = make_model(seed=4)
    report = load_deepseek_ocr_encoder(target, str(tmp_path))
    assert report["loaded"] == len(state) - 2
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        torch.testing.assert_close(target.encoder(x), source.encoder(x), rtol=0, atol=0)
    assert torch.equal(target.view_seperator, source.view_seperator) and torch.equal(target.image_newline, source.image_newline)
    # partial or mis-shaped sources are refused by name
    del state["model.sam_model.neck.0.weight"]
    save_file(state, str(tmp_path / "model-00001-of-000001.safetensors"))
    with pytest.raises(ValueError, match="sam_model.neck.0.weight"):
        load_deepseek_ocr_encoder(make_model(seed=5), str(tmp_path))
    wide = make_model(seed=6, n_embd=128)
    state["model.sam_model.neck.0.weight"] = source.state_dict()["encoder.sam_model.neck.0.weight"]
    save_file(state, str(tmp_path / "model-00001-of-000001.safetensors"))
    with pytest.raises(ValueError, match="projector.layers.weight.*shape|shape mismatch"):
        load_deepseek_ocr_encoder(wide, str(tmp_path))


def test_offline_hub_fails_fast_with_a_hint():
    sam = ImageEncoderViT(SAMConfig(embed_dim=16, depth=1, num_heads=1, global_attn_indexes=(0,), out_chans=8, net2_chans=8,
                                    net3_chans=8))
    t0 = time.time()
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        load_sam(sam, "facebook/sam-vit-base")
    assert time.time() - t0 < 20


def test_no_network_is_detected_once_and_fails_in_a_second(monkeypatch):
    """Without HF_HUB_OFFLINE, a hub that does not answer (here: a closed local port) is one clear error at once."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub.hub_status.cache_clear()
    try:
        t0 = time.time()
        with pytest.raises(hub.HubUnavailable, match="no network") as error:
            hub.hub_file("some/dataset", "data.zip", hint="or pass --data DIR")
        assert time.time() - t0 < 1.0
        assert "--data DIR" in str(error.value) and error.value.__cause__ is None and error.value.__suppress_context__
        assert hub.hub_status() == "unreachable"
    finally:
        hub.hub_status.cache_clear()


def test_what_each_stage_freezes_and_the_unused_patch_embedding(make_model):
    from train import TrainConfig, configure_model
    model = make_model()
    assert not model.encoder.vision_model.embeddings.patch_embedding.weight.requires_grad
    configure_model(model, TrainConfig(freeze_sam=True), torch.device("cpu"))  # stage 2
    assert not any(p.requires_grad for p in model.encoder.sam_model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters()
               if not n.startswith("encoder.sam_model.") and "patch_embedding" not in n)
    model = make_model(encoder="v2-tiny")
    configure_model(model, TrainConfig(freeze_encoder=True), torch.device("cpu"))  # DeepSeek-OCR 2's stage 3
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"gpt"}


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        encoder = tiny_encoder(7).train()
        encoder.sam_model.grad_checkpointing = checkpointing
        encoder(torch.randn(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))).square().mean().backward()
        grads.append([p.grad.clone() for p in encoder.sam_model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("H,W", [(14, 14), (36, 36), (10, 10)])  # window, a global grid past the per-head threshold, odd widths
def test_folded_sam_attention_equals_the_reference_forward_and_backward(H, W):
    """The path every device runs (the bias folded into q and k, plain SDPA) against the bias-as-mask reference: the
    same output and the same gradients for q, k, v and both relative-position tables, and the backward is
    deterministic: two runs are bitwise equal."""
    from deepencoder.sam_vary_sdpa import folded_attention, reference_attention, relative_position_terms
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 3, H * W, 16, generator=g) for _ in range(3)]
    tables = [torch.randn(2 * H - 1, 16, generator=g), torch.randn(27, 16, generator=g)]  # the second one resized
    cotangent = torch.randn(2, 3, H * W, 16, generator=g)

    def run(attention):
        leaves = [t.clone().requires_grad_() for t in inputs + tables]
        q, k, v, rel_pos_h, rel_pos_w = leaves
        rel_h, rel_w = relative_position_terms(q, rel_pos_h, rel_pos_w, H, W)
        out = attention(q, k, v, rel_h, rel_w)
        (out * cotangent).sum().backward()
        return out.detach(), [t.grad for t in leaves]
    out, grads = run(lambda q, k, v, rel_h, rel_w: folded_attention(q, k, v, rel_h, rel_w, H, W))
    ref_out, ref_grads = run(reference_attention)
    assert (out - ref_out).norm() / ref_out.norm() < 1e-5
    for grad, ref in zip(grads, ref_grads):
        assert (grad - ref).norm() / ref.norm() < 1e-5
    again, grads_again = run(lambda q, k, v, rel_h, rel_w: folded_attention(q, k, v, rel_h, rel_w, H, W))
    assert torch.equal(again, out) and all(torch.equal(a, b) for a, b in zip(grads_again, grads))


def test_compiling_the_encoder_for_every_view_count_takes_at_most_two_graphs():
    """Views come in any number (pages per batch, tiles per page): the compiled encoder must not recompile for each.
    The count is dynamo's own."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    encoder = tiny_encoder(3).eval()
    encoder.compile(backend="eager")
    with torch.no_grad():
        for n in (1, 2, 3, 5):
            encoder(torch.randn(n, 3, 512, 512))
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()
