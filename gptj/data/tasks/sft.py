"""Prompt/completion pairs for instruction tuning: JSON lines -> token records with a loss mask.

Input: .jsonl / .json files (optionally .gz / .zst), one JSON object per line
with string fields "prompt" and "completion" (other keys are ignored, blank
lines skipped).

Each example is tokens(prompt) + tokens(completion) + EOS, the prompt and the
completion tokenized separately (as `--mode=sample` tokenizes a prompt, so the
boundary the model learns is the one it sees when sampling). Records hold
`seq_len + 1` tokens like every gptj task, with a second feature:

    {"text": int32 [seq_len + 1], "loss_mask": int32 [seq_len + 1]}

`loss_mask` is 1 on completion tokens and the EOS, 0 on prompt tokens and
padding; `gptj.data.pipeline` gives the model `loss_mask[1:]`, so the loss counts
exactly the predictions of completion tokens and of the EOS.

Layouts (`pack`, config.data.sft_pack):
- padded (default): one example per record, starting at position 0 (where
  sampling puts a prompt), right-padded with token 0, mask 0;
- packed: examples joined back to back and cut into full records, masks
  travelling with their tokens (the tail shorter than a record is dropped,
  a different one each epoch when shuffled). Fewer wasted tokens, but an
  example may straddle two records and attends to the ones before it.

Too long: an example longer than a record keeps its completion and EOS and
the end of its prompt (the prompt is cut from the left: the words nearest the
completion matter most). If the completion and EOS alone exceed `seq_len`
tokens, leaving no prompt token to predict the completion from, the example is
skipped. The same rule holds in both layouts; cuts and skips are counted and
logged once per task as a warning naming the first skipped row.
An empty prompt is allowed (plain continuation training); in the padded
layout its first completion token then has nothing before it and is no target.

Bad input is a one-line `DataError` naming the file and row (the line
number): a row that is not JSON, lacks "prompt" or "completion", holds a
non-string there, or has an empty completion (it would only teach the model
to stop at once: almost always a broken export). A missing file or a pattern
matching nothing fails when the task is registered.

As in `gptj.data.tasks.text`, every host reads and lays out the same stream (same
files, same seed) and keeps every host-count-th record, so the hosts' records
partition the single-host set.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow as tf

from gptj.data.tasks.files import ERROR_TAG, expand_patterns, read_json_rows, text_format
from gptj.data.tasks.text import RecordStreamSource
from gptj.errors import DataError

TEXT = "text"
MASK = "loss_mask"
FIELDS = ("prompt", "completion")
# Examples held for shuffling before they are laid out (the task shuffles records too).
EXAMPLE_SHUFFLE_BUFFER = 1024


def keep_prompt(prompt_ids: Sequence[int], target_len: int, seq_len: int) -> list[int] | None:
    """The end of the prompt that fits a record of `seq_len + 1` tokens beside `target_len` target tokens.

    The prompt is cut from the left (the words nearest the completion matter
    most); None when the target alone is longer than `seq_len`, leaving no
    prompt token to predict it from (the example is then skipped).
    """
    if target_len > seq_len:
        return None
    return list(prompt_ids)[max(0, len(prompt_ids) - (seq_len + 1 - target_len)):]


def encode_example(prompt_ids: Sequence[int], completion_ids: Sequence[int], eos_id: int,
                   seq_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(tokens, mask) int32 of one example cut to at most `seq_len + 1` tokens, or None to skip it.

    tokens = prompt + completion + EOS, mask 1 on completion and EOS; a long
    prompt loses tokens from its left; None when completion + EOS is longer
    than `seq_len` (see the module docstring).
    """
    target = [*completion_ids, eos_id]
    prompt = keep_prompt(prompt_ids, len(target), seq_len)
    if prompt is None:
        return None
    tokens = np.asarray(prompt + target, np.int32)
    mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(target), np.int32)])
    return tokens, mask


class JsonRowsSource(RecordStreamSource):
    """What the JSON-lines tasks share: their files, vocabulary and record length, one split that hosts
    divide record by record, errors tagged for the input iterator, and one warning per task about the
    examples the length rule cut or skipped. Subclasses encode a row (`encode_row`) and lay out records
    (`get_dataset`)."""

    def __init__(self, files: Sequence[str], vocabulary, seq_len: int, split: str = "train"):
        super().__init__(splits=(split,), caching_permitted=False)
        self.files = list(files)
        self.vocabulary = vocabulary
        self.seq_len = int(seq_len)
        self._reported = False

    fields: tuple[str, ...]  # the JSON fields of a row, in the order `encode_row` takes them
    what: str  # what the rows are, for the length rule's warning

    def encode_row(self, path: str, row: int, values: tuple[str, ...]) -> tuple[Any, bool]:
        """(the row's example, or None where the length rule skips it; whether its prompt was cut from the left).

        Raises `DataError` naming the file and row on bad input."""
        raise NotImplementedError

    def examples(self) -> Iterator:
        """The examples of every row in file order, cut or skipped by the length rule; one warning per task
        counts them. Raises `DataError` naming the file and row on bad input."""
        total = cut = skipped = 0
        first_skipped = ""
        for path in self.files:
            for row, values in read_json_rows(path, self.fields):
                example, prompt_cut = self.encode_row(path, row, values)
                total += 1
                if example is None:
                    skipped += 1
                    first_skipped = first_skipped or f" (first: {path} row {row})"
                    continue
                cut += int(prompt_cut)
                yield example
        if (cut or skipped) and not self._reported:
            # Once per task: every epoch (and every host) reads the same rows again.
            self._reported = True
            logging.warning("%s data %s: of %d examples, %d had their prompt cut from the left and %d were skipped "
                            "because completion + EOS is longer than seq_len=%d tokens%s", self.what,
                            ",".join(self.files), total, cut, skipped, self.seq_len, first_skipped)

    def tagged_examples(self):
        """`examples()`, a DataError's message tagged so that the iterator recovers it from TensorFlow's error."""
        try:
            yield from self.examples()
        except DataError as e:
            raise DataError(ERROR_TAG + str(e)) from None


class SFTSource(JsonRowsSource):
    """Prompt/completion JSON-lines files as {"text", "loss_mask"} records of `seq_len + 1` tokens,
    padded (one example per record) or packed; one split; hosts split the records."""

    def __init__(self, files: Sequence[str], vocabulary, seq_len: int, pack: bool = False,
                 split: str = "train"):
        super().__init__(files, vocabulary, seq_len, split)
        self.pack = bool(pack)

    fields = FIELDS
    what = "prompt/completion"

    def encode_row(self, path: str, row: int, values: tuple[str, ...]) -> tuple[Any, bool]:
        """(tokens, mask) of one prompt/completion row (None when skipped), and whether its prompt was cut."""
        prompt, completion = values
        if not completion:
            raise DataError(f"{path}: row {row}: field 'completion' is empty")
        prompt_ids = self.vocabulary.encode(prompt)
        example = encode_example(prompt_ids, self.vocabulary.encode(completion), self.vocabulary.eos_id,
                                 self.seq_len)
        if example is None:
            return None, False
        tokens, mask = example
        return example, len(tokens) - int(mask.sum()) < len(prompt_ids)

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None, shard_info=None,
                    *, sequence_length=None, use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
        """One pass over the records (this host's share under `shard_info`), examples shuffled with
        the seed before layout when asked."""
        del split, sequence_length, use_cached, num_epochs  # one split; records are laid out at seq_len; seqio repeats
        length = self.seq_len + 1
        spec = tf.TensorSpec([None], tf.int32)
        examples = tf.data.Dataset.from_generator(self.tagged_examples, output_signature=(spec, spec))
        if shuffle:
            examples = examples.shuffle(EXAMPLE_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=False)
        if self.pack:
            records = examples.unbatch().batch(length, drop_remainder=True)
        else:
            def pad(tokens, mask):
                padding = [[0, length - tf.shape(tokens)[0]]]
                return tf.pad(tokens, padding), tf.pad(mask, padding)
            records = examples.map(pad)
        records = records.map(lambda t, m: {TEXT: tf.ensure_shape(t, [length]), MASK: tf.ensure_shape(m, [length])})
        return self.shard(records, shard_info)


def json_lines_files(pattern: str | Sequence[str], what: str) -> list[str]:
    """The .jsonl / .json (.gz / .zst) files the glob(s) name; any other file is a DataError naming it."""
    files = expand_patterns(pattern, what=what)
    for path in files:
        try:
            fmt = text_format(path)
        except DataError:  # its message offers .txt, which these tasks do not read
            fmt = None
        if fmt != "jsonl":
            raise DataError(f"{path}: {what} data must be JSON lines (.jsonl or .json, optionally .gz or .zst)")
    return files


def sft_files_source(pattern: str | Sequence[str], vocabulary, seq_len: int, pack: bool = False) -> SFTSource:
    """An `SFTSource` over the .jsonl / .json (.gz / .zst) files the glob(s) name (one split, "train")."""
    return SFTSource(json_lines_files(pattern, "prompt/completion"), vocabulary, seq_len, pack)
