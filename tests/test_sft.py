"""The prompt/completion task `gptj_sft`: exact records and masks in both layouts, the loss mask the
pipeline builds from them, host sharding and bad input. Train-then-sample end to end is
tests/test_examples.py (examples/instruction_tuning.py)."""

import gzip
import json
import re

import numpy as np
import pytest
import seqio
from data_utils import make_config

from gptj.data import tasks
from gptj.data.pipeline import build_eval_iterators, build_train_iterator, epoch_seed, host_dataset, translate_errors
from gptj.errors import DataError
from gptj.data.vocab import EOT_ID, get_tokenizer

SEQ = 16

LONG_PROMPT = "Summarise: " + " ".join(f"w{i}" for i in range(30)) + "\nSummary:"
ROWS = [
    {"prompt": "Q: What is 2+2?\nA:", "completion": " 4", "id": 1},  # extra keys are ignored
    {"prompt": LONG_PROMPT, "completion": " words."},                # longer than a record: prompt cut
    {"prompt": "Count:", "completion": "".join(f" {i}" for i in range(20))},  # completion too long: skipped
    None,                                                             # a blank line
    {"prompt": "Hi", "completion": " there, friend"},
]


def write_jsonl(path, rows, opener=open) -> str:
    with opener(path, "wt") as f:
        f.write("".join("\n" if r is None else json.dumps(r) + "\n" for r in rows))
    return str(path)


def expected_examples(rows, seq_len=SEQ):
    """(tokens, mask) of each kept example, from the plain tokenizer and the documented rule."""
    tok = get_tokenizer()
    out = []
    for row in filter(None, rows):
        prompt, target = tok.encode(row["prompt"]), tok.encode(row["completion"]) + [EOT_ID]
        if len(target) > seq_len:
            continue
        prompt = prompt[max(0, len(prompt) - (seq_len + 1 - len(target))):]
        out.append((prompt + target, [0] * len(prompt) + [1] * len(target)))
    return out


def records(name, **kwargs):
    with translate_errors(name):
        pairs = list(host_dataset(name, "train", with_mask=True, **kwargs).as_numpy_iterator())
    return np.stack([t for t, _ in pairs]), np.stack([m for _, m in pairs])


def test_padded_records_are_one_example_each(tmp_path, caplog):
    path = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    tasks.register_sft_task("s_pad", path, SEQ)
    text, mask = records("s_pad")
    tok = get_tokenizer()
    want = expected_examples(ROWS)
    assert len(want) == 3 and text.shape == mask.shape == (3, SEQ + 1) and text.dtype == mask.dtype == np.int32
    for (tokens, marks), got_text, got_mask in zip(want, text, mask):
        n = len(tokens)
        np.testing.assert_array_equal(got_text, tokens + [0] * (SEQ + 1 - n))  # at position 0, right-padded
        np.testing.assert_array_equal(got_mask, marks + [0] * (SEQ + 1 - n))
    # Spelled out: the mask covers exactly the completion and the EOS that follows it.
    completion = tok.encode(" 4")
    p = len(tok.encode("Q: What is 2+2?\nA:"))
    assert list(text[0, p:p + 2]) == completion + [EOT_ID] and list(mask[0]) == [0] * p + [1, 1] + [0] * (SEQ - 1 - p)
    # The long prompt lost its start, kept its end and the whole completion, and fills the record.
    words = tok.encode(" words.")
    assert mask[1].sum() == len(words) + 1 and text[1, -1] == EOT_ID and (mask[1] == 0).sum() == SEQ - len(words)
    assert list(text[1, : SEQ - len(words)]) == tok.encode(LONG_PROMPT)[-(SEQ - len(words)):]
    assert tok.decode(text[2, mask[2] == 1]) == " there, friend<|endoftext|>"
    assert "1 had their prompt cut" in caplog.text and "1 were skipped" in caplog.text
    assert "sft.jsonl row 3" in caplog.text


def test_packed_records_join_examples_with_their_masks(tmp_path):
    rows = ROWS + [{"prompt": f"Say {i}:", "completion": f" {i} {i}"} for i in range(6)]
    path = write_jsonl(tmp_path / "sft.jsonl.gz", rows, gzip.open)  # compressed input reads the same
    config = make_config(train_task="gptj_sft", val_tasks=(), seq_len=SEQ, sft_pattern=path, sft_pack=True)
    tasks.register_tasks_for_config(config)
    text, mask = records("gptj_sft")
    want = expected_examples(rows)
    stream = np.concatenate([t for t, _ in want])
    marks = np.concatenate([m for _, m in want])
    n = len(stream) // (SEQ + 1)
    assert n >= 3 and text.shape == (n, SEQ + 1)  # full records only: the shorter tail is dropped
    np.testing.assert_array_equal(text.reshape(-1), stream[: n * (SEQ + 1)])
    np.testing.assert_array_equal(mask.reshape(-1), marks[: n * (SEQ + 1)])
    assert (mask[text == EOT_ID] == 1).all()


def numbered_rows(n, start=0):
    return [{"prompt": f"Question {i}: what is {i} times {i}?", "completion": f" It is {i * i}."}
            for i in range(start, start + n)]


@pytest.mark.parametrize("pack", [False, True])
def test_batches_carry_the_mask_shifted_by_one(tmp_path, pack):
    train = write_jsonl(tmp_path / "train.jsonl", numbered_rows(12))
    val = write_jsonl(tmp_path / "val.jsonl", numbered_rows(3, start=100))
    config = make_config(train_task="gptj_sft", val_tasks=("gptj_sft_validation",), seq_len=SEQ, batch_size=4,
                         sft_pattern=train, sft_val_pattern=val, sft_pack=pack)
    tasks.register_tasks_for_config(config)
    it = build_train_iterator(config)
    batches = [next(it) for _ in range(2)]
    state = it.get_state()
    batches += [next(it) for _ in range(4)]  # 2 or 3 batches an epoch: into a later epoch
    # The task's records of those epochs (packing reshuffles examples, so records change each epoch).
    mask_of = {}
    for epoch in range(3):
        text, mask = records("gptj_sft", shuffle=True, seed=epoch_seed(config.train.seed, epoch))
        mask_of.update((tuple(t), m) for t, m in zip(text, mask))
    for batch in batches:
        assert batch["loss_mask"].dtype == np.float32
        for inputs, targets, loss_mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
            record = tuple(inputs) + (targets[-1],)
            np.testing.assert_array_equal(loss_mask, mask_of[record][1:])
            assert 0 < loss_mask.sum() < SEQ
    # Resuming gives the very batch, mask included, that the uninterrupted iterator gave next.
    resumed = build_train_iterator(config)
    resumed.set_state(state)
    got = next(resumed)
    for key in ("inputs", "targets", "loss_mask"):
        np.testing.assert_array_equal(got[key], batches[2][key])
    # Validation: unshuffled records in order, then a padding row whose mask is all zero.
    val_text, val_mask = records("gptj_sft_validation")
    (batch,) = list(build_eval_iterators(config)["gptj_sft_validation"]())
    rows = len(val_text)
    assert rows < 4
    np.testing.assert_array_equal(batch["inputs"][:rows], val_text[:, :-1])
    np.testing.assert_array_equal(batch["loss_mask"][:rows], val_mask[:, 1:])
    assert not batch["loss_mask"][rows:].any()


@pytest.mark.parametrize("pack", [False, True])
def test_two_hosts_partition_the_single_host_set(tmp_path, pack):
    path = write_jsonl(tmp_path / "sft.jsonl", numbered_rows(20))
    tasks.register_sft_task("s_hosts", path, SEQ, pack=pack)

    def rows(**kwargs):
        text, mask = records("s_hosts", **kwargs)
        return [tuple(t) + tuple(m) for t, m in zip(text, mask)]

    for shuffle in (False, True):
        single = rows(shuffle=shuffle, seed=3)
        hosts = [rows(shard_info=seqio.ShardInfo(i, 2), shuffle=shuffle, seed=3) for i in range(2)]
        assert len(set(single)) == len(single) >= 10
        assert hosts[0] and hosts[1] and not set(hosts[0]) & set(hosts[1])
        assert sorted(hosts[0] + hosts[1]) == sorted(single)
    shuffled = rows(shuffle=True, seed=3)
    assert shuffled == rows(shuffle=True, seed=3) and shuffled != rows(shuffle=False)  # seeded, and shuffled


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": " b"}\n\n{not json\n', r"row 3: not valid JSON \(.*\)"),
    ('{"prompt": "a"}\n', r"row 1: no 'completion' field \(found \['prompt'\]\)"),
    ('{"completion": " b"}\n', r"row 1: no 'prompt' field \(found \['completion'\]\)"),
    ('["a", "b"]\n', r"row 1: no 'prompt' field \(found list\)"),
    ('{"prompt": "a", "completion": 7}\n', r"row 1: field 'completion' is int, not a string"),
    ('{"prompt": null, "completion": " b"}\n', r"row 1: field 'prompt' is NoneType, not a string"),
    ('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": ""}\n', r"row 2: field 'completion' is empty"),
])
def test_bad_rows_are_one_line_naming_file_and_row(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    tasks.register_sft_task("s_bad", str(tmp_path / "bad.jsonl"), SEQ)
    with pytest.raises(DataError) as error:
        records("s_bad")
    assert "\n" not in str(error.value)
    assert error.match(rf"^{re.escape(str(tmp_path))}/bad\.jsonl: {message}$")


def test_missing_files_and_patterns(tmp_path):
    folder = re.escape(str(tmp_path))
    with pytest.raises(DataError, match=rf"^prompt/completion file {folder}/none\.jsonl does not exist$"):
        tasks.register_sft_task("s_missing", str(tmp_path / "none.jsonl"), SEQ)
    with pytest.raises(DataError, match=r"^prompt/completion pattern '.*/\*\.jsonl' matches no files$"):
        tasks.register_sft_task("s_missing", str(tmp_path / "*.jsonl"), SEQ)
    (tmp_path / "notes.txt").write_text("plain text")
    with pytest.raises(DataError, match=r"notes\.txt: prompt/completion data must be JSON lines"):
        tasks.register_sft_task("s_missing", str(tmp_path / "notes.txt"), SEQ)
    path = write_jsonl(tmp_path / "ok.jsonl", numbered_rows(2))
    for train, val, field in (("", path, "sft_pattern"), (path, "", "sft_val_pattern")):
        config = make_config(train_task="gptj_sft", val_tasks=("gptj_sft_validation",), seq_len=SEQ,
                             sft_pattern=train, sft_val_pattern=val)
        with pytest.raises(DataError, match=rf"no prompt/completion files given \(set config\.data\.{field}\)$"):
            tasks.register_tasks_for_config(config)


# -- acceptance: train on a few pairs, then greedy sampling reproduces every completion -------------------
