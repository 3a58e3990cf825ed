"""
Vision-aware batching. An image and its text are one atomic sample, so batches are whole samples padded
to the longest (or to seq_len, for torch.compile), not nanochat's packed token stream. Targets are -1 at
image slots and padding. Each rank reads a disjoint shard of a per-epoch permutation; images decode in
worker processes; bad samples are skipped and counted; state_dict() resumes exactly where it stopped.
"""
from collections import Counter
from functools import partial

import numpy as np
import torch

from image_process import DeepseekOCRProcessor, ImageError, load_image
from tokenizer import ImageBlockTooLong


def render_sample(sample, tokenizer, processor, max_tokens):
    """One task sample -> dict(ids, mask, images), or dict(skip=reason). mask=0 where a token is not a target."""
    if "messages" in sample:
        ids, mask = tokenizer.render_conversation(sample, max_tokens)
        return dict(ids=ids, mask=mask, images=[])
    response = sample.get("response")
    if not isinstance(response, str) or not response.strip():
        return dict(skip="empty response")
    try:
        image = processor.process_image(load_image(sample["image_path"]))
    except ImageError as e:
        return dict(skip="missing image" if "no such file" in str(e) else "unreadable image", detail=str(e))
    try:
        ids, positions = tokenizer.render_vision_pretraining(sample["text"], max_tokens, [image["num_image_tokens"]], response=response)
    except ImageBlockTooLong as e:
        return dict(skip="image does not fit seq_len", detail=str(e))
    mask = np.ones(len(ids), dtype=np.int8)
    mask[positions] = 0
    return dict(ids=ids, mask=mask.tolist(), images=[image])


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
            return dict(skip="malformed sample", detail=f"{type(e).__name__}: {e}")


def collate(items, pad_id, pad_to=None):
    """Right-pad to the longest sample (or to pad_to). inputs = ids[:-1], targets = ids[1:] with -1 where mask is 0."""
    good = [it for it in items if "skip" not in it]
    skipped = Counter(it["skip"] for it in items if "skip" in it)
    details = [it["detail"] for it in items if "detail" in it]
    if not good:  # every sample was bad: one row with no targets keeps all ranks stepping together
        good = [dict(ids=[pad_id, pad_id], mask=[0, 0], images=[])]
    T = pad_to or max(len(it["ids"]) - 1 for it in good)
    inputs = torch.full((len(good), T), pad_id, dtype=torch.long)
    targets = torch.full((len(good), T), -1, dtype=torch.long)
    for b, it in enumerate(good):
        ids = torch.tensor(it["ids"][:T + 1])
        mask = torch.tensor(it["mask"][:T + 1], dtype=torch.bool)
        n = ids.numel() - 1
        inputs[b, :n] = ids[:-1]
        targets[b, :n] = torch.where(mask[1:], ids[1:], -1)
    images = [image for it in good for image in it["images"]]
    return dict(input_ids=inputs, targets=targets, images=images, skipped=skipped, skip_details=details)


class VisionDataLoader:
    """
    Infinite iterator of batches for one rank. Epoch e visits a permutation of the task seeded by (seed, e),
    trimmed so every rank gets the same number of full batches; rank r takes every world_size-th sample.
    state_dict() counts the batches handed out, so a restored loader continues with the next one.
    """
    def __init__(self, task, tokenizer, modes=("base",), batch_size=4, seq_len=4096, rank=0, world_size=1, seed=0,
                 num_workers=0, pad_to_seq_len=False, shuffle=True):
        self.modes = [modes] if isinstance(modes, str) else list(modes)
        self.dataset = SampleDataset(task, tokenizer, self.modes, seq_len + 1)
        self.pad_id = tokenizer.get_bos_token_id()
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.num_workers, self.pad_to_seq_len, self.shuffle = seed, num_workers, pad_to_seq_len, shuffle
        self.epoch, self.batch_in_epoch = 0, 0
        self.skipped = Counter()
        if self.batches_per_epoch() == 0:
            raise ValueError(f"{len(task)} samples cannot fill one batch of {batch_size} on each of {world_size} rank(s)")

    def batches_per_epoch(self):
        return len(self.dataset) // (self.batch_size * self.world_size)

    def epoch_batches(self, epoch):
        """This rank's batches of sample indices for one epoch."""
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        mine = order[:self.batches_per_epoch() * self.batch_size * self.world_size][self.rank::self.world_size]
        return [mine[i:i + self.batch_size].tolist() for i in range(0, len(mine), self.batch_size)]

    def state_dict(self):
        return dict(epoch=self.epoch, batch_in_epoch=self.batch_in_epoch, seed=self.seed, skipped=dict(self.skipped))

    def load_state_dict(self, state):
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.seed, self.skipped = state["seed"], Counter(state["skipped"])

    def order(self):
        """Batches of indices from the current position on, epoch after epoch (one worker pool for the whole run)."""
        epoch, start = self.epoch, self.batch_in_epoch
        while True:
            yield from self.epoch_batches(epoch)[start:]
            epoch, start = epoch + 1, 0

    def __iter__(self):
        pad_to = self.seq_len if self.pad_to_seq_len else None
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.order(), num_workers=self.num_workers,
            collate_fn=partial(collate, pad_id=self.pad_id, pad_to=pad_to),
            prefetch_factor=4 if self.num_workers else None, pin_memory=torch.cuda.is_available())
        for batch in loader:  # workers run ahead; the state counts only the batches handed out
            self.batch_in_epoch += 1
            if self.batch_in_epoch == self.batches_per_epoch():
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.skipped.update(batch["skipped"])
            yield batch
