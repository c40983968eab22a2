"""Shared helpers for the data tests: a plain TFRecord writer/reader of the reference format, configs."""

from __future__ import annotations

import os

import numpy as np


def write_records(path: str, records) -> str:
    """Writes records (lists of ints) as reference-format Examples {"text": int64 list}, plainly."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(path) as w:
        for r in records:
            feat = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in r]))
            w.write(tf.train.Example(features=tf.train.Features(feature={"text": feat})).SerializeToString())
    return path


def read_records(paths, record_len: int) -> np.ndarray:
    """Reads reference-format TFRecords with a plain tf.data reader: [n, record_len] int64."""
    import tensorflow as tf

    ds = tf.data.TFRecordDataset(list(paths)).map(
        lambda r: tf.io.parse_single_example(r, {"text": tf.io.FixedLenFeature([record_len], tf.int64)})["text"])
    rows = list(ds.as_numpy_iterator())
    return np.stack(rows) if rows else np.zeros((0, record_len), np.int64)


def numbered_records(n: int, seq_len: int, start: int = 0) -> np.ndarray:
    """n distinct records of seq_len + 1 tokens: record i starts with i (identifiable after shuffling)."""
    rows = np.arange(start, start + n)[:, None] * 7 + np.arange(seq_len + 1)[None, :]
    rows[:, 0] = np.arange(start, start + n)
    return rows % 50000


def make_config(train_task: str = "gptj_demo_train", val_tasks=("gptj_demo_validation",), seq_len: int = 16,
                batch_size: int = 8, **data):
    """The tiny config with small data settings."""
    from gptj.configs import tiny

    config = tiny.get_config()
    config.data.update(dict(train_task=train_task, val_tasks=list(val_tasks), seq_len=seq_len,
                            shuffle_buffer=64, **data))
    config.train.batch_size = batch_size
    config.train.val_batches = 4
    return config


def tfrecord_dir(tmp_path, num_files: int, per_file: int, seq_len: int) -> tuple[str, np.ndarray]:
    """num_files TFRecord files of numbered records; returns (glob, all records in file order)."""
    records = numbered_records(num_files * per_file, seq_len)
    for i in range(num_files):
        write_records(os.path.join(tmp_path, f"part_{i}.tfrecords"), records[i * per_file:(i + 1) * per_file])
    return os.path.join(tmp_path, "part_*.tfrecords"), records
