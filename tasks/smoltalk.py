"""SmolTalk (HuggingFaceTB/smol-smoltalk): nanochat's conversations, the text-only part of stage 2."""
from hub import load_hf_dataset
from tasks.common import HINT, Task


class SmolTalk(Task):
    def __init__(self, split="train", max_samples=None, source="HuggingFaceTB/smol-smoltalk", **kwargs):
        super().__init__(**kwargs)
        ds = load_hf_dataset(source, split=split, streaming=False, hint=HINT).shuffle(seed=42)
        self.ds = ds.select(range(min(max_samples, len(ds)))) if max_samples else ds

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        return dict(messages=self.ds[index]["messages"])
