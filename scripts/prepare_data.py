"""
Download and prepare the nine datasets (and SmolTalk) once, before a multi-GPU run, so the ranks do not race
to prepare them. Each task streams its source, writes images to disk and samples.jsonl; an interrupted
preparation resumes where it stopped. --source NAME=DIR prepares a dataset from a local copy of its hub
repository instead (the same files, e.g. fetched elsewhere with `hf download ... --repo-type dataset`).

  python -m scripts.prepare_data --max_samples=50000
  python -m scripts.prepare_data --only=chartqa --source=chartqa=/data/ChartQA
"""
import argparse

from common import run_command
from tasks.mixture import VISION_TASKS, split_of
from tasks.smoltalk import SmolTalk


def main(argv=None):
    names = [cls.name for cls, _ in VISION_TASKS] + ["smoltalk"]
    parser = argparse.ArgumentParser(description="prepare the training datasets")
    parser.add_argument("--max_samples", type=int, default=0, help="per dataset; 0 = all")
    parser.add_argument("--only", default="", help=f"comma-separated task names out of {','.join(names)}")
    parser.add_argument("--source", action="append", default=[], metavar="NAME=DIR",
                        help="a local copy of a dataset's hub repository (repeatable)")
    args = parser.parse_args(argv)
    wanted = set(filter(None, args.only.split(",")))
    sources = dict(s.split("=", 1) for s in args.source if "=" in s)
    unknown = (wanted | set(sources)) - set(names)
    if unknown or len(sources) != len(args.source):
        parser.error(f"unknown datasets {sorted(unknown)} or a --source without NAME=DIR; datasets are {names}")
    for cls, _ in VISION_TASKS:
        if not wanted or cls.name in wanted:
            for split in ("train", "val"):
                task = split_of(cls, split, args.max_samples or None, sources.get(cls.name))
                print(f"{cls.name} {split}: {len(task):,} samples")
    if not wanted or "smoltalk" in wanted:
        task = SmolTalk("train", args.max_samples or None, source=sources.get("smoltalk"))
        print(f"smoltalk: {len(task):,} conversations")


if __name__ == "__main__":
    run_command(main)
