"""
Train the BPE tokenizer offline, in seconds, on local text: the synthetic pages' ground truth by default,
plus any text files or directories given with --input. Writes tokenizer.pkl to --out (default: the base dir).

  python -m scripts.tok_train --vocab_size=4096
  python -m scripts.tok_train --vocab_size=65536 --input=my_corpus/ --max_chars=2000000000
"""
import argparse
import os
import sys
import time

from common import UserError, run_command
from config import SPECIAL_TOKENS, VISION_TOKENS, tokenizer_dir
from tasks.synthetic import corpus
from tokenizer import RustBPETokenizer


def local_files(paths):
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                yield from (os.path.join(root, n) for n in sorted(names) if n.endswith((".txt", ".md")))
        elif os.path.isfile(path):
            yield path
        else:
            raise SystemExit(f"--input {path}: no such file or directory")


def texts(num_docs, inputs=(), max_chars=200_000_000, progress=False):
    """The synthetic corpus, then the local files, up to max_chars (progress on stderr every 1M characters: one line
    rewritten on a terminal, plain lines in a log)."""
    def documents():
        yield from corpus(num_docs)
        for path in local_files(inputs):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()
    seen, reported = 0, 0
    for doc in documents():
        doc = doc[:max_chars - seen]
        seen += len(doc)
        if progress and seen - reported >= 1_000_000:
            reported = seen
            terminal = sys.stderr.isatty()
            print(f"{chr(13) if terminal else ''}read {seen / 1e6:.1f}M characters", end="" if terminal else "\n",
                  file=sys.stderr, flush=True)
        yield doc
        if seen >= max_chars:
            return


def train_tokenizer(vocab_size, num_docs=20000, inputs=(), max_chars=200_000_000, progress=False):
    return RustBPETokenizer.train_from_iterator(texts(num_docs, inputs, max_chars, progress), vocab_size)


def load_or_train_tokenizer(vocab_size=4096):
    """The base dir's trained tokenizer; on a fresh machine, one trained on the synthetic corpus and saved there."""
    if not os.path.exists(os.path.join(tokenizer_dir(), "tokenizer.pkl")):
        train_tokenizer(vocab_size, num_docs=5000).save(tokenizer_dir())
    return RustBPETokenizer.from_directory(tokenizer_dir())


def main(argv=None):
    parser = argparse.ArgumentParser(description="train a BPE tokenizer on local text")
    parser.add_argument("--vocab_size", type=int, default=4096, help="tokens, special ones included")
    parser.add_argument("--input", action="append", default=[],
                        help="text file or directory of .txt/.md files (repeatable)")
    parser.add_argument("--num_docs", type=int, default=20000, help="synthetic documents to include")
    parser.add_argument("--max_chars", type=int, default=200_000_000, help="characters of text to train on at most")
    parser.add_argument("--out", default=None, help="directory for tokenizer.pkl (default: <base dir>/tokenizer)")
    args = parser.parse_args(argv)
    smallest = 256 + len(SPECIAL_TOKENS) + len(VISION_TOKENS)  # every byte, and the special tokens
    if args.vocab_size < smallest:
        raise UserError(f"--vocab_size={args.vocab_size}: at least {smallest} (the 256 bytes and the special tokens)")
    t0 = time.time()
    tokenizer = train_tokenizer(args.vocab_size, args.num_docs, args.input, args.max_chars, progress=True)
    out = args.out or tokenizer_dir()
    tokenizer.save(out)
    sample = "# Results\n\nThe model reads <table><tr><td>42</td></tr></table> and \\frac{a}{b}."
    ids = tokenizer.encode(sample)
    assert tokenizer.decode(ids) == sample
    print(f"trained a {tokenizer.get_vocab_size()}-token tokenizer in {time.time() - t0:.1f}s -> {out}/tokenizer.pkl")
    if tokenizer.get_vocab_size() < args.vocab_size:  # not a problem: what the text gives
        print(f"{tokenizer.get_vocab_size()} tokens, not the {args.vocab_size} asked for: the text has no more pairs "
              "to merge (every word is one token); more varied text (--input) gives more")
    print(f"{len(sample)} characters -> {len(ids)} tokens ({len(sample) / len(ids):.2f} chars/token)")


if __name__ == "__main__":
    run_command(main)
