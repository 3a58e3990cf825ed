"""
What training measures at each eval, behind one entry point (nanochat's loss_eval / core_eval pattern): evaluate()
returns a flat dict of metrics: val_loss (the answer loss per target token), gap_blank and gap_other (how much it rises
when each page is swapped for a blank one or another page: near zero, the model does not look), encoder_similarity
(the collapse watch), heldout_cer and training_cer (greedy reading), and those per kind of page.
"""
import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import autocast_context, warn0
from dataloader import VisionDataLoader, sample_image
from engine import Engine
from image_process import DeepseekOCRProcessor, ImageError, load_image
from metrics import normalized_edit_distance
from nano_deepseek_ocr import reading_copy
from tasks.synthetic import SyntheticPages


# ---- the answer loss and the image gap -------------------------------------------------------------------------

def blank_images(images):
    """The same images with every view a white page."""
    def white(x):
        return None if x is None else torch.full_like(x, 255)
    return [dataclasses.replace(im, global_view=white(im.global_view), tiles=white(im.tiles)) for im in images]


def other_images(images):
    """Each image swapped for another of the batch with the same layout (the next one, round the group)."""
    groups = {}
    for i, im in enumerate(images):
        groups.setdefault((im.slots, im.tile_grid, im.global_view.shape), []).append(i)
    swapped = list(images)
    for members in groups.values():
        for a, b in zip(members, members[1:] + members[:1]):
            swapped[a] = images[b]
    return swapped


@torch.no_grad()
def validation_loss(model, loader, batches):
    """{val_loss, gap_blank, gap_other} over `batches` batches of the loader, summed over every rank."""
    total = torch.zeros(4, device=model.device)  # summed loss with its own, a blank and another image; targets
    autocast = autocast_context(model.device)
    for _, batch in zip(range(batches), loader):
        for k, images in enumerate((batch["images"], blank_images(batch["images"]), other_images(batch["images"]))):
            with autocast:
                total[k] += model.batch_loss(batch, images, loss_reduction="sum").float()
        total[3] += (batch["targets"] != -1).sum()
    if dist.is_initialized():
        dist.all_reduce(total)
    own, blank, other = (total[:3] / total[3].clamp(min=1)).tolist()
    return dict(val_loss=own, gap_blank=blank - own, gap_other=other - own)


# ---- the collapse watch ----------------------------------------------------------------------------------------

def collapse_watch_views(n, mode):
    """The global views of n fixed distinct synthetic pages for the collapse watch (None when n is 0: no watch). A page
    file damaged on disk is named and rendered again."""
    if n == 0:
        return None
    processor, pages, views = DeepseekOCRProcessor(mode), SyntheticPages(n, seed=12345, sizes=(768, 1024)), []
    for i in range(len(pages)):
        try:
            image = load_image(pages[i]["image_path"])
        except ImageError as e:
            warn0(f"collapse watch: {e}; rendering it again")
            image = load_image(pages.render(i)["image_path"])
        views.append(processor.process_image(image).global_view)
    return torch.stack(views)


@torch.no_grad()
def encoder_similarity(model, views):
    """Mean pairwise cosine similarity of the encoder outputs of distinct images: near 1, every page looks alike."""
    with autocast_context(model.device):
        features = model.encoder(views.to(model.device)).flatten(1).float()
    sim = F.normalize(features, dim=-1) @ F.normalize(features, dim=-1).T
    n = sim.size(0)
    return ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()


# ---- reading pages ---------------------------------------------------------------------------------------------

def read_pages(model, tokenizer, task, n, mode, max_tokens):
    """Greedy-read the first n vision samples of a task: [(expected, read, kind of page)]. A sample whose image cannot
    be read is reported and passed over."""
    pages = []
    for i in range(len(task)):
        if len(pages) == n:
            break
        sample = task[i]
        if "messages" in sample:
            continue
        try:
            pages.append((i, sample_image(sample), sample["text"], sample["response"], sample.get("kind", "")))
        except ImageError as e:
            warn0(f"  sample {i}: skipped, {e}")
    # reading past twice the longest answer only adds errors: a cap keeps an untrained model's eval short
    max_tokens = min(max_tokens, 2 * max([len(tokenizer.encode(p[3])) for p in pages] + [0]) + 8)
    read = dict(Engine(model, tokenizer).read_iter([p[:3] for p in pages], mode, max_tokens))
    return [(expected, read[i], kind) for i, _, _, expected, kind in pages]


def character_error_rate(pages):
    return sum(normalized_edit_distance(read, expected) for expected, read, _ in pages) / max(1, len(pages))


def reading_metrics(heldout, training):
    """heldout_cer, training_cer and cer_pages, and the same per kind of page when there are several kinds."""
    metrics = dict(heldout_cer=character_error_rate(heldout), training_cer=character_error_rate(training),
                   cer_pages=len(heldout))
    kinds = sorted({k for _, _, k in heldout})
    for kind in kinds if len(kinds) > 1 else []:
        mine = [p for p in heldout if p[2] == kind]
        metrics.update({f"heldout_cer/{kind}": character_error_rate(mine), f"cer_pages/{kind}": len(mine),
                        f"training_cer/{kind}": character_error_rate([p for p in training if p[2] == kind])})
    return metrics


# ---- the entry point -------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, val_task, train_task, modes, *, batch_size, seq_len, batches, cer_pages, max_tokens,
             collapse_views=None, rank=0, world_size=1):
    """
    The metrics above -> (flat dict, held-out pages read: [(expected, read, kind)]). Every rank computes the loss
    and the gap on its shard of the validation batches, and the collapse watch (NaN without views); rank 0 alone
    reads cer_pages pages of each task, in the first mode, through reading_copy.
    """
    model.eval()
    loader = VisionDataLoader(val_task, tokenizer, modes, batch_size, seq_len, rank, world_size, seed=0,
                              num_workers=0, shuffle=False)
    metrics = validation_loss(model, loader, batches)
    no_watch = collapse_views is None
    metrics["encoder_similarity"] = float("nan") if no_watch else encoder_similarity(model, collapse_views)
    heldout = []
    if rank == 0 and cer_pages > 0:
        reader = reading_copy(model)
        heldout = read_pages(reader, tokenizer, val_task, cer_pages, modes[0], max_tokens)
        training = read_pages(reader, tokenizer, train_task, cer_pages, modes[0], max_tokens)
        metrics.update(reading_metrics(heldout, training))
    model.train()
    return metrics, heldout
