"""
Train the BPE tokenizer offline, in seconds, on local text: the synthetic pages' ground truth by default,
plus any text files or directories given with --input. Writes tokenizer.pkl to --out (default: the base dir).

  python -m scripts.tok_train --vocab_size=4096
  python -m scripts.tok_train --vocab_size=65536 --input=my_corpus/ --max_chars=2000000000
"""
import argparse
import os
import time

from config import tokenizer_dir
from tasks.synthetic import corpus
from tokenizer import RustBPETokenizer

parser = argparse.ArgumentParser(description="train a BPE tokenizer on local text")
parser.add_argument("--vocab_size", type=int, default=4096)
parser.add_argument("--input", action="append", default=[], help="text file or directory of .txt/.md files (repeatable)")
parser.add_argument("--num_docs", type=int, default=20000, help="synthetic documents to include")
parser.add_argument("--max_chars", type=int, default=200_000_000)
parser.add_argument("--out", default=None)
args = parser.parse_args()


def local_files(paths):
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                yield from (os.path.join(root, n) for n in sorted(names) if n.endswith((".txt", ".md")))
        elif os.path.isfile(path):
            yield path
        else:
            raise SystemExit(f"--input {path}: no such file or directory")


def documents():
    yield from corpus(args.num_docs)
    for path in local_files(args.input):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def texts():
    """Documents up to max_chars, with a progress line every 1M characters."""
    seen, reported = 0, 0
    for doc in documents():
        doc = doc[:args.max_chars - seen]
        seen += len(doc)
        if seen - reported >= 1_000_000:
            reported = seen
            print(f"\rread {seen / 1e6:.1f}M characters", end="", flush=True)
        yield doc
        if seen >= args.max_chars:
            return


t0 = time.time()
tokenizer = RustBPETokenizer.train_from_iterator(texts(), args.vocab_size)
out = args.out or tokenizer_dir()
tokenizer.save(out)
sample = "# Results\n\nThe model reads <table><tr><td>42</td></tr></table> and \\frac{a}{b}."
ids = tokenizer.encode(sample)
assert tokenizer.decode(ids) == sample
print(f"\ntrained a {tokenizer.get_vocab_size()}-token tokenizer in {time.time() - t0:.1f}s -> {out}/tokenizer.pkl")
print(f"{len(sample)} characters -> {len(ids)} tokens ({len(sample) / len(ids):.2f} chars/token)")
