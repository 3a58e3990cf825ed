import os
import pickle
import subprocess
import sys

import pytest
import tiktoken

from config import SPECIAL_TOKENS, VISION_TOKENS
from tokenizer import RustBPETokenizer, ImageBlockTooLong, SPLIT_PATTERN


def test_unicode_and_special_tokens_round_trip(tokenizer):
    text = "Héllo wörld — 你好, naïve café 🙂 x^{2} <table><td>1</td></table>\n\ttabs"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for name in SPECIAL_TOKENS + VISION_TOKENS:
        token_id = tokenizer.encode_special(name)
        assert tokenizer.decode([token_id]) == name
    # grounding tokens written in a prompt become their single special id; chat tokens in text stay plain text
    ids = tokenizer.encode("<|grounding|>Convert")
    assert ids[0] == tokenizer.encode_special("<|grounding|>")
    assert tokenizer.encode_special("<|user_start|>") not in tokenizer.encode("<|user_start|>")
    assert len({tokenizer.encode_special(t) for t in SPECIAL_TOKENS + VISION_TOKENS}) == len(SPECIAL_TOKENS + VISION_TOKENS)


def nanochat_like_encoding():
    """A tokenizer as nanochat ships it: its own special tokens only, pickled tiktoken Encoding."""
    base = RustBPETokenizer.train_from_iterator(["some text to learn a few merges from " * 50], 400)
    ranks = base.enc._mergeable_ranks
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="nanochat", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def test_nanochat_tokenizer_is_extended_by_appending(tmp_path):
    enc = nanochat_like_encoding()
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    tok = RustBPETokenizer.from_directory(str(tmp_path))
    assert tok.get_vocab_size() == enc.n_vocab + len(VISION_TOKENS)
    assert [tok.encode_special(t) for t in VISION_TOKENS] == list(range(enc.n_vocab, enc.n_vocab + len(VISION_TOKENS)))
    text = "some text, learned"
    assert tok.encode(text) == enc.encode_ordinary(text)  # every old id keeps its meaning
    assert all(tok.encode_special(t) == enc.encode_single_token(t) for t in SPECIAL_TOKENS)
    tok.save(str(tmp_path / "extended"))
    assert RustBPETokenizer.from_directory(str(tmp_path / "extended")).get_vocab_size() == tok.get_vocab_size()


def test_missing_tokenizer_has_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="tok_train"):
        RustBPETokenizer.from_directory(str(tmp_path))


def test_render_vision_pretraining_expands_and_stops(tokenizer):
    ids, positions = tokenizer.render_vision_pretraining("<image>\nFree OCR.", 1000, [73], response="Hello world")
    assert ids[0] == tokenizer.get_bos_token_id()
    assert positions == list(range(1, 74))
    assert all(ids[p] == tokenizer.image_token_id for p in positions)
    assert ids.count(tokenizer.image_token_id) == 73
    assert ids[-1] == tokenizer.stop_token_id
    assert tokenizer.decode(ids[74:-1]) == "\nFree OCR.Hello world"
    # as a generation prompt: no response, no stop token
    prompt, _ = tokenizer.render_vision_pretraining("<image>\nFree OCR.", 1000, [73])
    assert prompt == ids[:len(prompt)] and prompt[-1] != tokenizer.stop_token_id


def test_render_vision_pretraining_truncates_text_not_images(tokenizer):
    full, _ = tokenizer.render_vision_pretraining("<image>\nFree OCR.", 10_000, [111], response="word " * 100)
    cut, positions = tokenizer.render_vision_pretraining("<image>\nFree OCR.", 130, [111], response="word " * 100)
    assert len(cut) == 130 and cut == full[:130] and len(positions) == 111
    with pytest.raises(ImageBlockTooLong):  # 1 + 111 slots do not fit in 100 tokens: dropped, not half-kept
        tokenizer.render_vision_pretraining("<image>\nFree OCR.", 100, [111], response="x")
    two, positions = tokenizer.render_vision_pretraining("a<image>b<image>c", 500, [3, 5])
    assert len(positions) == 8 and two.count(tokenizer.image_token_id) == 8
    with pytest.raises(ImageBlockTooLong):  # the second image block would be cut
        tokenizer.render_vision_pretraining("a<image>b<image>c", 8, [3, 5])
    with pytest.raises(ValueError, match="slot counts"):
        tokenizer.render_vision_pretraining("<image><image>", 100, [3])


def test_render_conversation_masks_the_user(tokenizer):
    conversation = dict(messages=[dict(role="system", content="Be brief."), dict(role="user", content="2+2?"),
                                  dict(role="assistant", content="4")])
    ids, mask = tokenizer.render_conversation(conversation, 100)
    assert len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained[:-1]) == "4" and trained[-1] == tokenizer.stop_token_id
    assert "Be brief.\n\n2+2?" in tokenizer.decode(ids)
    with pytest.raises(ValueError):
        tokenizer.render_conversation(dict(messages=[dict(role="assistant", content="hi")]), 100)


def test_tok_train_script_trains_offline(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    corpus_file = tmp_path / "extra.txt"
    corpus_file.write_text("zyxwvut " * 1000)
    out = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--vocab_size=600", "--num_docs=300",
                          f"--input={corpus_file}", f"--out={tmp_path / 'tok'}"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "trained a" in out.stdout
    tok = RustBPETokenizer.from_directory(str(tmp_path / "tok"))
    assert len(tok.encode(" zyxwvut")) == 1  # the local file was part of the corpus
