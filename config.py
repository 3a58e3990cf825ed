"""
Shared constants: resolution modes, prompts, special tokens, default paths.
Everything here is a fact other files rely on; change a value here, not at the call sites.
"""
import os

# Resolution modes: DeepSeek-OCR's (encoder v1) and DeepSeek-OCR 2's (v2: its one mode, the same without tiles, and a
# 512-px one for the CPU demo). base_size is the global view, image_size the tile size; pad=True: aspect-preserving
# centered pad to a square, pad=False: plain resize to a square; crop: tiles when the image is larger than one.
MODES = {
    "tiny":    dict(base_size=512,  image_size=512,  pad=False, crop=False, encoder="v1"),
    "small":   dict(base_size=640,  image_size=640,  pad=False, crop=False, encoder="v1"),
    "base":    dict(base_size=1024, image_size=1024, pad=True,  crop=False, encoder="v1"),
    "large":   dict(base_size=1280, image_size=1280, pad=True,  crop=False, encoder="v1"),
    "gundam":  dict(base_size=1024, image_size=640,  pad=True,  crop=True,  encoder="v1"),
    "v2":      dict(base_size=1024, image_size=768,  pad=True,  crop=True,  encoder="v2"),
    "v2-base": dict(base_size=1024, image_size=1024, pad=True,  crop=False, encoder="v2"),
    "v2-tiny": dict(base_size=512,  image_size=512,  pad=False, crop=False, encoder="v2"),
}
PATCH_SIZE = 16          # SAM patch size
COMPRESSION = 4          # net_2 and net_3 each halve the SAM grid: 16x fewer tokens
PAD_COLOR = (127, 127, 127)
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
MIN_CROPS, MAX_CROPS = 2, 6   # Gundam tiling range (DeepSeek-OCR allows up to 9)
MAX_IMAGE_PIXELS = 100_000_000  # refuse decompression bombs beyond this

# DeepSeek-OCR's prompts, used where they fit the data.
FREE_OCR = "Free OCR."
DOC_TO_MARKDOWN = "<|grounding|>Convert the document to markdown."
MARKDOWN_NO_GROUNDING = "Convert the document to markdown."
PARSE_FIGURE = "Parse the figure."
FORMULA_TO_LATEX = "Convert this formula to LaTeX."

# nanochat's special tokens, then the ones vision adds (appended, so nanochat ids stay put).
SPECIAL_TOKENS = [
    "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
]
IMAGE_TOKEN = "<image>"
GROUNDING_TOKENS = ["<|grounding|>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>"]
VISION_TOKENS = [IMAGE_TOKEN] + GROUNDING_TOKENS
STOP_TOKEN = "<|assistant_end|>"


def image_prompt(prompt):
    """A vision sample's text: its image, a newline, the prompt (DeepSeek-OCR's layout). A prompt that places its
    <image> itself is kept as it is."""
    return prompt if IMAGE_TOKEN in prompt else f"{IMAGE_TOKEN}\n{prompt}"


def base_dir(*parts):
    """Everything downloaded, prepared or trained lives under one directory (like NANOCHAT_BASE_DIR)."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "nano_deepseek_ocr")
    root = os.environ.get("NANO_DEEPSEEK_OCR_DIR") or default
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def tokenizer_dir():
    return base_dir("tokenizer")


def data_dir(name):
    return base_dir("data", name)


def checkpoint_dir(stage, run):
    return base_dir("checkpoints", stage, run)
