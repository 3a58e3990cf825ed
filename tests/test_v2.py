"""DeepEncoder V2 (DeepSeek-OCR 2): sizes, the mixed mask, the causal flow of the queries, numerics equal to
transformers' deepseek_ocr2 port, slot counts, both weight layouts, and a tiny V2 model that trains, resumes and reads."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from checkpoint import list_checkpoints
from config import checkpoint_dir
from deepencoder.encoder import DeepEncoderV2, encoder_configs
from deepencoder.load_pretrained import load_deepseek_ocr2_encoder, load_qwen2, load_sam, sam_state_from_transformers
from deepencoder.qwen2_encoder import Qwen2Encoder, Qwen2EncoderConfig, mixed_mask
from deepencoder.sam_vary_sdpa import ImageEncoderViT
from engine import Engine
from image_process import DeepseekOCRProcessor, normalize, num_image_slots
from train import train
from conftest import tiny_train_config
from test_deepencoder import randomize
from test_engine import uncached_greedy

n_params = lambda module: sum(p.numel() for p in module.parameters())


def test_full_size_parameter_counts():
    sam, _, qwen2 = encoder_configs("v2")
    with torch.device("meta"):
        encoder = DeepEncoderV2(sam, qwen2, 1280)
    assert n_params(encoder.sam_model) == 94_979_328
    queries = n_params(encoder.qwen2_model.query_768) + n_params(encoder.qwen2_model.query_1024)
    assert n_params(encoder.qwen2_model) - queries == 357_898_112 and queries == 358_400
    assert n_params(encoder.projector) == 1_148_160 and n_params(encoder) == 454_384_000
    state = encoder.state_dict()
    assert state["sam_model.net_3.weight"].shape == (896, 512, 3, 3)
    assert state["qwen2_model.layers.23.self_attn.k_proj.weight"].shape == (128, 896)  # 2 KV heads of 64
    assert state["qwen2_model.layers.0.mlp.gate_proj.weight"].shape == (4864, 896)
    assert "qwen2_model.layers.0.self_attn.o_proj.bias" not in state and "qwen2_model.layers.0.self_attn.q_proj.bias" in state


def test_the_mixed_mask_cell_by_cell():
    m = 3
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:, :m] = True  # every row sees every visual token
    for i in range(m, 6):
        expected[i, m:i + 1] = True  # query i sees queries 0..i
    assert torch.equal(mixed_mask(m, "cpu"), expected)
    assert not mixed_mask(m, "cpu")[:m, m:].any()  # no visual token sees a query


def tiny_qwen2(seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize(Qwen2Encoder(Qwen2EncoderConfig(**dict(dict(n_layer=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                                                                  intermediate_size=64, query_sizes=(512,)), **kwargs))))


def test_queries_flow_causally_and_visual_states_ignore_them():
    encoder = tiny_qwen2().eval()
    grid = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        before = encoder.hidden(grid)
        j = 20
        encoder.query_512.weight[j] += 1.0
        after = encoder.hidden(grid)
    m = 64
    torch.testing.assert_close(after[:, :m], before[:, :m], rtol=0, atol=0)  # the visual tokens never see a query
    torch.testing.assert_close(after[:, m:m + j], before[:, m:m + j], rtol=0, atol=0)  # nor do the queries before j
    assert (after[:, m + j:] - before[:, m + j:]).abs().amax(-1).min() > 1e-6  # j and every query after it change
    assert encoder(grid).shape == (2, m, 32)
    with pytest.raises(ValueError, match="no query bank for 768-px views"):
        encoder(torch.randn(1, 32, 12, 12))


def test_gradients_reach_the_queries_every_layer_and_sam(make_model):
    model = make_model(encoder="v2-tiny")
    image = DeepseekOCRProcessor("v2-tiny").process_image(Image.new("RGB", (600, 500), (30, 90, 200)))
    model.encode_images([image])[0].square().sum().backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.view_seperator.grad.abs().sum() > 0


def port_pair(seed=0):
    """transformers' DeepseekOcr2Model at a tiny size with random weights, and its weights in DeepSeek-OCR 2's checkpoint
    names (model.sam_model.*, model.qwen2_model.model.model.*, model.qwen2_model.query_*, model.projector.layers.*,
    model.view_seperator)."""
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2Config
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2Model
    torch.manual_seed(seed)
    sam, _, _ = encoder_configs("v2-tiny")
    config = DeepseekOcr2Config(
        vision_config=dict(sam_config=dict(hidden_size=sam.embed_dim, num_hidden_layers=sam.depth,
                                           num_attention_heads=sam.num_heads, window_size=sam.window_size,
                                           global_attn_indexes=list(sam.global_attn_indexes),
                                           output_channels=sam.out_chans, downsample_channels=[sam.net2_chans, sam.net3_chans]),
                           encoder_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                               num_key_value_heads=1, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
        text_config=dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, mlp_layer_types=["dense"]))
    port = randomize(DeepseekOcr2Model(config)).eval()
    theirs = {}
    for key, value in port.state_dict().items():
        if key.startswith("vision_tower.sam_encoder."):
            key = key.replace("proj.conv1", "net_2").replace("proj.conv2", "net_3")
            key = "model.sam_model." + next(iter(sam_state_from_transformers(
                {key.replace("vision_tower.sam_encoder.", "vision_encoder."): 0})))
        elif key.startswith("vision_tower.vision_encoder."):
            key = key.replace("vision_tower.vision_encoder.", "model.qwen2_model.model.model.")
        elif key.startswith("vision_tower.query_"):
            key = key.replace("vision_tower.query_", "model.qwen2_model.query_").replace("_resolution", "")
        elif key.startswith("multi_modal_projector."):
            key = key.replace("multi_modal_projector.", "model.projector.layers.")
        elif key == "view_separator":
            key = "model.view_seperator"
        else:
            continue  # the language model
        theirs[key] = value
    return port, theirs


def v2_model(make_model, seed=1):
    """Our tiny V2 model with the query banks DeepSeek-OCR 2 has (768-px tiles, 1024-px global views)."""
    from nano_deepseek_ocr import NanoDeepseekOCRConfig, build_model
    model = make_model(seed=seed, encoder="v2-tiny")
    config = model.config
    config.qwen2.query_sizes = (768, 1024)
    return build_model(NanoDeepseekOCRConfig(config.sam, None, config.gpt, config.image_token_id, config.qwen2)).eval()


def test_the_v2_vision_path_equals_transformers_port(make_model, tmp_path):
    """Weights written in DeepSeek-OCR 2's layout and loaded by load_deepseek_ocr2_encoder give the port's features at
    both view sizes (the port picks its query bank by num_patches <= 144: 768 and 1024 px are what it can compare)."""
    port, theirs = port_pair()
    theirs["model.qwen2_model.model.model.embed_tokens.weight"] = torch.zeros(4, 128)  # deleted in their code: skipped
    save_file(theirs, str(tmp_path / "model-00001-of-000001.safetensors"))
    model = v2_model(make_model)
    report = load_deepseek_ocr2_encoder(model, str(tmp_path))
    assert report["loaded"] == len(theirs) - 1 and not report["random_init"]
    g = torch.Generator().manual_seed(0)
    for size in (768, 1024):
        pixels = torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)
        with torch.no_grad():
            ours = model.encoder.qwen2_model(model.encoder.sam_model(normalize(pixels)))
            expected = port.vision_tower(normalize(pixels)).last_hidden_state
        assert ours.shape == (2, (size // 64) ** 2, 128)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_a_page_with_tiles_gets_the_ports_slot_embeddings_in_its_order(make_model, tmp_path):
    """[each 768-px tile's 144 in crop order] [the global 256] [the separator], projected: equal to the port's
    get_image_features, which a plain causal mask, 640-px tiles or another order would each break."""
    port, theirs = port_pair(seed=2)
    save_file(theirs, str(tmp_path / "model.safetensors"))
    model = v2_model(make_model, seed=3)
    load_deepseek_ocr2_encoder(model, str(tmp_path / "model.safetensors"))
    rng = np.random.default_rng(0)
    page = Image.fromarray(rng.integers(0, 255, (800, 1600, 3), dtype=np.uint8))  # 1600 x 800: 2 x 1 tiles
    item = DeepseekOCRProcessor("v2").process_image(page)
    assert item.tile_grid == (2, 1) and item.tiles.shape == (2, 3, 768, 768) and item.slots == 256 + 2 * 144 + 1
    batch = DeepseekOCRProcessor("v2").process_images([page])
    with torch.no_grad():
        ours = model.encode_images([item])[0]
        expected = port.get_image_features(batch["pixel_values"], batch["images_crop"][0], [2]).pooler_output[0]
    assert ours.shape == (545, 64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,tiles,slots", [((768, 700), (1, 1), 257), ((1536, 768), (2, 1), 545),
                                              ((2304, 768), (3, 1), 689), ((1536, 1536), (2, 2), 833),
                                              ((3840, 768), (5, 1), 977), ((2304, 1536), (3, 2), 1121)])
def test_v2_slot_counts(size, tiles, slots, tokenizer):
    assert num_image_slots(*size, "v2") == slots
    item = DeepseekOCRProcessor("v2").process_image(Image.new("RGB", size, (255, 255, 255)))
    assert item.tile_grid == tiles and item.slots == slots
    assert num_image_slots(*size, "v2-base") == 257 and num_image_slots(*size, "v2-tiny") == 65
    ids = tokenizer.render_for_completion("<image>\nFree OCR.", [item.slots])
    assert ids.count(tokenizer.image_token_id) == slots


def test_qwen2_layout_round_trips_and_sam_comes_from_deepseek_ocr(tmp_path):
    source = tiny_qwen2(seed=1)
    state = {f"model.{k}": v for k, v in source.state_dict().items() if not k.startswith("query_")}
    state.update({"model.embed_tokens.weight": torch.zeros(10, 32), "lm_head.weight": torch.zeros(10, 32)})
    save_file(state, str(tmp_path / "model.safetensors"))
    target = tiny_qwen2(seed=2)
    report = load_qwen2(target, str(tmp_path / "model.safetensors"))
    assert report["loaded"] == len(state) - 2 and report["random_init"] == ["query_512.weight"]
    grid = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        target.query_512.weight.copy_(source.query_512.weight)
        torch.testing.assert_close(target(grid), source(grid), rtol=0, atol=0)
    # DeepSeek-OCR 2 starts its SAM from DeepSeek-OCR's: net_3 is 1024 wide there, 896 here, and keeps its init
    v1_sam, _, _ = encoder_configs("full")
    v2_sam, _, _ = encoder_configs("v2")
    for config in (v1_sam, v2_sam):
        config.embed_dim, config.depth, config.num_heads, config.global_attn_indexes = 16, 1, 1, (0,)
    v2_sam.net3_chans = 64
    old = randomize(ImageEncoderViT(v1_sam))
    save_file({f"model.sam_model.{k}": v for k, v in old.state_dict().items()}, str(tmp_path / "ocr1.safetensors"))
    new = ImageEncoderViT(v2_sam)
    report = load_sam(new, str(tmp_path / "ocr1.safetensors"))
    assert report["random_init"] == ["net_3.weight"] and torch.equal(new.net_2.weight, old.net_2.weight)


def test_a_tiny_v2_model_trains_resumes_and_reads_as_uncached(tokenizer_dir, tokenizer):
    v2 = dict(encoder="v2-tiny", modes="v2-tiny", synthetic_max_size=700)
    straight = train(tiny_train_config(tokenizer_dir, model_tag="v2-straight", num_iterations=4, **v2))
    train(tiny_train_config(tokenizer_dir, model_tag="v2-resumed", num_iterations=4, save_every=2, stage="v2-crash", **v2))
    run_dir = checkpoint_dir("v2-crash", "v2-resumed")
    import shutil
    shutil.rmtree(list_checkpoints(run_dir)[-1])  # the run died after its step-2 checkpoint
    resumed = train(tiny_train_config(tokenizer_dir, model_tag="v2-resumed", num_iterations=4, save_every=2,
                                      stage="v2-crash", resume=True, **v2))
    assert resumed["start_step"] == 2 and resumed["losses"] == straight["losses"][2:]
    a, b = (load_file(os.path.join(s["checkpoint"], "model.safetensors")) for s in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("image_newline" in k or "vision_model" in k for k in a)  # V2: no newlines, no CLIP
    from nano_deepseek_ocr import load_model
    model, _, meta = load_model(resumed["checkpoint"])
    assert model.encoder_version == "v2" and meta["trained_modes"] == ["v2-tiny"]
    with torch.no_grad():  # non-trivial logits for the reading check
        model.gpt.lm_head.weight.normal_(0, 0.05)
    rng = np.random.default_rng(0)
    item = DeepseekOCRProcessor("v2-tiny").process_image(Image.fromarray(rng.integers(0, 255, (500, 600, 3), dtype=np.uint8)))
    ids = tokenizer.render_for_completion("<image>\nFree OCR.", [item.slots])
    expected = uncached_greedy(model.eval(), ids, [item], 10, stops=[])
    assert Engine(model, tokenizer).generate([ids], [item], max_new_tokens=10, stop_tokens=[])[0] == expected


def test_v2_options_that_do_not_fit_are_refused(tokenizer_dir):
    from common import UserError
    for overrides, message in ((dict(encoder="v2-tiny", modes="tiny"), "tiny not for the v2 encoder; its modes are v2"),
                               (dict(modes="v2-tiny"), "v2-tiny not for the v1 encoder"),
                               (dict(encoder="v2-tiny", modes="v2-tiny", init_encoder="sam+clip"),
                                "--init_encoder=sam\\+clip is for the v1 encoder, not --encoder=v2-tiny")):
        with pytest.raises(UserError, match=message):
            train(tiny_train_config(tokenizer_dir, **overrides))


def test_v2_flops_match_a_flop_counter(monkeypatch):
    """MFU counts the V2 parts as they run: SAM, the Qwen2 stack over 2m positions, the projector."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from deepencoder import sam_vary_sdpa
    sam, _, qwen2 = encoder_configs("v2-tiny")
    encoder = DeepEncoderV2(sam, qwen2, 64)
    monkeypatch.setattr(sam_vary_sdpa, "pads_value", lambda q: False)  # the attention as CUDA runs it
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8))
    assert sum(encoder.flops(512).values()) == counter.get_total_flops()
