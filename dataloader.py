"""
Vision-aware batching, packed. An image and its text are one atomic sample; whole samples are packed into rows of
seq_len tokens (next-fit: a sample that does not fit starts the next row), every token tagged with its sample
(doc_ids, -1 on padding) and its position within it, so attention stays inside a sample (a document mask) and
rotary positions restart. A batch is batch_size rows: its size is counted in tokens. Targets are -1 at image
slots, prompts and padding. Each rank reads a disjoint shard of a per-epoch permutation; images decode in worker
processes and travel as uint8 ProcessedImages (the encoder normalises them); bad samples are skipped, counted and named;
state_dict() resumes exactly where it stopped.
"""
from collections import Counter

import numpy as np
import torch

from image_process import DeepseekOCRProcessor, ImageError, load_image, prepare_image
from tokenizer import ImageBlockTooLong


def sample_image(sample):
    """A vision sample's image: made in memory (synthetic reading pages) or read from its file."""
    return prepare_image(sample["image"]) if "image" in sample else load_image(sample["image_path"])


def render_sample(sample, tokenizer, processor, max_tokens):
    """One task sample -> dict(ids, mask, images), or dict(skip=reason). mask=1 on the targets: the response (and
    its stop token) of a vision sample, what the assistant says in a conversation."""
    if "messages" in sample:
        ids, mask = tokenizer.render_conversation(sample, max_tokens)
        return dict(ids=ids, mask=mask, images=[])
    name = sample.get("image_path", "<page made in memory>")
    response = sample.get("response")
    if not isinstance(response, str) or not response.strip():
        return dict(skip="empty response", detail=f"{name}: empty response")
    try:
        image = processor.process_image(sample_image(sample))
    except ImageError as e:
        return dict(skip="missing image" if "no such file" in str(e) else "unreadable image", detail=str(e))
    try:
        ids, mask = tokenizer.render_vision_sample(sample["text"], response, [image.slots], max_tokens)
    except ImageBlockTooLong as e:
        return dict(skip="image does not fit seq_len", detail=f"{name}: {e}")
    return dict(ids=ids, mask=mask, images=[image])


class SampleDataset(torch.utils.data.Dataset):
    """Map-style view of a task that renders samples (image decode + preprocessing + tokenization), in workers."""
    def __init__(self, task, tokenizer, modes, max_tokens):
        self.task, self.tokenizer, self.max_tokens = task, tokenizer, max_tokens
        self.processors = [DeepseekOCRProcessor(m) for m in modes]

    def __len__(self):
        return len(self.task)

    def __getitem__(self, index):
        processor = self.processors[index % len(self.processors)]  # several modes: a fixed mode per sample
        try:
            return render_sample(self.task[index], self.tokenizer, processor, self.max_tokens)
        except Exception as e:  # a malformed sample must not stop the run
            return dict(skip="malformed sample", detail=f"sample {index}: {type(e).__name__}: {e}")


def pack(samples, rows, seq_len, pad_id):
    """Rendered samples (in order, each at most seq_len + 1 ids) -> a batch of `rows` rows, next-fit. inputs =
    ids[:-1] and targets = ids[1:] (-1 where the mask is 0) of each sample, side by side; images in slot order."""
    inputs = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((rows, seq_len), -1, dtype=torch.long)
    doc_ids = torch.full((rows, seq_len), -1, dtype=torch.long)
    positions = torch.zeros(rows, seq_len, dtype=torch.long)
    row, used, lengths, images = 0, 0, [], []
    for doc, sample in enumerate(samples):
        ids, mask = torch.tensor(sample["ids"]), torch.tensor(sample["mask"], dtype=torch.bool)
        n = ids.numel() - 1
        if used + n > seq_len:
            row, used = row + 1, 0
        assert row < rows and n <= seq_len, "pack() got more samples than its rows hold"
        inputs[row, used:used + n] = ids[:-1]
        targets[row, used:used + n] = torch.where(mask[1:], ids[1:], -1)
        doc_ids[row, used:used + n] = doc
        positions[row, used:used + n] = torch.arange(n)
        used += n
        lengths.append(n)
        images += sample["images"]
    return dict(input_ids=inputs, targets=targets, doc_ids=doc_ids, positions=positions, doc_lengths=lengths,
                images=images)


def identity(item):
    return item


class VisionDataLoader:
    """
    Infinite iterator of packed batches for one rank. Epoch e visits a permutation of the task seeded by (seed, e),
    trimmed so every rank gets as many samples; rank r takes every world_size-th one; epochs follow each other
    without a break. state_dict() holds the position of the first sample not yet in a handed-out batch, so a
    restored loader packs the very same batches from there.
    """
    def __init__(self, task, tokenizer, modes=("base",), batch_size=4, seq_len=4096, rank=0, world_size=1, seed=0,
                 num_workers=0, shuffle=True):
        self.modes = [modes] if isinstance(modes, str) else list(modes)
        self.dataset = SampleDataset(task, tokenizer, self.modes, seq_len + 1)
        self.pad_id = tokenizer.get_bos_token_id()
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.num_workers, self.shuffle = seed, num_workers, shuffle
        self.epoch, self.position = 0, 0
        self.skipped = Counter()
        if len(task) < world_size:
            raise ValueError(f"{len(task)} samples cannot give each of {world_size} rank(s) one")

    def epoch_order(self, epoch):
        """This rank's sample indices for one epoch."""
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[:n // self.world_size * self.world_size][self.rank::self.world_size].tolist()

    def order(self):
        """(epoch, position, sample index) from the current state on, epoch after epoch."""
        epoch, start = self.epoch, self.position
        while True:
            for position, index in enumerate(self.epoch_order(epoch)[start:], start):
                yield epoch, position, index
            epoch, start = epoch + 1, 0

    def state_dict(self):
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, skipped=dict(self.skipped))

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]
        self.seed, self.skipped = state["seed"], Counter(state["skipped"])

    def __iter__(self):
        loader = torch.utils.data.DataLoader(
            self.dataset, sampler=(index for _, _, index in self.order()), batch_size=None, collate_fn=identity,
            num_workers=self.num_workers, prefetch_factor=8 if self.num_workers else None)
        samples, details, rows, used, since_good = [], [], 1, 0, 0
        for (epoch, position, _), sample in zip(self.order(), loader):  # workers run ahead of the packing
            if "skip" in sample:
                self.skipped[sample["skip"]] += 1
                details.append(sample["detail"])
                since_good += 1
                if since_good > len(self.dataset):
                    raise RuntimeError(f"no usable sample in a whole epoch of {len(self.dataset)}: {details[-1]}")
                continue
            since_good = 0
            n = len(sample["ids"]) - 1
            if used + n > self.seq_len:
                rows, used = rows + 1, 0
            if rows > self.batch_size:  # this sample opens the next batch: hand out the full one
                self.epoch, self.position = epoch, position
                yield dict(pack(samples, self.batch_size, self.seq_len, self.pad_id), skip_details=details)
                samples, details, rows, used = [], [], 1, 0
            samples.append(sample)
            used += n
