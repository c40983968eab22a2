"""Arrays read and written a box at a time, so that no host ever holds a whole model.

A `LazyArray` stands for an array on disk (or computed from one): `read(box)`
reads one box of it, `astype` casts each box as it is read, `rows` is a slab
along the leading axis (layers of a leaf stacked over layers), and
`np.asarray` reads it whole. Weight readers give trees of them (HF safetensors,
mesh-transformer-jax shards, an Orbax tree: `open_tree`); the consumers take
them a block at a time: `save_tree` writes an Orbax tree block by block,
`gptj.core.partitioning.place` reads into each device only the boxes it owns.

A source that can check what it reads (an Orbax tree with its checksums) is
the `source` of its arrays: it counts every box read as `primary` (each
element exactly once over all processes) and `verify` then compares the
sums with what was saved. `finish_reading` calls it for every source of a
tree once a consumer is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import itertools
import math
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

Box = tuple[slice, ...]
# A box reader: (box with concrete bounds, dtype to return, primary) -> the box's values as a host array.
Reader = Callable[[Box, np.dtype, bool], np.ndarray]

# Bytes of one block that `blocks` gives: a layer of a large leaf, several layers of a small one.
BLOCK_BYTES = 16 << 20
# Largest stored chunk of a streamed Orbax array (see `chunk_shape`); arrays are written a chunk at a time.
CHUNK_BYTES = 16 << 20
# Smallest part of a replicated array that Orbax splits off for one replica to write (replica-parallel saving).
# Each split is a slice program compiled for that shape and offset (about 0.1 s on a CPU, more on a TPU), while
# writing a MiB takes well under a millisecond: smaller arrays are written whole by their first replica.
REPLICA_SLICE_MIN_BYTES = 1 << 20


def _serve_large_allocations_by_mmap() -> None:
    """Makes glibc's malloc give every block of 1 MiB or more its own mapping, returned to the OS when freed.

    Streaming allocates and frees a block after another (tens of MiB each).
    By default glibc raises its mmap threshold to the size of the last large
    block freed, so the next blocks come from its heap and stay there once
    freed: resident memory then grows with everything streamed, not with
    what is held. A fixed threshold keeps resident memory to what is held.
    A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_serve_large_allocations_by_mmap()


class Source(Protocol):
    """What checks the arrays it gives out once they have all been read (see the module docstring)."""

    def verify(self, error: BaseException | None = None) -> None:
        """Raises if what was read is damaged, or `error` (a read that failed in this process), on every process."""


def full_box(shape: tuple[int, ...]) -> Box:
    """The box of a whole array."""
    return tuple(slice(0, n) for n in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    """The shape of a box with concrete bounds."""
    return tuple(s.stop - s.start for s in box)


def _normalize(box: Box | None, shape: tuple[int, ...]) -> Box:
    """`box` with concrete, in-range bounds (None: the whole array)."""
    if box is None:
        return full_box(shape)
    if len(box) != len(shape):
        raise ValueError(f"a box of {len(box)} dimensions for an array of shape {shape}")
    out = []
    for s, n in zip(box, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError("boxes have unit steps")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


class LazyArray:
    """An array read box by box on the host (see the module docstring).

    `read(box, dtype, primary)` is the source's own reader: it returns the
    box's values in `dtype`, counting them for the source's checks when
    `primary`.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, read: Reader, source: Source | None = None):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self._read = read
        self.source = source

    @classmethod
    def of(cls, x: Any) -> "LazyArray":
        """A host array (numpy or fully addressable jax), as a LazyArray; a LazyArray as itself."""
        if isinstance(x, LazyArray):
            return x
        x = np.asarray(x)
        return cls(x.shape, x.dtype, lambda box, dtype, primary: np.asarray(x[box], dtype))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype})"

    def read(self, box: Box | None = None, primary: bool = True) -> np.ndarray:
        """The values in `box` (default: all), as a new host array of `self.dtype`."""
        box = _normalize(box, self.shape)
        out = self._read(box, self.dtype, primary)
        if out.shape != box_shape(box) or out.dtype != self.dtype:
            raise AssertionError(f"reader gave {out.dtype}{list(out.shape)} for {self.dtype}{list(box_shape(box))}")
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.read()
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def astype(self, dtype: Any) -> "LazyArray":
        """This array cast to `dtype` box by box, as it is read (no copy in the source's dtype is kept)."""
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        return LazyArray(self.shape, dtype, self._read, self.source)

    def rows(self, start: int, stop: int) -> "LazyArray":
        """`self[start:stop]`: a slab along the leading axis (layers of a stacked leaf), read lazily."""
        def read(box: Box, dtype: np.dtype, primary: bool) -> np.ndarray:
            return self._read((slice(start + box[0].start, start + box[0].stop),) + box[1:], dtype, primary)

        return LazyArray((stop - start,) + self.shape[1:], self.dtype, read, self.source)

    def blocks(self, max_bytes: int | None = None) -> Iterator[tuple[Box, np.ndarray]]:
        """(box, values) slabs along the leading axis of at most `max_bytes` (default `BLOCK_BYTES`; at least one
        row), covering the array once."""
        max_bytes = max_bytes or BLOCK_BYTES
        if self.ndim == 0:
            yield (), self.read(())
            return
        row_bytes = max(1, self.nbytes // max(1, self.shape[0]))
        rows = max(1, max_bytes // row_bytes)
        for start in range(0, self.shape[0], rows):
            box = (slice(start, min(start + rows, self.shape[0])),) + full_box(self.shape[1:])
            yield box, self.read(box)


def finish_reading(tree: Any, error: BaseException | None = None) -> None:
    """Checks the sources of a tree's LazyArrays once a consumer has read them (every process must call it).

    `error` is what stopped this process's reading, if anything: a checked
    source shares it with the other processes, so that all raise the same
    error; without one it is raised here.
    """
    sources = []
    for leaf in jax.tree_util.tree_leaves(tree):
        source = getattr(leaf, "source", None)
        if isinstance(leaf, LazyArray) and source is not None and all(source is not s for s in sources):
            sources.append(source)
    for source in sources:
        source.verify(error)
        error = None  # shared and raised by the first source
    if error is not None:
        raise error


def read_all(tree: Any) -> Any:
    """A tree of LazyArrays read whole into host arrays, their sources checked."""
    error = None
    try:
        values = jax.tree_util.tree_map(np.asarray, tree)
    except Exception as e:  # noqa: BLE001 - shared with the other processes and raised by finish_reading
        error = e
    finish_reading(tree, error)
    return values


def read_through(tree: Any) -> None:
    """Reads every LazyArray of a tree block by block, keeping nothing, then checks their sources."""
    error = None
    try:
        for leaf in jax.tree_util.tree_leaves(tree):
            for _ in leaf.blocks():
                pass
    except Exception as e:  # noqa: BLE001 - shared with the other processes and raised by finish_reading
        error = e
    finish_reading(tree, error)


# --- Orbax trees, block by block --------------------------------------------------------------------------------


def chunk_shape(shape: tuple[int, ...], itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """The chunks an array is stored in: rows first (whole trailing axes), each chunk at most `max_bytes`.

    The leading axis is halved until a chunk fits (a slab of layers, or of
    embedding rows); if one row is still too large, its largest axis is
    halved in turn. So `blocks`, `place` and a reader that goes a layer or a
    slab of rows at a time decode each chunk about once.
    """
    chunk = list(shape)
    while chunk and math.prod(chunk) * itemsize > max_bytes:
        axis = 0 if chunk[0] > 1 else max(range(len(chunk)), key=lambda a: chunk[a])
        if chunk[axis] == 1:
            break
        chunk[axis] = -(-chunk[axis] // 2)
    return tuple(max(1, n) for n in chunk)


def chunk_boxes(shape: tuple[int, ...], chunk: tuple[int, ...]) -> Iterator[Box]:
    """The boxes of the chunks of an array of `shape` stored in `chunk` chunks, in C order."""
    starts = [range(0, n, c) for n, c in zip(shape, chunk)]
    for corner in itertools.product(*starts):
        yield tuple(slice(a, min(a + c, n)) for a, c, n in zip(corner, chunk, shape))


def _with_chunks(tspec: dict[str, Any], chunk: tuple[int, ...]) -> dict[str, Any]:
    """Orbax's zarr (v2, or v3 with its sharding codec) write spec with `chunk` as the stored chunk shape."""
    tspec = dict(tspec)
    if "base" in tspec:  # a cast driver over the stored array
        tspec["base"] = _with_chunks(tspec["base"], chunk)
        return tspec
    metadata = tspec["metadata"] = dict(tspec["metadata"])
    if "chunks" in metadata:
        metadata["chunks"] = list(chunk)
    else:
        metadata["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": list(chunk)}}
        for codec in metadata.get("codecs", []):
            if codec.get("name") == "sharding_indexed":
                codec["configuration"]["chunk_shape"] = list(chunk)
    return tspec


class _BlockWriter(ocp.type_handlers.NumpyHandler):
    """Writes LazyArray leaves into an Orbax tree one block at a time, one leaf after another.

    The leaves are recorded as numpy arrays ("np.ndarray" in the tree's
    metadata), so any Orbax reader restores them as it would arrays saved
    whole; they are stored in `chunk_shape` chunks. Like Orbax's numpy
    handler, it writes from process 0.
    """

    def __init__(self, chunk_bytes: int):
        super().__init__(deepcopy_host_arrays=False)  # nothing to copy: the leaves are read as they are written
        self._chunk_bytes = chunk_bytes
        self._one_leaf_at_a_time: asyncio.Lock | None = None

    async def _open_and_write(self, value: LazyArray, tspec: dict[str, Any], ts_context: ts.Context):
        if self._one_leaf_at_a_time is None:
            self._one_leaf_at_a_time = asyncio.Lock()
        chunk = chunk_shape(value.shape, value.dtype.itemsize, self._chunk_bytes)
        store = await ts.open(ts.Spec(_with_chunks(tspec, chunk)), create=True, open=True, context=ts_context)
        async with self._one_leaf_at_a_time:
            # A chunk at a time, each written whole (never read back and merged); the next chunk is read (in a
            # thread) while the last one is written: two chunks in memory at most.
            boxes = iter(chunk_boxes(value.shape, chunk))

            def read_next():
                box = next(boxes, None)
                return None if box is None else (box, value.read(box))

            block = await asyncio.to_thread(read_next)
            while block is not None:
                written = store[block[0]].write(block[1])
                block = await asyncio.to_thread(read_next)
                await written


def array_handler() -> ocp.type_handlers.ArrayHandler:
    """Orbax's jax.Array handler, splitting only slices of `REPLICA_SLICE_MIN_BYTES` or more between replicas.

    Orbax's default splits every replicated array, however small; a model's
    biases, norms and LoRA factors then cost a compiled slice per shape and
    replica at the first save of each process (74 compiles, 6 s, for a tiny
    model on 8 CPU devices) and save nothing worth measuring.
    """
    default = ocp.type_handlers.get_type_handler(jax.Array)
    # The same array metadata store as Orbax's default handler, so the checkpoint's files are the same.
    return ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_SLICE_MIN_BYTES,
                                          array_metadata_store=getattr(default, "_array_metadata_store", None))


def type_handler_registry(*extra: tuple[Any, ocp.type_handlers.TypeHandler]):
    """Orbax's type handlers, with `array_handler()` for jax.Arrays, and `extra` (type, handler) pairs."""
    standard = [(t, ocp.type_handlers.get_type_handler(t)) for t in (int, float, bytes, str, np.number, np.ndarray)]
    return ocp.type_handlers.create_type_handler_registry(
        *extra, *standard, (jax.Array, array_handler()))  # later pairs win typestr lookups


def save_tree(path: str, tree: Any, chunk_bytes: int | None = None) -> None:
    """Saves a tree of LazyArrays (numpy and jax arrays too) as an Orbax tree at `path`, block by block.

    Each LazyArray is stored in chunks of at most `chunk_bytes` (default
    `CHUNK_BYTES`; `chunk_shape`:
    a slab of rows, or part of one row), so that readers of a layer or a slab
    decode little else. Every process must call it; LazyArrays are read and
    written by process 0.
    """
    writer = _BlockWriter(chunk_bytes or CHUNK_BYTES)
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=type_handler_registry((LazyArray, writer)))
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(tree))


class _Opened:
    """The restore type under which `_Opener` gives a tree's arrays as opened TensorStores."""


class _Opener(ocp.type_handlers.NumpyHandler):
    """Opens saved arrays (of any Orbax array type) without reading them.

    Every store shares one chunk cache, as large as the largest stored chunk:
    a reader that takes a leaf stored in one chunk a layer at a time decodes
    that chunk once.
    """

    def typestr(self) -> str:
        return "gptj.opened"

    async def deserialize(self, infos, args=None):
        specs = [ts.Spec(ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=info.is_ocdbt_checkpoint))
                 for info in infos]
        stores = await asyncio.gather(*[ts.open(spec, open=True, read=True, context=info.ts_context)
                                        for spec, info in zip(specs, infos)])
        largest = max((math.prod(s.chunk_layout.read_chunk.shape) * s.dtype.numpy_dtype.itemsize for s in stores),
                      default=0)
        cached = ts.Context({"cache_pool": {"total_bytes_limit": int(largest)}}, parent=infos[0].ts_context)
        return await asyncio.gather(*[ts.open(spec, open=True, read=True, context=cached) for spec in specs])


def open_tree(path: str, structure: Any) -> Any:
    """The arrays of the Orbax tree at `path`, opened, as TensorStores in a tree like `structure`.

    Nothing is read but the metadata; `store[box].read().result()` reads a box.
    """
    target = jax.tree_util.tree_map(lambda _: 0, structure)
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=_Opened), structure)
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=type_handler_registry((_Opened, _Opener())))
    try:
        return handler.restore(epath.Path(path), args=ocp.args.PyTreeRestore(target, restore_args=restore_args))
    finally:
        handler.close()
