"""seqio tasks: demo corpus splits, TFRecord and text tasks, registration, and bad input (acceptance 5)."""

import json

import numpy as np
import pytest
from data_utils import make_config, numbered_records, read_records, tfrecord_dir, write_records

from gptj.data import tasks
from gptj.data.pipeline import host_dataset
from gptj.data.prepare import prepare_data
from gptj.errors import DataError
from gptj.data.vocab import EOT_ID, get_tokenizer

SEQ = 16


def records_of(name, split="train"):
    ds = host_dataset(name, split)
    rows = list(ds.as_numpy_iterator())
    return np.stack(rows)


def test_registration_is_explicit_and_unknown_names_fail():
    import seqio

    assert "gptj_tasks_never_registered" not in seqio.TaskRegistry.names()
    config = make_config(train_task="gptj_no_such_task")
    with pytest.raises(ValueError, match="unknown data task 'gptj_no_such_task'"):
        tasks.register_tasks_for_config(config)
    config = make_config(train_task="gptj_tfrecords", val_tasks=())
    with pytest.raises(DataError, match="tfrecord_pattern"):
        tasks.register_tasks_for_config(config)
    assert tasks.register_tasks_for_config(make_config()) == ["gptj_demo_train", "gptj_demo_validation"]


def test_demo_splits_do_not_overlap():
    from gptj.data.tasks.demo import demo_documents

    train, val = demo_documents("train"), demo_documents("validation")
    assert len(val) >= 5 and len(train) >= 8 * len(val) and not set(train) & set(val)
    tasks.register_demo_tasks(SEQ)
    tok = get_tokenizer()
    for name, split, docs in (("gptj_demo_train", "train", train), ("gptj_demo_validation", "validation", val)):
        recs = records_of(name, split)
        assert recs.shape[1] == SEQ + 1 and recs.dtype == np.int32
        # Unshuffled, the records are the documents' tokens joined by EOT, in order.
        stream = np.concatenate([tok.encode(d) + [EOT_ID] for d in docs])
        np.testing.assert_array_equal(recs.reshape(-1), stream[: recs.size])
        assert len(stream) - recs.size < SEQ + 1


def test_tfrecord_task_reads_reference_format(tmp_path):
    pattern, records = tfrecord_dir(tmp_path, num_files=3, per_file=5, seq_len=SEQ)
    tasks.register_tfrecord_task("t_tfr", pattern, SEQ)
    got = records_of("t_tfr")
    assert sorted(map(tuple, got)) == sorted(map(tuple, records))
    index = tmp_path / "list.index"
    index.write_text("part_1.tfrecords\n" + str(tmp_path / "part_0.tfrecords") + "\n")  # relative + absolute
    tasks.register_tfrecord_task("t_tfr_index", str(index), SEQ)
    assert sorted(map(tuple, records_of("t_tfr_index"))) == sorted(map(tuple, records[:10]))


def test_text_task_packs_like_prepare_data(tmp_path):
    from gptj.data.tasks.demo import demo_documents

    docs = demo_documents("validation")[:4]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[1:]))
    inputs = f"{tmp_path}/a.txt,{tmp_path}/b.jsonl"
    summary = prepare_data(inputs, str(tmp_path / "out"), SEQ, text_field="body", shuffle=False,
                           num_workers=1, progress=False)
    tasks.register_text_task("t_text", inputs, SEQ, text_field="body")
    np.testing.assert_array_equal(records_of("t_text"), read_records(summary["splits"]["train"]["files"], SEQ + 1))
    # and prepare_data's output trains unchanged through the TFRecord task
    tasks.register_tfrecord_task("t_prepared", summary["splits"]["train"]["index"], SEQ)
    np.testing.assert_array_equal(records_of("t_prepared"), records_of("t_text"))


# -- acceptance 5: bad input ----------------------------------------------------------------------------


def read_all(name):
    from gptj.data.pipeline import translate_errors

    with translate_errors(name):
        return list(host_dataset(name, "train").as_numpy_iterator())


def test_missing_and_empty_tfrecord_files(tmp_path, caplog):
    with pytest.raises(DataError, match=r"TFRecord pattern .*\*\.tfrecords' matches no files"):
        tasks.register_tfrecord_task("t_bad", str(tmp_path / "*.tfrecords"), SEQ)
    with pytest.raises(DataError, match=r"TFRecord file .*missing\.tfrecords does not exist"):
        tasks.register_tfrecord_task("t_bad", str(tmp_path / "missing.tfrecords"), SEQ)
    index = tmp_path / "x.index"
    index.write_text("# header\n\nmissing.tfrecords\n")
    with pytest.raises(DataError, match=r"x\.index: line 3: listed file missing\.tfrecords does not exist"):
        tasks.register_tfrecord_task("t_bad", str(index), SEQ)
    (tmp_path / "empty.tfrecords").write_bytes(b"")
    with pytest.raises(DataError, match="are empty"):
        tasks.register_tfrecord_task("t_bad", str(tmp_path / "empty.tfrecords"), SEQ)
    # An empty file among good ones is a reported skip: it holds no records.
    write_records(str(tmp_path / "good.tfrecords"), numbered_records(3, SEQ))
    tasks.register_tfrecord_task("t_skip", str(tmp_path / "*.tfrecords"), SEQ)
    assert "skipping empty TFRecord file" in caplog.text and "empty.tfrecords" in caplog.text
    assert len(read_all("t_skip")) == 3


def test_corrupt_tfrecord_names_file_and_record(tmp_path):
    path = write_records(str(tmp_path / "c.tfrecords"), numbered_records(4, SEQ))
    data = bytearray(open(path, "rb").read())
    size = len(data) // 4
    data[2 * size + size // 2] ^= 0xFF  # a flipped byte inside the third record's payload
    open(path, "wb").write(bytes(data))
    tasks.register_tfrecord_task("t_corrupt", path, SEQ)
    with pytest.raises(DataError, match=r"c\.tfrecords: record 2: corrupt TFRecord data"):
        read_all("t_corrupt")
    open(path, "wb").write(bytes(data[: size + 20]))  # truncated inside the second record's payload
    with pytest.raises(DataError, match=r"c\.tfrecords: record 1: corrupt TFRecord data"):
        read_all("t_corrupt")


def test_wrong_length_and_out_of_range_tokens(tmp_path):
    rows = [list(r) for r in numbered_records(4, SEQ)]
    path = write_records(str(tmp_path / "len.tfrecords"), rows[:2] + [rows[2][:-3]] + rows[3:])
    tasks.register_tfrecord_task("t_len", path, SEQ)
    with pytest.raises(DataError, match=r"^.*len\.tfrecords: record 2 has 14 tokens, expected seq_len \+ 1 = 17$"):
        read_all("t_len")
    rows[1][5] = 50257
    path = write_records(str(tmp_path / "ids.tfrecords"), rows)
    tasks.register_tfrecord_task("t_ids", path, SEQ)
    with pytest.raises(DataError, match=r"ids\.tfrecords: record 1 has token ids in \[.*, 50257\], outside \[0, 50257\)"):
        read_all("t_ids")
    # the model's vocabulary can be the tighter bound
    rows[1][5] = 600
    path = write_records(str(tmp_path / "small.tfrecords"), rows[:2])
    tasks.register_tfrecord_task("t_small", path, SEQ, vocab_size=512)
    with pytest.raises(DataError, match=r"small\.tfrecords: record 1 .* outside \[0, 512\)"):
        read_all("t_small")


def test_not_an_example_record(tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "junk.tfrecords")
    with tf.io.TFRecordWriter(path) as w:
        w.write(b"\xff\xfe not a protobuf")
    tasks.register_tfrecord_task("t_junk", path, SEQ)
    with pytest.raises(DataError, match=r"junk\.tfrecords: record 0: not a tf.train.Example"):
        read_all("t_junk")


def test_text_task_bad_rows_name_file_and_row(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    tasks.register_text_task("t_rows", str(tmp_path / "rows.jsonl"), SEQ)
    with pytest.raises(DataError, match=r"^.*rows\.jsonl: row 2: no 'text' field \(found \['title'\]\)$"):
        read_all("t_rows")
    with pytest.raises(DataError, match="does not exist"):
        tasks.register_text_task("t_rows", str(tmp_path / "none.jsonl"), SEQ)
