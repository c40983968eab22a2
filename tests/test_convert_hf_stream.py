"""HF weights a box at a time: any box of any leaf from safetensors (fp32, bf16) or sharded .bin files, and
sharded safetensors out (`--max_shard_size`) that HF loads as it loads its own."""

import copy
import json
import math
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from hf_utils import assert_loads_as, random_hf_model

from gptj.convert.__main__ import main
from gptj.weights.formats import hf, hf_files
from gptj.errors import WeightsError


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(vocab_size=101, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, seed=11)


@pytest.fixture(scope="module")
def reference(hf_model, tmp_path_factory):
    """The fp32 model's gptj params (numpy, vocabulary padded to 112) and config, read whole."""
    path = tmp_path_factory.mktemp("ref") / "hf"
    hf_model.save_pretrained(path)
    return hf.read_hf(str(path), vocab_pad_multiple=16)


def _random_boxes(shape, rng, n=4):
    for _ in range(n):
        starts = [int(rng.integers(0, d)) for d in shape]
        yield tuple(slice(s, int(rng.integers(s + 1, d + 1))) for s, d in zip(starts, shape))


@pytest.mark.parametrize("form", ["safetensors_bf16", "bin_sharded", "safetensors_sharded"])
def test_any_box_of_any_leaf_reads_only_its_bytes(hf_model, reference, tmp_path, form):
    params, config = reference
    src = tmp_path / form
    if form == "safetensors_bf16":
        copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(src)
        expected = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16), params)
        dtype = ml_dtypes.bfloat16  # read straight into bf16: never an fp32 copy of the model
    else:
        hf_model.save_pretrained(src, safe_serialization=form.startswith("safetensors"), max_shard_size="20KB")
        assert len([n for n in os.listdir(src) if n.startswith(("model-", "pytorch_model-"))]) > 2
        expected, dtype = params, np.float32

    lazy, lazy_config, files = hf.open_hf(str(src), vocab_pad_multiple=16)
    assert lazy_config == config
    rng = np.random.default_rng(0)
    itemsize = files.tensors["lm_head.bias"].dtype.itemsize
    for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(lazy), jax.tree_util.tree_leaves(expected)):
        leaf, name = leaf.astype(dtype), jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(leaf), want, err_msg=name)
        head_dim_axis = 2 if name.endswith("['out_proj']") else 3 if name.endswith("_proj']") else None
        for box in _random_boxes(leaf.shape, rng):
            if head_dim_axis is not None:  # heads are read whole (no layout splits head_dim)
                box = box[:head_dim_axis] + (slice(0, leaf.shape[head_dim_axis]),) + box[head_dim_axis + 1:]
            before = files.bytes_read
            np.testing.assert_array_equal(leaf.read(box), want[box], err_msg=f"{name} {box}")
            # Only the box's bytes (fewer where it covers vocabulary padding, which is read from nowhere).
            assert files.bytes_read - before <= math.prod(s.stop - s.start for s in box) * itemsize


def _saved(model, tmp_path):
    path = tmp_path / "fp32"
    if not path.exists():
        model.save_pretrained(path)
    return path


def test_sharded_export_loads_in_hf_bit_identical(hf_model, tmp_path):
    src = _saved(hf_model, tmp_path)
    assert main(["from_hf", f"--hf_dir={src}", f"--out={tmp_path / 'params'}", "--vocab_pad_multiple=16"]) == 0
    assert main(["to_hf", f"--workdir={tmp_path / 'params'}", f"--out={tmp_path / 'out'}",
                 "--max_shard_size=30KB"]) == 0
    out = tmp_path / "out"
    index = json.loads((out / hf_files.SAFETENSORS_INDEX).read_text())
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert all(os.path.getsize(out / n) <= 30_000 + 2_000 or len(_names(out / n)) == 1 for n in shards)
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary left

    assert_loads_as(out, hf_model, np.random.RandomState(0).randint(0, 101, size=(2, 9)))


def _names(path):
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return [k for k in header if k != "__metadata__"]


def test_an_existing_model_is_never_overwritten(hf_model, reference, tmp_path):
    src = _saved(hf_model, tmp_path)
    before = (src / "model.safetensors").read_bytes()
    with pytest.raises(WeightsError, match="already holds a model"):
        hf.write_hf(reference[0], reference[1], str(src))
    assert (src / "model.safetensors").read_bytes() == before


def test_shard_sizes_are_read_as_hf_writes_them():
    assert hf_files.parse_size("5GB") == 5 * 10**9 and hf_files.parse_size("2GiB") == 2 * 2**30
    assert hf_files.parse_size("500mb") == 500 * 10**6 and hf_files.parse_size("1234") == 1234
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(ValueError):
            hf_files.parse_size(bad)
    with pytest.raises(SystemExit) as usage:
        main(["to_hf", "--workdir=w", "--out=o", "--max_shard_size=lots"])
    assert usage.value.code == 2
