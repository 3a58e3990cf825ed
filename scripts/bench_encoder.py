"""
Our SAM-ViT-B and CLIP-L/14 against transformers' SamVisionModel / CLIPVisionModel (--v2: SAM and DeepEncoder V2's
Qwen2 stack against the deepseek_ocr2 port's DeepseekOcr2VisionEncoder): the same (random) weights, the same input,
forward only, fp32 on the CPU (and bf16 on CUDA when present). Prints time and peak-memory ratios (ours /
transformers; below 1 is better). Each measurement runs in its own process so the memory high-water marks do not mix.

  python -m scripts.bench_encoder [--size 1024] [--repeats 2] [--device cpu|cuda] [--v2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


# glibc: tensors above 64 KiB get their own mmap, returned to the OS when freed, so RSS follows live tensors
MALLOC_ENV = dict(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")


def peak_rss_reset():
    """Linux: writing 5 to clear_refs resets VmHWM, so the next read is the peak of what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def build(which, impl, size, device):
    """-> (module, input). Ours loads the transformers model's weights through our loaders, so both hold the same."""
    from transformers import SamVisionConfig, SamVisionModel, CLIPVisionConfig, CLIPVisionModel
    from deepencoder.load_pretrained import load_sam, load_clip
    from deepencoder.sam_vary_sdpa import build_sam_vit_b
    from deepencoder.clip_sdpa import build_clip_l
    torch.manual_seed(0)
    if which == "qwen2":  # its tokens and queries of one view size, through the 24 layers
        from safetensors.torch import save_file
        from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2VisionEncoderConfig
        from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2VisionEncoder
        from deepencoder.load_pretrained import load_qwen2
        from deepencoder.qwen2_encoder import Qwen2Encoder, Qwen2EncoderConfig
        c, q, batch = Qwen2EncoderConfig(), size // 64, 2
        reference = DeepseekOcr2VisionEncoder(DeepseekOcr2VisionEncoderConfig(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer,
            num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
            rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta)))
        if impl == "transformers":
            return (lambda t: reference(inputs_embeds=t, num_patches=q * q).last_hidden_state), reference, \
                torch.randn(batch, 2 * q * q, c.hidden_size)
        ours = Qwen2Encoder(c)
        with tempfile.TemporaryDirectory() as d:  # in Qwen2-0.5B's layout, through our loader
            save_file({f"model.{k}": v.contiguous() for k, v in reference.state_dict().items()},
                      os.path.join(d, "model.safetensors"))
            load_qwen2(ours, d)
        return ours, ours, torch.randn(batch, c.hidden_size, q, q)
    if which == "sam":
        reference = SamVisionModel(SamVisionConfig())  # ViT-B: 768 wide, 12 blocks, window 14, global 2/5/8/11
        x = torch.randn(1, 3, size, size)
        if impl == "transformers":
            return (lambda t: reference(pixel_values=t).last_hidden_state), reference, x
        ours = build_sam_vit_b()
        with tempfile.TemporaryDirectory() as d:
            reference.save_pretrained(d)
            load_sam(ours, d)
        return ours.forward_neck, ours, x
    reference = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                 num_attention_heads=16, image_size=224, patch_size=14))
    grid = size // 64  # the compressed SAM grid DeepSeek-OCR feeds CLIP: 16x16 at 1024 px
    batch = 8  # CLIP sees few tokens per view: a batch of views makes its activations measurable
    if impl == "transformers":  # same token count for transformers: a (14*grid)-px image through its patch embedding
        return (lambda t: reference(pixel_values=t, interpolate_pos_encoding=True).last_hidden_state), reference, \
            torch.randn(batch, 3, 14 * grid, 14 * grid)
    ours = build_clip_l()
    with tempfile.TemporaryDirectory() as d:
        reference.save_pretrained(d)
        load_clip(ours, d)
    return ours, ours, torch.randn(batch, 1024, grid, grid)


def worker(which, impl, size, device, repeats):
    fn, module, x = build(which, impl, size, device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    module.to(device, dtype).eval()
    x = x.to(device, dtype)
    with torch.no_grad():
        fn(x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            peak_rss_reset()
        before = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    print(json.dumps(dict(seconds=min(times), peak_mib=peak - before)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024, help="view size in pixels")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--v2", action="store_true", help="SAM and DeepEncoder V2's Qwen2 stack instead of SAM and CLIP")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.size, args.device, args.repeats)
    precision = "bf16" if args.device == "cuda" else "fp32"
    print(f"{args.device}, {args.size} px, {precision}, {torch.get_num_threads()} threads")
    print(f"{'model':<6} {'ours s':>9} {'theirs s':>9} {'time ratio':>11} {'ours MiB':>9} {'theirs MiB':>11} "
          f"{'mem ratio':>10}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for which in ("sam", "qwen2" if args.v2 else "clip"):
        r = {}
        for impl in ("ours", "transformers"):
            out = subprocess.run([sys.executable, "-m", "scripts.bench_encoder", "--worker", which, impl,
                                  f"--size={args.size}", f"--repeats={args.repeats}", f"--device={args.device}"],
                                 cwd=root, capture_output=True, text=True,
                                 env=dict(os.environ, **MALLOC_ENV))
            if out.returncode:
                raise SystemExit(out.stderr)
            r[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        o, t = r["ours"], r["transformers"]
        print(f"{which:<6} {o['seconds']:>9.3f} {t['seconds']:>9.3f} {o['seconds'] / t['seconds']:>11.2f} "
              f"{o['peak_mib']:>9.0f} {t['peak_mib']:>11.0f} {o['peak_mib'] / max(t['peak_mib'], 1e-9):>10.2f}")


if __name__ == "__main__":
    main()
