"""Raw documents tokenized on the fly: packed into `seq_len + 1` token records as seqio sources.

Packing happens inside the source, before seqio splits examples over hosts:
every host builds the same packed stream (same files, same seed) and keeps
its share of the records, so the union of the hosts' records is exactly the
single-host set. Each host tokenizes the whole corpus, which is fine for the
small corpora this path is for; large corpora go through `gptj.prepare_data`
once and train from TFRecords.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from gptj.data.tasks.files import ERROR_TAG, expand_patterns, read_documents
from gptj.errors import DataError

FEATURE = "text"
# Documents held for shuffling before packing (the task shuffles records too).
DOC_SHUFFLE_BUFFER = 1024


def tokenize_documents(docs: tf.data.Dataset, vocabulary) -> tf.data.Dataset:
    """Strings -> int32 token vectors, each with EOT appended; empty documents are dropped
    (they would add a lone EOT)."""
    eot = tf.constant([vocabulary.eos_id], tf.int32)
    docs = docs.filter(lambda s: tf.strings.length(s) > 0)
    return docs.map(lambda s: tf.concat([vocabulary.encode_tf(s), eot], 0), num_parallel_calls=tf.data.AUTOTUNE)


def pack_tokens(docs: tf.data.Dataset, seq_len: int) -> tf.data.Dataset:
    """Token vectors -> {"text": int32 [seq_len + 1]}: all joined and cut into full records
    (the tail shorter than a record is dropped)."""
    records = docs.unbatch().batch(seq_len + 1, drop_remainder=True)
    return records.map(lambda r: {FEATURE: tf.ensure_shape(r, [seq_len + 1])})


def _documents_from_files(files: Sequence[str], text_field: str) -> Callable[[], Iterable[str]]:
    def generate():
        for path in files:
            try:
                for _, text in read_documents(path, text_field):
                    yield text
            except DataError as e:
                # Re-raised inside tf.data; the tag lets the iterator recover this line.
                raise DataError(ERROR_TAG + str(e)) from None
    return generate


class RecordStreamSource(seqio.DataSource):
    """A source every host builds the same stream of records of (same files, same seed), keeping every
    host-count-th record (`shard`), so the hosts' records partition the single-host set: each split is
    one shard, which seqio may hand to any number of hosts."""

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [split]

    @staticmethod
    def shard(records: tf.data.Dataset, shard_info) -> tf.data.Dataset:
        """This host's share of the records under seqio's `shard_info`: every host-count-th one."""
        if shard_info and shard_info.num_shards > 1:
            return records.shard(shard_info.num_shards, shard_info.index)
        return records


class PackedTextSource(RecordStreamSource):
    """Tokenized documents from `make_docs(split)` (a tf.data.Dataset of int32 vectors, each ending
    in EOT), shuffled with the seed when asked and packed into `seq_len + 1` records; hosts split
    the packed records."""

    def __init__(self, make_docs: Callable[[str], tf.data.Dataset], seq_len: int, splits: Sequence[str] = ("train",)):
        super().__init__(splits=tuple(splits), caching_permitted=False)
        self._make_docs = make_docs
        self.seq_len = seq_len

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None, shard_info=None,
                    *, sequence_length=None, use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
        """One pass over the split's records (this host's share under `shard_info`)."""
        del sequence_length, use_cached, num_epochs  # records are packed at seq_len; seqio repeats
        docs = self._make_docs(split)
        if shuffle:
            docs = docs.shuffle(DOC_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=False)
        return self.shard(pack_tokens(docs, self.seq_len), shard_info)


def text_files_source(pattern: str | Sequence[str], vocabulary, seq_len: int, text_field: str = "text"):
    """A `PackedTextSource` over .txt/.jsonl(.gz/.zst) files (one split, "train")."""
    files = expand_patterns(pattern, what="text")

    def make_docs(split: str) -> tf.data.Dataset:
        del split
        texts = tf.data.Dataset.from_generator(_documents_from_files(files, text_field),
                                               output_signature=tf.TensorSpec((), tf.string))
        return tokenize_documents(texts, vocabulary)

    source = PackedTextSource(make_docs, seq_len)
    source.files = files
    return source


def in_memory_source(split_to_docs: dict[str, Sequence[str]], vocabulary, seq_len: int):
    """A `PackedTextSource` over documents held in memory, one split per key.

    The documents are tokenized once, here, in Python: the pipeline then runs
    no Python code per element, so each epoch costs no tokenization and the
    input pipeline stops at once when training ends.
    """
    tokenized = {}
    for split, docs in split_to_docs.items():
        docs = [d for d in docs if d]
        ids = [row + [vocabulary.eos_id] for row in vocabulary.tokenizer.encode_batch(docs)]
        tokenized[split] = tf.RaggedTensor.from_row_lengths(
            np.concatenate(ids).astype(np.int32) if ids else np.zeros((0,), np.int32), [len(r) for r in ids])
    return PackedTextSource(lambda split: tf.data.Dataset.from_tensor_slices(tokenized[split]), seq_len,
                            splits=tuple(tokenized))
