"""
Download / cache / prepare helpers shared by the tasks and the weight loaders.
A prepared dataset is a directory holding images on disk and samples.jsonl, one sample per line:
  {"text": "<image>\\n<prompt>", "response": str, "image_path": str}
Preparation streams rows, writes as it goes, and resumes where it stopped after a crash.
"""
import io
import json
import os
import shutil
import tarfile

from PIL import Image
from tqdm import tqdm

from config import data_dir


def offline_message(repo_id, repo_type, error):
    hint = ("HF_HUB_OFFLINE=1 is set, so nothing is downloaded" if os.environ.get("HF_HUB_OFFLINE") == "1"
            else "the Hugging Face hub could not be reached")
    flag = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return (f"could not get {repo_type} '{repo_id}': {hint} ({type(error).__name__}: {error}).\n"
            f"Fetch it on a machine with network: `hf download {repo_id}{flag}` (then copy ~/.cache/huggingface), "
            f"or pass a local directory instead of the hub id.")


def hub_snapshot(repo_id, repo_type="model", allow_patterns=None):
    """snapshot_download with a clear, immediate error when offline or unreachable."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns)
    except Exception as e:
        raise RuntimeError(offline_message(repo_id, repo_type, e)) from e


def hub_file(repo_id, filename, repo_type="dataset"):
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id, filename, repo_type=repo_type)
    except Exception as e:
        raise RuntimeError(offline_message(repo_id, repo_type, e)) from e


def hub_list_files(repo_id, repo_type="dataset"):
    from huggingface_hub import HfApi
    try:
        return sorted(HfApi().list_repo_files(repo_id, repo_type=repo_type))
    except Exception as e:
        raise RuntimeError(offline_message(repo_id, repo_type, e)) from e


def load_hf_dataset(repo_id, name=None, split="train", streaming=True):
    """datasets.load_dataset, streamed by default (nothing huge lands on disk), with the offline message."""
    from datasets import load_dataset
    try:
        return load_dataset(repo_id, name, split=split, streaming=streaming)
    except Exception as e:
        raise RuntimeError(offline_message(repo_id, "dataset", e)) from e


def save_image(image, path):
    """Write an image (PIL, encoded bytes, or a datasets {'bytes','path'} dict) to disk once; returns the path."""
    if os.path.exists(path):
        return path
    if isinstance(image, dict):
        image = image.get("bytes") or open(image["path"], "rb").read()
    tmp = path + ".tmp"
    if isinstance(image, (bytes, bytearray)):
        with open(tmp, "wb") as f:
            f.write(image)
    else:
        image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def image_size(image):
    """(width, height) of a PIL image, encoded bytes or a datasets image dict, without decoding pixels."""
    if isinstance(image, dict):
        image = image.get("bytes") or open(image["path"], "rb").read()
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).size
    return image.size


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


def prepare_samples(name, rows, to_sample, max_samples=None, total=None):
    """
    Turn dataset rows into samples.jsonl under data_dir(name). to_sample(row, index, image_dir) returns a
    sample dict, a list of them (a row with several questions), or None (row unusable). Resumable: progress.json
    records how many rows were consumed, and a restart skips them. Returns the path of samples.jsonl.
    """
    root = data_dir(name)
    final, partial, progress_path = (os.path.join(root, f) for f in ("samples.jsonl", "samples.jsonl.partial", "progress.json"))
    if os.path.exists(final):
        return final
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    progress = dict(rows=0, samples=0, skipped=0)
    if os.path.exists(progress_path) and os.path.exists(partial):
        with open(progress_path) as f:
            progress = json.load(f)
        with open(partial, encoding="utf-8") as f:
            kept = [line for _, line in zip(range(progress["samples"]), f)]  # drop lines written after the last save
        with open(partial, "w", encoding="utf-8") as f:
            f.writelines(kept)
    else:
        open(partial, "w").close()

    def save_progress():
        with open(progress_path + ".tmp", "w") as f:
            json.dump(progress, f)
        os.replace(progress_path + ".tmp", progress_path)

    bar = tqdm(total=max_samples or total, initial=progress["samples"], desc=f"preparing {name}", unit="sample")
    with open(partial, "a", encoding="utf-8") as out:
        for index, row in enumerate(rows):
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
    os.replace(partial, final)
    if os.path.exists(progress_path):
        os.remove(progress_path)
    print(f"{name}: {progress['samples']} samples, {progress['skipped']} rows skipped -> {final}")
    return final
