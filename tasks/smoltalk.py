"""SmolTalk (HuggingFaceTB/smol-smoltalk): nanochat's conversations, the text-only part of stage 2."""
from dataset import check_local_copy, load_local_dataset
from hub import load_hf_dataset
from tasks.common import HINT, Task


class SmolTalk(Task):
    def __init__(self, split="train", max_samples=None, source=None, **kwargs):
        super().__init__(**kwargs)
        if source is not None:
            check_local_copy(source, "smoltalk")
            ds = load_local_dataset(source, None, split, streaming=False)
        else:
            ds = load_hf_dataset("HuggingFaceTB/smol-smoltalk", split=split, streaming=False, hint=HINT)
        ds = ds.shuffle(seed=42)
        self.ds = ds.select(range(min(max_samples, len(ds)))) if max_samples else ds

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        return dict(messages=self.ds[index]["messages"])
