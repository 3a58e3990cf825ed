"""
Preparation helpers shared by the tasks (hub access itself is hub.py).
A prepared dataset is a directory holding images on disk and samples.jsonl, one sample per line:
  {"text": "<image>\\n<prompt>", "response": str, "image_path": str}
Preparation streams rows, writes as it goes, and resumes where it stopped after a crash.
"""
import json
import os
import shutil
import tarfile
from collections import Counter

from tqdm import tqdm

from common import UserError, atomic_open
from config import data_dir


class MissingSplit(UserError):
    """A local copy of a dataset that lacks the split asked for."""


def load_local_dataset(directory, config, split, streaming=True):
    """A local copy of a dataset repository (streamed by default): the task's config where the copy has several (a
    copy of one config's files has only 'default'), and the split asked for. What is wrong with it is one UserError."""
    from datasets import get_dataset_config_names, get_dataset_split_names, load_dataset
    try:
        configs = get_dataset_config_names(directory)
        name = config if config in configs else None
        if name is None and configs != ["default"]:
            raise UserError(f"{directory} holds the configs {configs}, not {config!r}, the one this task reads")
        splits = get_dataset_split_names(directory, name)
        if split not in splits:
            raise MissingSplit(f"{directory} has no {split!r} split (it has {splits})")
        return load_dataset(directory, name, split=split, streaming=streaming)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{directory}: not a readable copy of the dataset "
                        f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None


def check_local_copy(directory, name):
    """A --source directory must exist and hold something: say which it is not, before any slow work."""
    if not os.path.isdir(directory):
        raise UserError(f"{name}: {directory} is not a directory (a local copy of the dataset repository was expected)")
    try:
        if not os.listdir(directory):
            raise UserError(f"{name}: {directory} is empty: copy the dataset's files there first "
                            "(`hf download <repo> --repo-type dataset --local-dir DIR`)")
    except PermissionError as e:
        raise UserError(f"{name}: {directory} cannot be read ({e.strerror})") from None


def save_image(image, path):
    """Write an image (PIL, encoded bytes, or a datasets {'bytes','path'} dict) to disk once; returns the path."""
    if os.path.exists(path):
        return path
    if isinstance(image, dict):
        image = image.get("bytes") or open(image["path"], "rb").read()
    with atomic_open(path, "wb") as f:
        if isinstance(image, (bytes, bytearray)):
            f.write(image)
        else:
            image.save(f, format="PNG")
    return path


def extract_tar_once(tar_path, dest):
    """Extract a (large) tar archive's files flat into dest, once; a marker file says it finished."""
    marker = os.path.join(dest, ".extracted")
    if os.path.exists(marker):
        return dest
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(tar_path) as tf:
        for member in tqdm(tf, desc=f"extracting {os.path.basename(tar_path)}", unit="file"):
            if member.isfile():
                with open(os.path.join(dest, os.path.basename(member.name)), "wb") as out:
                    shutil.copyfileobj(tf.extractfile(member), out)
    open(marker, "w").close()
    return dest


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare_samples(name, rows, to_sample, max_samples=None, total=None, tally=None):
    """
    Turn dataset rows into samples.jsonl under data_dir(name). rows() gives the rows (called only when there is
    no samples.jsonl yet, so a prepared dataset needs no hub); to_sample(row, index, image_dir) returns a sample
    dict, a list of them (a row with several questions), or None (row unusable). tally: a Counter to_sample may
    fill with what it changed or dropped; it is reported at the end. Resumable: progress.json records how many rows
    were consumed (and the tally so far), and a restart skips them. Returns the path of samples.jsonl.
    """
    tally = Counter() if tally is None else tally
    root = data_dir(name)
    final, partial, progress_path = (os.path.join(root, f)
                                     for f in ("samples.jsonl", "samples.jsonl.partial", "progress.json"))
    if os.path.exists(final):
        return final
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    # resume: keep the samples written up to the last saved progress, drop any written after it
    progress = dict(rows=0, samples=0, skipped=0)
    if os.path.exists(progress_path) and os.path.exists(partial):
        with open(progress_path) as f:
            progress = json.load(f)
        tally.update(progress.pop("tally", {}))
        with open(partial, encoding="utf-8") as f:
            kept = [line for _, line in zip(range(progress["samples"]), f)]  # drop lines written after the last save
        with open(partial, "w", encoding="utf-8") as f:
            f.writelines(kept)
    else:
        open(partial, "w").close()

    def save_progress():
        with atomic_open(progress_path) as f:
            json.dump(dict(progress, tally=tally), f)

    # stream the rows, skip those already consumed, append samples, save progress every 100 rows
    bar = tqdm(total=max_samples or total, initial=progress["samples"], desc=f"preparing {name}", unit="sample")
    with open(partial, "a", encoding="utf-8") as out:
        for index, row in enumerate(rows()):
            if max_samples is not None and progress["samples"] >= max_samples:
                break
            if index < progress["rows"]:
                continue
            samples = to_sample(row, index, image_dir)
            progress["rows"] = index + 1
            if not samples:
                progress["skipped"] += 1
                continue
            samples = samples if isinstance(samples, list) else [samples]
            out.writelines(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
            progress["samples"] += len(samples)
            bar.update(len(samples))
            if index % 100 == 0:
                out.flush()
                save_progress()
    bar.close()
    # complete: the partial file becomes samples.jsonl, and the progress record goes
    os.replace(partial, final)
    if os.path.exists(progress_path):
        os.remove(progress_path)
    changed = "".join(f", {what}: {n}" for what, n in sorted(tally.items()))
    print(f"{name}: {progress['samples']} samples, {progress['skipped']} rows skipped{changed} -> {final}")
    return final
