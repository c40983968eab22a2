"""Streaming weights (gptj.core.streaming): box reads, checksums taken block by block, placement box by box.

Every element a consumer reads counts exactly once for its source's checks, on any layout:
a counting source sees each element of each array read as primary once, whether the layout
splits, replicates or slabs it.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptj.core import integrity, partitioning, streaming
from gptj.core.streaming import LazyArray
from gptj.model.transformer import GPTJConfig
from gptj.weights.params_dir import load_params, open_params, save_params


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "bool", "int4"])
def test_block_digests_add_up_to_the_array_digest(dtype):
    rng = np.random.default_rng(0)
    x = np.asarray(jnp.asarray(rng.normal(size=(6, 10, 7)) * 40).astype(dtype))
    whole = integrity.array_digests([jnp.asarray(x)])[0]
    assert f"{integrity.block_digest(x, (0, 0, 0), x.shape):08x}" == whole
    total = 0
    for a in ((0, 1), (1, 6)):  # an uneven tiling, in no particular order
        for b in ((3, 10), (0, 3)):
            for c in ((0, 5), (5, 7)):
                total += integrity.block_digest(x[a[0]:a[1], b[0]:b[1], c[0]:c[1]], (a[0], b[0], c[0]), x.shape)
    assert f"{total % 2**32:08x}" == whole
    moved = x.copy()
    moved[0, 0, :2] = moved[0, 0, 1::-1]  # two values swapped: the positions are part of the hash
    if not np.array_equal(moved, x):
        assert f"{integrity.block_digest(moved, (0, 0, 0), x.shape):08x}" != whole


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64"])
def test_host_digest_in_many_chunks_equals_the_whole_blocks(dtype, monkeypatch):
    """The host hash reuses two buffers chunk by chunk: with 3 rows a chunk, 37 rows end on a short chunk, and the
    block's offset moves every chunk's positions. 8-byte types hash two words an element (jax, without x64, holds
    no int64 to compare with: there the reference is the host hash in one chunk)."""
    x = (np.random.default_rng(1).normal(size=(40, 11)) * 1000).astype(dtype)
    whole = integrity.block_digest(x, (0, 0), x.shape)
    if dtype != "int64":
        assert f"{whole:08x}" == integrity.array_digests([jnp.asarray(x)])[0]
    monkeypatch.setattr(integrity, "_HOST_WORDS", 3 * 11 * (2 if dtype == "int64" else 1))
    parts = integrity.block_digest(x[:3], (0, 0), x.shape) + integrity.block_digest(x[3:], (3, 0), x.shape)
    assert parts % 2**32 == whole
    assert integrity.block_digest(x[3:], (3, 0), x.shape) != integrity.block_digest(x[3:], (2, 0), x.shape)


def test_chunks_are_rows_first_and_bounded():
    assert streaming.chunk_shape((28, 4096, 16384), 4, 32 << 20) == (1, 2048, 4096)  # a layer, halved
    assert streaming.chunk_shape((50400, 4096), 4, 32 << 20) == (1575, 4096)  # a slab of embedding rows
    assert streaming.chunk_shape((4096, 50400), 4, 32 << 20) == (128, 50400)
    assert streaming.chunk_shape((28, 4096), 4, 32 << 20) == (28, 4096)  # small: one chunk


def test_lazy_array_boxes_rows_casts_and_blocks():
    x = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4) / 7
    lazy = LazyArray.of(x)
    np.testing.assert_array_equal(lazy.read((slice(1, 3), slice(None), slice(2, 4))), x[1:3, :, 2:4])
    np.testing.assert_array_equal(lazy.rows(2, 5).read((slice(1, 2), slice(0, 3), slice(0, 4))), x[3:4])
    cast = lazy.astype("bfloat16")
    assert cast.dtype == ml_dtypes.bfloat16 and cast.read().dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(cast), x.astype(ml_dtypes.bfloat16))
    seen = np.zeros(x.shape, int)
    for box, block in lazy.blocks(max_bytes=2 * 3 * 4 * 4):  # two rows a block
        assert block.shape[0] <= 2
        np.testing.assert_array_equal(block, x[box])
        seen[box] += 1
    assert (seen == 1).all()


class _Counting:
    """A source that counts every element read as primary, and checks at the end that each was counted once."""

    def __init__(self, x: np.ndarray):
        self.x, self.counts, self.verified = x, np.zeros(x.shape, int), 0

    def read(self, box, dtype, primary):
        if primary:
            self.counts[box] += 1
        return np.asarray(self.x[box], dtype)

    def verify(self, error=None):
        if error is not None:
            raise error
        self.verified += 1
        assert (self.counts == 1).all(), np.unique(self.counts)


@pytest.mark.parametrize("spec", [P(None, "model"), P("data", "model"), P(), P(None, ("data", "model")),
                                  P("model", None)], ids=str)
@pytest.mark.parametrize("slabs", [False, True], ids=["whole", "slabs"])
def test_place_reads_each_box_once_and_counts_each_element_once(mesh, monkeypatch, spec, slabs):
    if slabs:  # every leaf is large: filled in place a slab (here one row) at a time
        monkeypatch.setattr(partitioning, "_SLAB_BYTES", 8 * 16 * 4)
    x = np.random.default_rng(1).normal(size=(8, 16, 8)).astype(np.float32)
    source = _Counting(x)
    lazy = LazyArray(x.shape, np.float32, source.read, source)
    placed = partitioning.place(lazy, NamedSharding(mesh, spec), dtype=jnp.bfloat16)
    assert placed.sharding == NamedSharding(mesh, spec) and placed.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(placed), x.astype(ml_dtypes.bfloat16))
    assert source.verified == 1


def test_a_read_error_reaches_the_source_and_is_raised(mesh):
    class Broken(_Counting):
        def read(self, box, dtype, primary):
            raise OSError("disk on fire")

    source = Broken(np.zeros((4, 4), np.float32))
    with pytest.raises(OSError, match="disk on fire"):
        partitioning.place({"w": LazyArray((4, 4), np.float32, source.read, source)},
                           {"w": NamedSharding(mesh, P())})


CONFIG = GPTJConfig(vocab_size=100, num_layers=3, d_model=32, num_heads=4, rotary_dim=4, max_len=16,
                    vocab_pad_multiple=8)


def _random_params(config, seed=0):
    from gptj.weights.params_dir import param_shapes, unflatten

    rng = np.random.default_rng(seed)
    return unflatten({p: rng.normal(size=s).astype(np.float32) for p, s in param_shapes(config).items()})


def test_params_directory_streams_both_ways_in_small_blocks(tmp_path, monkeypatch, mesh):
    # Blocks and chunks far smaller than the arrays: every read and write is a slab of a leaf.
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 1024)
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 2048)
    monkeypatch.setattr(partitioning, "_SLAB_BYTES", 512)
    params = _random_params(CONFIG)
    save_params(str(tmp_path / "p"), jax.tree_util.tree_map(LazyArray.of, params), CONFIG)

    arrays, config = open_params(str(tmp_path / "p"))
    assert config == CONFIG
    stores = jax.tree_util.tree_leaves(streaming.open_tree(str(tmp_path / "p" / "params"), arrays))
    assert {tuple(s.chunk_layout.read_chunk.shape)[0] for s in stores if s.rank == 4} == {1}  # a layer a chunk
    jax.tree_util.tree_map(np.testing.assert_array_equal, streaming.read_all(arrays), params)

    shardings = jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "model")
                                                               if x.shape[-1] % 4 == 0 else P()), params)
    placed, _ = load_params(str(tmp_path / "p"), shardings, dtype="bfloat16")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b.astype(ml_dtypes.bfloat16)),
                           placed, params)

    # The checksums written block by block are those of the whole arrays.
    import json

    manifest = json.loads((tmp_path / "p" / "integrity" / "metadata").read_text())
    names = integrity.leaf_names(params, "params/")
    digests = integrity.array_digests([jnp.asarray(x) for x in jax.tree_util.tree_leaves(params)])
    assert [manifest["items"]["params"][n]["digest"] for n in names] == digests


def test_a_damaged_source_leaves_no_output(tmp_path):
    params = _random_params(CONFIG)
    save_params(str(tmp_path / "p"), params, CONFIG)
    arrays, _ = open_params(str(tmp_path / "p"))
    checked = jax.tree_util.tree_leaves(arrays)[0].source
    checked.digests.add(0, np.ones((1,), np.float32), (0,) * len(checked.digests.shapes[0]))  # a read gone wrong
    from gptj.errors import CheckpointDamagedError

    with pytest.raises(CheckpointDamagedError, match="checksum mismatch"):
        save_params(str(tmp_path / "copy"), arrays, CONFIG)
    assert not (tmp_path / "copy").exists()
