"""seqio tasks of sums written out ("17+25=42"), for examples/custom_task.py.

`register_tasks(seq_len, vocabulary)` is what `config.data.module` asks of a
task module: it registers `arithmetic_train` and `arithmetic_validation`, whose
records are sums, one per line, tokenized with the run's vocabulary and packed
into `seq_len + 1` tokens. The two splits draw from different seeds.
"""

import numpy as np
import seqio
import tensorflow as tf

from gptj import task_output_features

SUMS_PER_SPLIT = {"train": 4000, "validation": 400}


def sums(split: str) -> list[str]:
    """The split's lines: "a+b=c" for two-digit a and b."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    a, b = rng.integers(10, 100, (2, SUMS_PER_SPLIT[split]))
    return [f"{x}+{y}={x + y}\n" for x, y in zip(a, b)]


def register_tasks(seq_len: int, vocabulary) -> None:
    """Registers the two tasks for records of `seq_len + 1` tokens of `vocabulary`."""
    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices(sums(split))

    def tokenize_and_pack(ds):
        tokens = ds.map(vocabulary.encode_tf).unbatch()
        return tokens.batch(seq_len + 1, drop_remainder=True).map(lambda t: {"text": tf.cast(t, tf.int32)})

    source = seqio.FunctionDataSource(dataset_fn, splits=tuple(SUMS_PER_SPLIT))
    for name in ("arithmetic_train", "arithmetic_validation"):
        if name in seqio.TaskRegistry.names():  # registering again (a second run in one process) replaces
            seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(name, source=source, preprocessors=[tokenize_and_pack],
                               output_features=task_output_features(vocabulary))
