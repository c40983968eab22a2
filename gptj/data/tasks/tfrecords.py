"""Pre-tokenized TFRecords in the reference's format, as a seqio data source.

Format (kingoflolz/mesh-transformer-jax `create_finetune_tfrecords.py`): each
record is a `tf.train.Example` with one feature, `text`, an int64 list of
`seq_len + 1` token ids. Files are named by a glob (comma-separated globs are
fine) or by an index file listing one path per line.

Bad input, and what happens:
- a pattern matching nothing, a missing file, an index line naming a missing
  file: `DataError` when the task is registered;
- a zero-byte file: skipped with a warning (it holds no records); if every file
  is empty, `DataError`;
- a record of the wrong length or with a token id outside [0, vocab_size): the
  pipeline fails with "FILE: record N ..." (record counted from 0);
- a corrupt file (bad checksum, truncated inside a record, not an Example):
  the pipeline fails; `describe_tfrecord_error` then scans the files to name
  the file and record. (A file cut inside a record's 12-byte header reads as
  ending there: that is TensorFlow's reader, which cannot tell it from EOF.)
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import seqio
import tensorflow as tf

from gptj.data.tasks.files import ERROR_TAG, expand_patterns, read_index
from gptj.errors import DataError

FEATURE = "text"


def list_tfrecord_files(pattern_or_index: str | Sequence[str]) -> list[str]:
    """The non-empty TFRecord files named by globs/paths or by an index file (`*.index` or
    any file that is not itself a .tfrecord(s)); empty files are skipped with a warning."""
    if isinstance(pattern_or_index, str) and os.path.isfile(pattern_or_index) \
            and not pattern_or_index.endswith((".tfrecord", ".tfrecords")):
        files = read_index(pattern_or_index)
    else:
        files = expand_patterns(pattern_or_index, what="TFRecord")
    kept = []
    for f in files:
        if "://" not in f and os.path.getsize(f) == 0:
            logging.warning("skipping empty TFRecord file %s (0 bytes, no records)", f)
            continue
        kept.append(f)
    if not kept:
        raise DataError(f"all TFRecord files named by {pattern_or_index!r} are empty")
    return kept


def parse_record_fn(seq_len: int, vocab_size: int):
    """(file, index, serialized Example) -> {"text": int32 [seq_len + 1]}, checked in-graph."""
    length = seq_len + 1

    def parse(filename, index, serialized):
        tokens = tf.io.parse_single_example(serialized, {FEATURE: tf.io.VarLenFeature(tf.int64)})[FEATURE]
        tokens = tf.sparse.to_dense(tokens)
        n = tf.shape(tokens, out_type=tf.int64)[0]
        low, high = tf.reduce_min(tokens), tf.reduce_max(tokens)

        def message(*parts):  # strings and int tensors -> one string (tf.strings.format would quote)
            return tf.strings.join([p if isinstance(p, str) or p.dtype == tf.string else tf.strings.as_string(p)
                                    for p in (ERROR_TAG, filename, ": record ", index, *parts)])

        checks = [
            tf.debugging.Assert(tf.equal(n, length), [message(" has ", n, f" tokens, expected seq_len + 1 = {length}")]),
            tf.debugging.Assert(
                tf.logical_or(tf.equal(n, 0), tf.logical_and(low >= 0, high < vocab_size)),
                [message(" has token ids in [", low, ", ", high, f"], outside [0, {vocab_size})")]),
        ]
        with tf.control_dependencies(checks):
            tokens = tf.identity(tokens)
        return {FEATURE: tf.ensure_shape(tf.cast(tokens, tf.int32), [length])}

    return parse


class TFRecordSource(seqio.FileDataSource):
    """Reference-format TFRecords; one split ("train"); files are the shards seqio splits over hosts."""

    def __init__(self, files: Sequence[str], seq_len: int, vocab_size: int, split: str = "train"):
        self.files = list(files)
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        parse = parse_record_fn(seq_len, vocab_size)

        def read_file(filename):
            records = tf.data.TFRecordDataset(filename).enumerate()
            return records.map(lambda i, r: parse(filename, i, r), num_parallel_calls=tf.data.AUTOTUNE)

        # Reading a few files at once, one record from each in turn, mixes files before the
        # shuffle buffer does; interleave stays deterministic, so the order is reproducible.
        super().__init__(read_file_fn=read_file, split_to_filepattern={split: self.files},
                         caching_permitted=False, cycle_length=4, block_length=1)

    def list_shards(self, split: str) -> Sequence[str]:
        return self.files


def describe_tfrecord_error(files: Sequence[str], seq_len: int, vocab_size: int) -> str | None:
    """Scans the files and describes the first bad record as "FILE: record N: problem", or None.

    Used after the pipeline failed with an error that does not say where
    (checksum or proto errors), so its cost (one pass in Python) is paid only
    on failure.
    """
    for path in files:
        index = -1
        try:
            for index, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
                try:
                    example = tf.train.Example.FromString(raw)
                except Exception:  # protobuf's DecodeError
                    return f"{path}: record {index}: not a tf.train.Example"
                if FEATURE not in example.features.feature:
                    found = sorted(example.features.feature)
                    return f"{path}: record {index}: no {FEATURE!r} feature (found {found})"
                values = example.features.feature[FEATURE].int64_list.value
                if len(values) != seq_len + 1:
                    return f"{path}: record {index}: has {len(values)} tokens, expected seq_len + 1 = {seq_len + 1}"
                if values and (min(values) < 0 or max(values) >= vocab_size):
                    return f"{path}: record {index}: token id outside [0, {vocab_size})"
        except tf.errors.OpError as e:
            return f"{path}: record {index + 1}: corrupt TFRecord data ({e.message.splitlines()[0]})"
    return None
