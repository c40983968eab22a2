"""Preference pairs for DPO: JSON lines {"prompt", "chosen", "rejected"} -> pair records with loss masks.

Input: .jsonl / .json files (optionally .gz / .zst), one JSON object per line
with string fields "prompt", "chosen" and "rejected" (TRL's preference format;
other keys are ignored, blank lines skipped).

Each row becomes two sequences that share the prompt, tokenized as the SFT
task tokenizes (`gptj.data.tasks.sft`: prompt and completion separately, EOS
after the completion):

    chosen   = tokens(prompt) + tokens(chosen) + EOS
    rejected = tokens(prompt) + tokens(rejected) + EOS

and one record of both, each right-padded to `seq_len + 1` tokens with token 0:

    {"text": int32 [2, seq_len + 1], "loss_mask": int32 [2, seq_len + 1]}

row 0 the chosen sequence, row 1 the rejected one. `loss_mask` is 1 on the
completion tokens and the EOS, 0 on the prompt and padding; the pipeline
shifts it with the targets, so a sequence's log-probability is summed over
exactly its completion and EOS. A pair is one record, so shuffling, host
sharding, batching and the batch's layout on devices never part a chosen
sequence from its rejected one. Pairs are never packed.

Too long: the prompt is cut from the left, the same cut for both sequences
(they must share it), until prompt + the longer completion + EOS fits
`seq_len + 1` tokens; a pair whose longer completion + EOS alone exceeds
`seq_len` tokens is skipped. This is `gptj_sft`'s rule applied to the longer
completion; cuts and skips are counted and logged once per task as a warning
naming the first skipped row.

Bad input is a one-line `DataError` naming the file and row: a row that is
not JSON, lacks one of the three fields or holds a non-string there, has an
empty "chosen" or "rejected" completion, or has chosen == rejected (the
pair would carry no preference: almost always a broken export).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from gptj.data.tasks.sft import EXAMPLE_SHUFFLE_BUFFER, MASK, TEXT, JsonRowsSource, json_lines_files, keep_prompt
from gptj.errors import DataError

FIELDS = ("prompt", "chosen", "rejected")
# Sequences per record: the chosen one (row 0) and the rejected one (row 1).
PAIR = 2


def encode_pair(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int], eos_id: int,
                seq_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(tokens, mask) int32 [2, seq_len + 1] of one pair (chosen row 0, rejected row 1), or None to skip it.

    Both sequences keep the same end of the prompt: as much as fits beside
    the longer completion + EOS (see the module docstring).
    """
    targets = ([*chosen_ids, eos_id], [*rejected_ids, eos_id])
    prompt = keep_prompt(prompt_ids, max(len(t) for t in targets), seq_len)
    if prompt is None:
        return None
    tokens = np.zeros((PAIR, seq_len + 1), np.int32)
    mask = np.zeros((PAIR, seq_len + 1), np.int32)
    for row, target in enumerate(targets):
        end = len(prompt) + len(target)
        tokens[row, :end] = prompt + target
        mask[row, len(prompt):end] = 1
    return tokens, mask


class DPOSource(JsonRowsSource):
    """Preference JSON-lines files as {"text", "loss_mask"} pair records [2, seq_len + 1]; one split; hosts
    split the records."""

    fields = FIELDS
    what = "preference"

    def encode_row(self, path: str, row: int, values: tuple[str, ...]) -> tuple[Any, bool]:
        """(tokens, mask) [2, seq_len + 1] of one pair (None when skipped), and whether its prompt was cut."""
        prompt, chosen, rejected = values
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            if not completion:
                raise DataError(f"{path}: row {row}: field {name!r} is empty")
        if chosen == rejected:
            raise DataError(f"{path}: row {row}: 'chosen' and 'rejected' are the same text, so the pair "
                            "states no preference")
        prompt_ids = self.vocabulary.encode(prompt)
        pair = encode_pair(prompt_ids, self.vocabulary.encode(chosen), self.vocabulary.encode(rejected),
                           self.vocabulary.eos_id, self.seq_len)
        if pair is None:
            return None, False
        return pair, int(np.argmax(pair[1][0])) < len(prompt_ids)  # the chosen row's completion starts early

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None, shard_info=None,
                    *, sequence_length=None, use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
        """One pass over the pair records (this host's share under `shard_info`), shuffled with the seed when
        asked."""
        del split, sequence_length, use_cached, num_epochs  # one split; records are laid out at seq_len; seqio repeats
        spec = tf.TensorSpec([PAIR, self.seq_len + 1], tf.int32)
        records = tf.data.Dataset.from_generator(self.tagged_examples, output_signature=(spec, spec))
        if shuffle:
            records = records.shuffle(EXAMPLE_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=False)
        return self.shard(records.map(lambda t, m: {TEXT: t, MASK: m}), shard_info)


def dpo_files_source(pattern: str | Sequence[str], vocabulary, seq_len: int) -> DPOSource:
    """A `DPOSource` over the .jsonl / .json (.gz / .zst) files the glob(s) name (one split, "train")."""
    return DPOSource(json_lines_files(pattern, "preference"), vocabulary, seq_len)
