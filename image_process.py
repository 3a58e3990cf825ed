"""
DeepseekOCRProcessor: images -> normalised pixel tensors for one of the five modes, and the number of
<image> slots each image takes in the token sequence. num_image_slots() is the one place that count is
computed; the tokenizer, the data loader, the model checks and the tests all go through it.
"""
import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from config import (MODES, PATCH_SIZE, COMPRESSION, PAD_COLOR, IMAGE_MEAN, IMAGE_STD, MIN_CROPS, MAX_CROPS,
                    MAX_IMAGE_PIXELS)

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # Pillow's own bomb check (89.5M by default) uses our limit too


class ImageError(ValueError):
    """An image that cannot be used, with the file and the reason in the message."""


def query_grid(size):
    """Side of the feature grid for an S x S view: SAM's 16 px patches, then 4x fewer per side from net_2/net_3."""
    return size // PATCH_SIZE // COMPRESSION


def candidate_grids(min_crops=MIN_CROPS, max_crops=MAX_CROPS):
    """Tile grids (i, j) with min_crops <= i*j <= max_crops, ordered by tile count (DeepSeek-OCR's order)."""
    grids = {(i, j) for n in range(min_crops, max_crops + 1)
             for i in range(1, n + 1) for j in range(1, n + 1) if min_crops <= i * j <= max_crops}
    return sorted(grids, key=lambda g: g[0] * g[1])


def tile_grid(width, height, mode="gundam", min_crops=MIN_CROPS, max_crops=MAX_CROPS):
    """
    (nW, nH) tiles for an image, (1, 1) meaning "not tiled". InternVL/DeepSeek rule: the grid whose ratio
    i/j is closest to w/h; on a tie the later grid wins when the image area exceeds half the grid's area.
    Only crop modes tile, and only images larger than one tile on some side.
    """
    spec = MODES[mode]
    tile = spec["image_size"]
    if not spec["crop"] or (width <= tile and height <= tile):
        return (1, 1)
    if min_crops < 2:
        raise ValueError("min_crops must be >= 2: a 1x1 grid means 'not tiled'")
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for grid in candidate_grids(min_crops, max_crops):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * grid[0] * grid[1]:
            best = grid
    return best


def slot_count(global_q, tiles=(1, 1), tile_q=0, newlines=True):
    """Slots for a q x q global grid, the tiles if any, and the separator; with newlines (encoder v1) a newline after
    each row of the global grid and of the stitched tiles."""
    n = global_q * (global_q + newlines)
    if tiles != (1, 1):
        n_w, n_h = tiles
        n += (tile_q * n_w + newlines) * (tile_q * n_h)
    return n + 1


def vision_features(mode):
    """Vision features of a mode's global view, the paper's "vision tokens": q*q (Tiny 64, Small 100, Base 256,
    Large 400)."""
    return query_grid(MODES[mode]["base_size"]) ** 2


def num_image_slots(width, height, mode="base", min_crops=MIN_CROPS, max_crops=MAX_CROPS):
    """<image> slots an image of this size takes in `mode`: Tiny 73, Small 111, Base 273, Large 421, Gundam 273 +
    tiles; v2 257 + 144 per tile (545 to 1121), v2-base 257, v2-tiny 65."""
    spec = MODES[mode]
    tiles = tile_grid(width, height, mode, min_crops, max_crops)
    return slot_count(query_grid(spec["base_size"]), tiles, query_grid(spec["image_size"]), spec["encoder"] == "v1")


def max_image_slots(mode, min_crops=MIN_CROPS, max_crops=MAX_CROPS):
    """The most <image> slots any one image takes in `mode` (a crop mode: its largest tile grid), to size caches
    once."""
    spec = MODES[mode]
    grids = candidate_grids(min_crops, max_crops) if spec["crop"] else [(1, 1)]
    return max(slot_count(query_grid(spec["base_size"]), grid, query_grid(spec["image_size"]),
                          spec["encoder"] == "v1") for grid in grids)


def to_rgb(image, name="<image>"):
    """Any PIL mode -> RGB: 16-bit and float are rescaled (not clipped), transparency is put on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            a = a / 65535.0 * 255.0
        elif a.size and a.max() > 255:  # 32-bit int or float with a wide range: stretch to 8 bits
            a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255.0
        image = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageError(f"{name}: cannot convert mode {image.mode} to RGB ({e})") from e
    return image


def check_size(image, name):
    """Refuse empty images and decompression bombs from the header, before any pixel is decoded."""
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{name}: empty image ({image.width}x{image.height})")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: {image.width}x{image.height} pixels exceeds the {MAX_IMAGE_PIXELS:,} limit "
                         "(decompression bomb?)")


def upright_rgb(image, name):
    """Decode (if not yet), apply the EXIF orientation, convert to RGB; a file that fails to decode is named as such."""
    try:
        image.load()
    except Exception as e:  # truncated data, bad headers...
        raise ImageError(f"{name}: cannot read image ({type(e).__name__}: {e})") from e
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as e:
        raise ImageError(f"{name}: bad EXIF data ({e})") from e
    return to_rgb(image, name)


def load_image(source, name=None, frame=0):
    """Open, check and decode an image file (a path, or the file's bytes) into an RGB PIL image, its `frame`-th frame
    for a multi-page file; any problem raises ImageError naming the file."""
    name = name or (source if isinstance(source, str) else "<image>")
    if isinstance(source, str) and not os.path.exists(source):
        raise ImageError(f"{source}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source if isinstance(source, str) else io.BytesIO(source))
            image.seek(frame)
            check_size(image, name)
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused as a decompression bomb ({e})") from e
    except Exception as e:  # UnidentifiedImageError, truncated data, bad headers...
        raise ImageError(f"{name}: cannot read image ({type(e).__name__}: {e})") from e
    return upright_rgb(image, f"{name} page {frame + 1}" if frame else name)


def frame_count(path):
    """How many frames (pages) an image file holds: a multi-page TIFF or an animated GIF has several. A file that
    cannot be opened counts 1: loading it names the problem."""
    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1)
    except Exception:
        return 1


def prepare_image(image, name=None):
    """Size checks, EXIF orientation and RGB conversion, for PIL images opened elsewhere."""
    name = name or getattr(image, "filename", "") or "<image>"
    check_size(image, name)
    return upright_rgb(image, name)


def pixels(image):
    """RGB PIL -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())


def normalize(pixel_values):
    """uint8 pixels (..., 3, H, W), on any device -> float in [-1, 1] (mean 0.5, std 0.5): the one normalisation."""
    mean = torch.tensor(IMAGE_MEAN, device=pixel_values.device)[:, None, None]
    std = torch.tensor(IMAGE_STD, device=pixel_values.device)[:, None, None]
    # in place on a copy of its own: a batch of views is large (4x faster than three new tensors)
    return pixel_values.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)


@dataclass
class ProcessedImage:
    """One image as the model takes it. Pixels stay uint8 until the encoder normalises them (4x less to move from
    loader workers to the GPU)."""
    global_view: torch.Tensor  # (3, S, S)
    tiles: torch.Tensor | None  # (nW * nH, 3, s, s), row-major; None when not tiled
    tile_grid: tuple           # (nW, nH), width first; (1, 1): not tiled
    slots: int                 # the <image> slots it takes in the token sequence (num_image_slots)

    def views(self):
        """What the encoder sees: ("global", (3, S, S)), then ("tiles", (3, s, s)) for each tile."""
        yield "global", self.global_view
        if self.tiles is not None:
            for tile in self.tiles:
                yield "tiles", tile


class DeepseekOCRProcessor:
    def __init__(self, mode="base", min_crops=MIN_CROPS, max_crops=MAX_CROPS):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {list(MODES)}")
        self.mode, self.min_crops, self.max_crops = mode, min_crops, max_crops
        self.spec = MODES[mode]

    def global_view(self, image):
        size = self.spec["base_size"]
        if self.spec["pad"]:
            return ImageOps.pad(image, (size, size), color=PAD_COLOR)
        return image.resize((size, size), Image.BICUBIC)

    def process_image(self, image):
        """One image (any PIL mode) -> ProcessedImage."""
        image = prepare_image(image)
        grid = tile_grid(image.width, image.height, self.mode, self.min_crops, self.max_crops)
        tiles = None
        if grid != (1, 1):
            tile = self.spec["image_size"]
            n_w, n_h = grid
            resized = image.resize((tile * n_w, tile * n_h), Image.BICUBIC)
            tiles = torch.stack([pixels(resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)))
                                 for r in range(n_h) for c in range(n_w)])  # row-major
        slots = num_image_slots(image.width, image.height, self.mode, self.min_crops, self.max_crops)
        return ProcessedImage(pixels(self.global_view(image)), tiles, grid, slots)

    def process_images(self, images):
        """PIL images -> DeepSeek-OCR's processor output, with its key names and normalised pixels, for comparing with
        its code: pixel_values (N, 3, S, S), images_crop (N, most tiles, 3, s, s) zero-padded or None,
        images_spatial_crop (N, 2), num_image_tokens [slots]."""
        items = [self.process_image(im) for im in images]
        images_crop = None
        if any(it.tiles is not None for it in items):
            most = max(it.tiles.size(0) for it in items if it.tiles is not None)
            tile = self.spec["image_size"]
            images_crop = torch.zeros(len(items), most, 3, tile, tile)
            for i, it in enumerate(items):
                if it.tiles is not None:
                    images_crop[i, :it.tiles.size(0)] = normalize(it.tiles)
        return dict(pixel_values=normalize(torch.stack([it.global_view for it in items])), images_crop=images_crop,
                    images_spatial_crop=torch.tensor([it.tile_grid for it in items]),
                    num_image_tokens=[it.slots for it in items])
