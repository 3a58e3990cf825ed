"""
nanochat's Task pattern: a task is an indexable list of samples; VisionTaskMixture combines them by weight.
Vision sample: {"text": "<image>\\n<prompt>", "response": str, "image_path": str}
Text sample:   {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
"""
import copy
import math
import os
from collections import Counter

import numpy as np

from dataset import check_local_copy, load_local_dataset, read_jsonl, prepare_samples
from hub import load_hf_dataset, hub_file, hub_list_files

HINT = "or pass a local copy of the dataset repository (scripts.prepare_data --source NAME=DIR)"


class Task:
    """A lazily indexed view [start:stop:step] over a dataset's examples."""
    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0 and step >= 1 and (stop is None or stop >= start)
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a task of {len(self)}")
        return self.get_example(self.start + index * self.step)

    def shard(self, rank, world_size):
        """Every world_size-th example starting at rank: disjoint across ranks, together the whole task."""
        view = copy.copy(self)
        view.start, view.step = self.start + rank * self.step, self.step * world_size
        return view


class JsonlTask(Task):
    """A prepared dataset (see dataset.prepare_samples): samples.jsonl with images on disk."""
    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.samples = read_jsonl(path)

    def num_examples(self):
        return len(self.samples)

    def get_example(self, index):
        return self.samples[index]


class PreparedTask(JsonlTask):
    """
    A real dataset: rows streamed from the hub (or from `source`, a local copy of the hub repository), turned into
    samples by to_sample(row, index, image_dir) once, cached as samples.jsonl + images on disk. Subclasses set
    name / hf_id (/ config_name) and write to_sample, which may count what it changed in self.tally; those not
    on `datasets` override rows().
    """
    name = hf_id = config_name = None
    val_split = None  # the dataset's validation split name; None = hold out part of train

    def __init__(self, split="train", max_samples=None, source=None, **kwargs):
        if source is not None:
            check_local_copy(source, self.name)
        self.source = source or self.hf_id
        self.tally = Counter()
        key = f"{self.name}-{split}" + (f"-{max_samples}" if max_samples else "")
        super().__init__(prepare_samples(key, lambda: self.rows(split), self.to_sample, max_samples, tally=self.tally),
                         **kwargs)

    def local(self):
        return os.path.isdir(self.source)

    def rows(self, split):
        if self.local():
            return load_local_dataset(self.source, self.config_name, split)
        return load_hf_dataset(self.source, self.config_name, split=split, hint=HINT)

    def file(self, filename):
        """A file of the dataset repo: from the local directory, or downloaded (and cached) from the hub."""
        return os.path.join(self.source, filename) if self.local() else hub_file(self.source, filename, hint=HINT)

    def list_files(self):
        return sorted(os.listdir(self.source)) if self.local() else hub_list_files(self.source, hint=HINT)

    @staticmethod
    def to_sample(row, index, image_dir):
        raise NotImplementedError


class VisionTaskMixture(Task):
    """
    Vision and text tasks mixed by weight: each position draws its task with probability weight/sum(weights),
    and a task's draws walk through a seeded permutation of its examples (wrapping if it runs out).
    Deterministic per seed; shard() splits it across ranks.
    """
    def __init__(self, tasks, weights, num_samples=None, seed=0, **kwargs):
        super().__init__(**kwargs)
        assert len(tasks) == len(weights) and all(w > 0 for w in weights) and all(len(t) > 0 for t in tasks)
        self.tasks = tasks
        p = np.asarray(weights, dtype=np.float64) / sum(weights)
        n = num_samples if num_samples is not None else sum(len(t) for t in tasks)
        rng = np.random.default_rng(seed)
        self.task_of = rng.choice(len(tasks), size=n, p=p)
        self.example_of = np.zeros(n, dtype=np.int64)
        for t, task in enumerate(tasks):
            where = np.flatnonzero(self.task_of == t)
            self.example_of[where] = rng.permutation(len(task))[np.arange(len(where)) % len(task)]

    def num_examples(self):
        return len(self.task_of)

    def get_example(self, index):
        return self.tasks[self.task_of[index]][int(self.example_of[index])]
