"""
Shared constants: resolution modes, prompts, special tokens, default paths.
Everything here is a fact other files rely on; change a value here, not at the call sites.
"""
import os

# DeepSeek-OCR's resolution modes. base_size is the global view, image_size the Gundam tile size.
# pad=True: aspect-preserving centered pad to a square; pad=False: plain resize to a square.
MODES = {
    "tiny":   dict(base_size=512,  image_size=512,  pad=False, crop=False),
    "small":  dict(base_size=640,  image_size=640,  pad=False, crop=False),
    "base":   dict(base_size=1024, image_size=1024, pad=True,  crop=False),
    "large":  dict(base_size=1280, image_size=1280, pad=True,  crop=False),
    "gundam": dict(base_size=1024, image_size=640,  pad=True,  crop=True),
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
