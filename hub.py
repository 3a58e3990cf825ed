"""
Hugging Face hub access for weights, nanochat checkpoints and datasets, through one wrapper: the network is
probed once per process (a fraction of a second), and without it only the local cache is used, so an offline
call fails at once with one message saying how to get the files, instead of retrying for half a minute.
"""
import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

from common import UserError


class HubUnavailable(UserError, RuntimeError):
    """A hub file or dataset that could not be had; the message says how to get it."""


@lru_cache(maxsize=None)
def hub_status():
    """'offline' (HF_HUB_OFFLINE=1), 'unreachable' (the hub's host does not answer within a second) or 'online'.
    Decided once per process."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "offline"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=1.0).close()
        return "online"
    except OSError:
        return "unreachable"


def go_offline():
    """Make huggingface_hub and datasets answer from the local cache only (they read these at import and per call)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    import datasets.config
    datasets.config.HF_HUB_OFFLINE = True


def hub_call(repo_id, repo_type, call, hint=None):
    """Run call() against the hub, or against the local cache alone when offline; any failure is one HubUnavailable."""
    status = hub_status()
    if status != "online":
        go_offline()
    try:
        return call()
    except Exception as e:
        why = dict(offline="HF_HUB_OFFLINE=1 is set and it is not in the local cache",
                   unreachable="no network (the hub does not answer) and it is not in the local cache").get(
            status, f"the hub refused it ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
        flag = "" if repo_type == "model" else f" --repo-type {repo_type}"
        raise HubUnavailable(
            f"could not get {repo_type} '{repo_id}': {why}.\n"
            f"Fetch it where there is network: `hf download {repo_id}{flag}` (then copy ~/.cache/huggingface), "
            f"{hint or 'or pass a local directory instead of the hub id'}.") from None


def hub_snapshot(repo_id, repo_type="model", allow_patterns=None, hint=None):
    from huggingface_hub import snapshot_download
    return hub_call(repo_id, repo_type,
                    lambda: snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns), hint)


def hub_file(repo_id, filename, repo_type="dataset", hint=None):
    from huggingface_hub import hf_hub_download
    return hub_call(repo_id, repo_type, lambda: hf_hub_download(repo_id, filename, repo_type=repo_type), hint)


def hub_list_files(repo_id, repo_type="dataset", hint=None):
    from huggingface_hub import HfApi
    return hub_call(repo_id, repo_type, lambda: sorted(HfApi().list_repo_files(repo_id, repo_type=repo_type)), hint)


def load_hf_dataset(repo_id, name=None, split="train", streaming=True, hint=None):
    """datasets.load_dataset, streamed by default (nothing huge lands on disk)."""
    from datasets import load_dataset
    return hub_call(repo_id, "dataset", lambda: load_dataset(repo_id, name, split=split, streaming=streaming), hint)
