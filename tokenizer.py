"""
BPE tokenizer: rustbpe trains it, tiktoken runs it (nanochat's split pattern and special tokens),
plus the vision tokens. A nanochat tokenizer.pkl is extended by appending the vision tokens, so every
nanochat id keeps its meaning and a nanochat GPT only needs new rows.
"""
import os
import pickle

import rustbpe
import tiktoken

from common import atomic_open
from config import SPECIAL_TOKENS, VISION_TOKENS, GROUNDING_TOKENS, IMAGE_TOKEN, STOP_TOKEN

# GPT-4's split pattern with \p{N}{1,2} instead of {1,3}: nanochat's choice for small vocabularies
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


class ImageBlockTooLong(ValueError):
    """The sample's image slots do not fit in max_tokens; the caller drops (and counts) the sample."""


class RustBPETokenizer:
    def __init__(self, enc):
        missing = [t for t in SPECIAL_TOKENS + VISION_TOKENS if t not in enc._special_tokens]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; extend it with "
                             "RustBPETokenizer.with_vision_tokens")
        self.enc = enc
        self.bos_token_id = self.encode_special("<|bos|>")
        self.image_token_id = self.encode_special(IMAGE_TOKEN)
        self.stop_token_id = self.encode_special(STOP_TOKEN)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        specials = SPECIAL_TOKENS + VISION_TOKENS
        vocab_size_no_special = vocab_size - len(specials)
        assert vocab_size_no_special >= 256, f"vocab_size must be at least {256 + len(specials)}"
        tokenizer = rustbpe.Tokenizer()
        tokenizer.train_from_iterator(text_iterator, vocab_size_no_special, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(k): v for k, v in tokenizer.get_mergeable_ranks()}
        offset = len(mergeable_ranks)
        special_tokens = {name: offset + i for i, name in enumerate(specials)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.get_pattern(), mergeable_ranks=mergeable_ranks,
                                special_tokens=special_tokens)
        return cls(enc)

    @classmethod
    def with_vision_tokens(cls, enc):
        """Extend a tiktoken encoding (e.g. nanochat's) by appending whichever vision tokens it lacks."""
        special_tokens = dict(enc._special_tokens)
        next_id = enc.n_vocab
        for name in VISION_TOKENS:
            if name not in special_tokens:
                special_tokens[name] = next_id
                next_id += 1
        enc = tiktoken.Encoding(name=enc.name + "+vision", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                                special_tokens=special_tokens)
        return cls(enc)

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; train one with `python -m scripts.tok_train`")
        with open(path, "rb") as f:
            enc = pickle.load(f)
        return cls.with_vision_tokens(enc)

    def save(self, tokenizer_dir):
        os.makedirs(tokenizer_dir, exist_ok=True)
        with atomic_open(os.path.join(tokenizer_dir, "tokenizer.pkl"), "wb") as f:
            pickle.dump(self.enc, f)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def encode(self, text, prepend=None, append=None):
        """str -> ids, or list[str] -> list of ids. Grounding tokens in the text become their special ids."""
        def encode_one(ids):
            if prepend is not None:
                ids.insert(0, prepend if isinstance(prepend, int) else self.encode_special(prepend))
            if append is not None:
                ids.append(append if isinstance(append, int) else self.encode_special(append))
            return ids
        kwargs = dict(allowed_special=set(GROUNDING_TOKENS), disallowed_special=())
        if isinstance(text, str):
            return encode_one(self.enc.encode(text, **kwargs))
        return [encode_one(ids) for ids in self.enc.encode_batch(text, **kwargs)]

    def decode(self, ids):
        return self.enc.decode(ids)

    def render_for_completion(self, text, image_slot_counts, max_tokens=None):
        """
        What a vision sample's generation starts from: <|bos|>, then `text` with each <image> expanded to its count of
        <image> slots. max_tokens: an image block must end within it (else ImageBlockTooLong: the caller drops and
        counts the sample, never keeps half an image); the text after it may run past (render_vision_sample cuts).
        """
        pieces = text.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(image_slot_counts):
            raise ValueError(f"text has {len(pieces) - 1} <image> but {len(image_slot_counts)} slot counts were given")
        ids = [self.bos_token_id]
        for i, piece in enumerate(pieces):
            if i > 0:
                n = image_slot_counts[i - 1]
                if max_tokens is not None and len(ids) + n > max_tokens:
                    raise ImageBlockTooLong(f"image {i} needs {n} slots from position {len(ids)}, "
                                            f"beyond max_tokens={max_tokens}")
                ids.extend([self.image_token_id] * n)
            ids.extend(self.encode(piece))
        return ids

    def render_vision_sample(self, text, response, image_slot_counts, max_tokens):
        """
        A vision sample for training, <|bos|>[<image> x N]\\n<prompt><response><|assistant_end|> cut to max_tokens ->
        (ids, mask): mask 1 on what is learned (the response and its stop token), 0 on the prompt given at inference.
        """
        prompt = self.render_for_completion(text, image_slot_counts, max_tokens)
        ids = (prompt + self.encode(response) + [self.stop_token_id])[:max_tokens]
        return ids, ([0] * len(prompt) + [1] * len(ids))[:len(ids)]

    def render_vision_pretraining(self, text, max_tokens, image_token_counts, response=None):
        """(ids, image slot positions) of a vision sample (render_vision_sample's ids), or of its generation prompt
        when there is no response."""
        ids = self.render_vision_sample(text, response, image_token_counts, max_tokens)[0] if response is not None \
            else self.render_for_completion(text, image_token_counts, max_tokens)[:max_tokens]
        return ids, [i for i, t in enumerate(ids) if t == self.image_token_id]

    def render_conversation(self, conversation, max_tokens):
        """nanochat chat format -> (ids, mask); mask=1 on what the assistant says (the training targets)."""
        messages = list(conversation["messages"])
        if messages and messages[0]["role"] == "system":  # nanochat folds the system prompt into the first user turn
            assert len(messages) > 1 and messages[1]["role"] == "user", "a system message must precede a user message"
            merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [dict(role="user", content=merged)] + messages[2:]
        ids, mask = [self.bos_token_id], [0]

        def add(token_ids, m):
            ids.extend(token_ids)
            mask.extend([m] * len(token_ids))
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i} is from {message['role']}, expected {expected}")
            content = message["content"]
            if not isinstance(content, str):
                raise ValueError(f"message {i} content must be a string")
            if expected == "user":
                start, end = self.encode_special("<|user_start|>"), self.encode_special("<|user_end|>")
                add([start] + self.encode(content) + [end], 0)
            else:
                add([self.encode_special("<|assistant_start|>")], 0)
                add(self.encode(content) + [self.stop_token_id], 1)
        return ids[:max_tokens], mask[:max_tokens]
