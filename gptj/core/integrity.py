"""Checksums of saved arrays: a manifest written with every checkpoint and params directory, checked on every read.

`build_manifest` digests the arrays being saved; `restore_verified` reads a
saved directory with Orbax and checks every array against the manifest, on
whatever mesh it lands, with every process reaching the same verdict.

A manifest is a JSON object

    {"format": "gptj-integrity/1", "algorithm": "fmix32-sum",
     "items": {"params": {"params/blocks/attn/q_proj": {"shape": [...], "dtype": "float32",
                                                        "digest": "89ab01ef"}, ...},
               "train_state": {...},
               "data": {"json": "1c2d3e4f"}},
     "digest": "<crc32 of the rest>"}

with one entry per array (named by the item and its path in the tree) and
one per JSON item. Its own `digest` makes a damaged manifest read as damaged
rather than blame an array. It is written with the arrays: as an item of the
Orbax step (so a step is never complete without it), or last into a params
directory; a missing manifest reads as damage.

An array's digest does not depend on how the array is sharded: it is the sum,
modulo 2**32, of a 32-bit hash of every element mixed with that element's
position in the whole array. Each device hashes the shard it holds (one
replica per distinct shard; a CPU device's shard is hashed by numpy, in the
host memory it lies in), each process sums its devices' parts, and one
small allgather adds the processes' sums. So a checkpoint written on one mesh
verifies on any other, each process hashes only the data its devices hold,
and every process receives the same digests: the verdict is identical
everywhere. The sum is integer arithmetic, exact in any order. A damaged
element changes its term pseudo-randomly, so damage goes unnoticed with
probability about 2**-32 per array (as for a CRC-32), and values moved to
other positions are caught because the position is part of the hash. It runs
where the arrays are, as one pass over memory: no copy to the host, no
per-shard bookkeeping that would tie a checkpoint to the mesh that wrote it.
(A CRC of each written shard's bytes would be quicker on a CPU, but would
verify only a restore onto the mesh that wrote it.)
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import threading
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax import lax
from jax.experimental import multihost_utils

from gptj.core import storage
from gptj.errors import CheckpointDamagedError, CheckpointError, IntegrityError, StorageError

FORMAT = "gptj-integrity/1"
ALGORITHM = "fmix32-sum"
MANIFEST_ITEM = "integrity"  # the directory beside the array items that holds the manifest
JSON_FILE = "metadata"  # the file inside a JSON item's directory (what Orbax's JsonCheckpointHandler writes)
_MAX_MESSAGE = 2048  # bytes of an error message shared between processes

# Odd multipliers of murmur3's 32-bit finaliser and a golden-ratio constant that spreads positions.
_M1, _M2, _POSITION, _SEED = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B1, 0x7F4A7C15


def _key_name(key) -> str:
    """A tree path entry as text: a dict key, an attribute (namedtuple field) or a sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_names(tree: Any, prefix: str = "") -> list[str]:
    """Each leaf's path as 'a/b/0/c' (prefixed by `prefix/`), in flattening order."""
    return [prefix + "/".join(_key_name(k) for k in path) if path else prefix.rstrip("/")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _bit_width(dtype) -> int:
    """Bits per element (4 for int4/float4, whose numpy itemsize says 1 byte)."""
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.finfo(dtype).bits
    return jnp.dtype(dtype).itemsize * 8


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (8-byte types give two words per element, on a last axis)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = _bit_width(x.dtype)
    if bits < 8:  # int4, float4 and the like cannot be bitcast; their values are exact in 32 bits
        wide = jnp.int32 if jnp.issubdtype(x.dtype, jnp.integer) else jnp.float32
        return lax.bitcast_convert_type(x.astype(wide), jnp.uint32)
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint32}[bits]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _strides(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Each axis's step between neighbouring positions of an array of `shape` and `dtype`, in 32-bit words, mod 2**32.

    The position of an element (of its first word) is the sum over axes of its
    index times the axis's stride: its word offset in the C-ordered array.
    """
    strides, stride = [], 2 if _bit_width(dtype) == 64 else 1
    for n in reversed(shape):
        strides.insert(0, stride % 2**32)
        stride *= n
    return np.array(strides, np.uint32)


def _hash_block(block: jax.Array, offsets: jax.Array, strides: jax.Array) -> jax.Array:
    """Sum over the block's elements of mix(bits ^ key(position in the whole array)), mod 2**32.

    `mix` is murmur3's 32-bit finaliser (two odd multiplies and xor-shifts): a
    bijection, so two different values at one position never hash alike.

    `offsets` (uint32, one per axis) place the block in the whole array, whose
    `_strides` are `strides`. uint32 position arithmetic wraps for arrays of
    more than 2**32 words, which only stops it telling apart positions
    exactly 2**32 words apart.
    """
    words = _words(block)
    position = jnp.zeros(words.shape, jnp.uint32)
    for axis in range(block.ndim):
        index = lax.broadcasted_iota(jnp.uint32, words.shape, axis) + offsets[axis]
        position = position + index * strides[axis]
    if words.ndim > block.ndim:  # 8-byte types: two words per element, on a last axis
        position = position + lax.broadcasted_iota(jnp.uint32, words.shape, block.ndim)
    return jnp.sum(_mix(words, position, jnp.uint32), dtype=jnp.uint32)


def _mix(words, position, uint32):
    """Each element's hash: murmur3's finaliser of its bits xor a key of its position (jnp or numpy uint32 arrays)."""
    h = words ^ (position * uint32(_POSITION) + uint32(_SEED))
    h = h * uint32(_M1)
    h = h ^ (h >> 15)
    h = h * uint32(_M2)
    return h ^ (h >> 13)


# An accelerator's hash, compiled once per block shape, dtype and device (offsets and strides are arguments): the
# parameters, Adam's two moments and every layer of a scanned stack share a handful of shard shapes.
_device_hash = jax.jit(_hash_block)


def _shard_offsets(index: tuple[slice, ...]) -> np.ndarray:
    """Where a shard (`jax.Shard.index`) starts in its array, per axis."""
    return np.array([s.start or 0 for s in index], np.uint32)


def start_digests(tree: Any) -> list[list[jax.Array | int]]:
    """Starts hashing a tree's leaves: accelerators' shards in the background (JAX runs the work), CPU devices' and
    host arrays before it returns.

    Per leaf, the partial sums this process contributes: one per distinct
    shard its devices hold (the replica numbered 0 hashes it; other replicas
    of a shard, here or on other processes, contribute nothing), each hashed
    where it is, with no collective and no copy: on an accelerator by a small
    program on its device, on a CPU device by numpy (`block_digest`).
    Host arrays, which every process holds whole, are hashed by process 0 alone.
    """
    started: list[list[jax.Array | int]] = []
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array):
            started.append([_shard_digest(shard, x.shape, x.dtype)
                            for shard in x.addressable_shards if shard.replica_id == 0])
        elif jax.process_index() == 0:
            x = np.asarray(x)
            started.append([block_digest(x, (0,) * x.ndim, x.shape)])
        else:
            started.append([])
    return started


def _shard_digest(shard, global_shape: tuple[int, ...], dtype) -> jax.Array | int:
    """One shard's part of its array's digest: a jax scalar computed on its device, or an int for a CPU device.

    A CPU device's memory is the host's, so numpy hashes the shard where it lies. A device program compiles
    per shard shape and per device that runs it: a 4 x 2 mesh's first checkpoint of a tiny model compiled 36
    programs (1.0 s, more than hashing it took) for 27 leaves, in every process that saved or restored one.
    """
    offsets = _shard_offsets(shard.index)
    if shard.device.platform == "cpu":
        return block_digest(np.asarray(shard.data), tuple(int(o) for o in offsets), global_shape)
    return _device_hash(shard.data, offsets, _strides(global_shape, dtype))


def finish_digests(started: list[list[jax.Array | int]]) -> list[str]:
    """The digests `start_digests` started, 8 hex digits each, the same on every process (a collective)."""
    return _summed_over_processes([sum(int(part) for part in parts) for parts in started])


def _summed_over_processes(partial: list[int]) -> list[str]:
    """Digests (8 hex digits) from each process's partial sums: the same list on every process (a collective)."""
    totals = np.array([p % 2**32 for p in partial], np.uint32)
    if jax.process_count() > 1:
        totals = np.asarray(multihost_utils.process_allgather(totals)).astype(np.uint64).sum(axis=0)
    return [f"{int(t) % 2**32:08x}" for t in totals]


# Words `block_digest` hashes at once, in two buffers (1 MiB each) reused for every chunk. With a fresh array per
# operation over 4 MiB chunks it hashed 0.36-0.45 GB/s (0.69-0.78 with transparent huge pages), much of it the kernel
# zeroing the pages of new temporaries; in place, 0.8-1.5 GB/s on the same 2-core machine. Smaller chunks pay numpy's
# per-call cost more often (64 Ki words: 0.85 GB/s), bigger ones leave the cache (2 Mi words: 0.54-0.65 GB/s).
_HOST_WORDS = 1 << 18


def _host_words(x: np.ndarray) -> np.ndarray:
    """`_words` of a host array: its bits as uint32 words (8-byte types: two per element, on a last axis)."""
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    bits = _bit_width(x.dtype)
    if bits < 8:
        return x.astype(np.int32 if jnp.issubdtype(x.dtype, jnp.integer) else np.float32).view(np.uint32)
    if bits == 64:
        return np.ascontiguousarray(x).view(np.uint32).reshape(x.shape + (2,))
    return np.ascontiguousarray(x).view({8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]).astype(np.uint32, copy=False)


def _position_keys(shape: tuple[int, ...], offsets: tuple[int, ...], strides: np.ndarray) -> list[np.ndarray]:
    """Per axis of a block of uint32 words, (index * stride) * _POSITION mod 2**32, shaped to broadcast; _SEED added
    to the first. Summed over axes they give `_mix`'s `position * _POSITION + _SEED` (all wrapping mod 2**32)."""
    keys = []
    for axis, n in enumerate(shape):
        index = np.arange(n, dtype=np.uint64) + (offsets[axis] if axis < len(offsets) else 0)
        stride = int(strides[axis]) if axis < len(strides) else 1  # the word axis of 8-byte types
        key = (index * stride % 2**32 * _POSITION + (_SEED if axis == 0 else 0)) % 2**32
        keys.append(key.astype(np.uint32).reshape([-1 if a == axis else 1 for a in range(len(shape))]))
    return keys


def block_digest(block: np.ndarray, offsets: tuple[int, ...], global_shape: tuple[int, ...]) -> int:
    """The part of an array's digest that one host block contributes: `block` sits at `offsets` in `global_shape`.

    The digest is a sum over elements, so the parts of blocks that tile the
    array (any blocking, any order, any process) add up, modulo 2**32, to the
    digest `array_digests` gives the whole array: the same hash as
    `_hash_block`, computed with numpy on the host (no compilation per block
    shape), in place in two reused buffers, a bounded number of words at a time.
    """
    block = np.asarray(block)
    if block.ndim == 0 or block.size == 0:
        words = _host_words(block).reshape(1, -1)
        return int(_mix(words, np.arange(words.size, dtype=np.uint32), np.uint32).sum(dtype=np.uint64) % 2**32)
    per_element = 2 if _bit_width(block.dtype) == 64 else 1
    word_shape = block.shape + ((2,) if per_element == 2 else ())
    # Only the first axis's keys move from chunk to chunk: each chunk takes its rows of them.
    first, *others = _position_keys(word_shape, offsets, _strides(global_shape, block.dtype))
    row_words = block.size // block.shape[0] * per_element
    rows = min(block.shape[0], max(1, _HOST_WORDS // max(1, row_words)))
    h_buffer, shifted_buffer = np.empty(rows * row_words, np.uint32), np.empty(rows * row_words, np.uint32)
    total = 0
    for start in range(0, block.shape[0], rows):
        words = _host_words(block[start:start + rows])
        h, shifted = h_buffer[:words.size].reshape(words.shape), shifted_buffer[:words.size].reshape(words.shape)
        np.copyto(h, first[start:start + rows])
        for key in others:
            h += key
        h ^= words  # murmur3's finaliser, as `_mix`
        h *= np.uint32(_M1)
        np.right_shift(h, 15, out=shifted)
        h ^= shifted
        h *= np.uint32(_M2)
        np.right_shift(h, 13, out=shifted)
        h ^= shifted
        total += int(h.sum(dtype=np.uint32))  # wraps mod 2**32 as the digest does, 4x faster than a uint64 sum
    return total % 2**32


class StreamedDigests:
    """The digests of arrays that are read or written block by block, in any order (`add`).

    Every element must be added exactly once over all processes; `digests()`
    sums the processes' parts (a collective) and gives what `array_digests`
    gives for the whole arrays. Blocks are hashed in a background thread
    (numpy releases the GIL) while the caller goes on reading; at most two
    wait at once, and a block must not change once added.
    """

    def __init__(self, shapes: list[tuple[int, ...]]):
        self.shapes = [tuple(shape) for shape in shapes]
        self._partial = [0] * len(shapes)
        self._lock = threading.Lock()
        self._hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._pending: collections.deque = collections.deque()

    def add(self, index: int, block: np.ndarray, offsets: tuple[int, ...]) -> None:
        """Counts `block`, which sits at `offsets` in array `index`."""
        while len(self._pending) >= 2:
            self._pending.popleft().result()
        self._pending.append(self._hasher.submit(self._count, index, block, offsets))

    def _count(self, index: int, block: np.ndarray, offsets: tuple[int, ...]) -> None:
        part = block_digest(block, offsets, self.shapes[index])
        with self._lock:
            self._partial[index] = (self._partial[index] + part) % 2**32

    def digests(self) -> list[str]:
        """Each array's digest (8 hex digits), the same on every process. Every process must call it."""
        while self._pending:
            self._pending.popleft().result()
        return _summed_over_processes(self._partial)


def array_digests(tree: Any) -> list[str]:
    """Each leaf's digest (8 hex digits) in flattening order; every process gets the same.

    Every process must call it: the per-process sums meet in one small
    allgather. Device arrays are hashed shard by shard where they are, each
    process hashing the distinct shards its devices hold; host (numpy)
    arrays, which every process holds whole, are hashed by process 0 alone,
    one at a time (a converter's tree is never on the device at once).
    """
    return finish_digests(start_digests(tree))


def json_digest(value: Any) -> str:
    """CRC-32 of a JSON value's canonical text (what a JSON item restores to, whatever its key order)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(text.encode()):08x}"


# --- the manifest ---------------------------------------------------------------------------------------------


def _dtype_name(leaf: Any) -> str:
    """The dtype a leaf is saved in, by name ("float32", "bfloat16", ...)."""
    return str(np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype))


def build_manifest(arrays: Mapping[str, Any], json_items: Mapping[str, Any] | None = None,
                   digests: Mapping[str, list[str]] | None = None) -> dict[str, Any]:
    """The manifest of array items {name: tree} and JSON items {name: value}. Every process must call it.

    `digests` {item: the digests of its leaves}: for items whose digests were
    taken as they were written (`StreamedDigests`), instead of from the arrays.
    """
    items: dict[str, Any] = {}
    for item, tree in arrays.items():
        leaves = jax.tree_util.tree_leaves(tree)
        found = (digests or {}).get(item) or array_digests(tree)
        items[item] = {name: {"shape": list(np.shape(leaf)), "dtype": _dtype_name(leaf), "digest": digest}
                       for name, leaf, digest in zip(leaf_names(tree, item + "/"), leaves, found)}
    items.update({item: {"json": json_digest(value)} for item, value in (json_items or {}).items()})
    body = {"format": FORMAT, "algorithm": ALGORITHM, "items": items}
    return dict(body, digest=json_digest(body))


def check_manifest(manifest: Any) -> dict[str, Any]:
    """The manifest's items, after checking its format and its own digest (IntegrityError if either fails)."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError("checksum manifest", f"not a {FORMAT} manifest")
    body = {k: v for k, v in manifest.items() if k != "digest"}
    if json_digest(body) != manifest.get("digest"):
        raise IntegrityError("checksum manifest", "damaged (its own checksum does not match)")
    if manifest.get("algorithm") != ALGORITHM:
        raise IntegrityError("checksum manifest", f"unknown checksum algorithm {manifest.get('algorithm')!r}")
    return manifest["items"]


def manifest_path(directory: str) -> str:
    """The checksum manifest of a checkpoint step or params directory (beside its array items)."""
    return os.path.join(directory, MANIFEST_ITEM, JSON_FILE)


# --- checked reading ------------------------------------------------------------------------------------------


class Misfit(Exception):
    """The saved tree is intact but is not the target's (another model or optimizer)."""


def _saved_layout(entries: Mapping[str, Any], target: Any, item: str) -> Any:
    """`target` with the saved dtypes, once its structure and shapes match the manifest (else Misfit).

    Reading in the saved dtype is what lets the digests be checked; the
    caller casts afterwards.
    """
    names = leaf_names(target, item + "/")
    missing = [n for n in names if n not in entries]
    if missing:
        raise Misfit(f"the saved {item} has no {missing[0]}")
    extra = sorted(set(entries) - set(names))
    if extra:
        raise Misfit(f"the saved {item} has {extra[0]}, which this state lacks")
    leaves, treedef = jax.tree_util.tree_flatten(target)
    out = []
    for name, leaf in zip(names, leaves):
        shape = tuple(entries[name]["shape"])
        if tuple(leaf.shape) != shape:
            raise Misfit(f"{name} is saved with shape {shape}, expected {tuple(leaf.shape)}")
        out.append(jax.ShapeDtypeStruct(shape, jnp.dtype(entries[name]["dtype"]),
                                        sharding=getattr(leaf, "sharding", None)))
    return jax.tree_util.tree_unflatten(treedef, out)


def open_manifest(directory: str, arrays: Mapping[str, Any], json_items: tuple[str, ...] = ()):
    """(manifest entries, {item: target in the saved dtypes}), as this process reads them.

    IntegrityError for a missing, damaged or incomplete manifest; a target
    whose structure or shapes differ from what was saved raises `Misfit`.
    """
    try:
        entries = check_manifest(storage.read_json(manifest_path(directory)))
    except FileNotFoundError:
        raise IntegrityError("checksum manifest", "missing") from None
    except (OSError, ValueError) as e:
        if isinstance(e, IntegrityError) or storage.storage_fault(e):
            raise
        raise IntegrityError("checksum manifest", f"unreadable ({storage.reason(e)})") from e
    missing = [item for item in (*arrays, *json_items) if item not in entries]
    if missing:
        raise IntegrityError(missing[0], "not in the checksum manifest")
    return entries, {item: _saved_layout(entries[item], target, item) for item, target in arrays.items()}


def _read_tree(path: str, target: Any) -> Any:
    """The Orbax tree at `path` as `target` (ShapeDtypeStructs; `ocp.PLACEHOLDER` leaves are skipped)."""
    # Orbax's handler, not its Checkpointer: the latter ends with a cross-process barrier that a process whose
    # read failed never reaches. The processes agree on the outcome through `agreed` instead.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.restore(epath.Path(os.path.abspath(path)), args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    finally:
        handler.close()


def _only(layout: Any, indices: list[int]) -> Any:
    """`layout` with every leaf not in `indices` replaced by Orbax's PLACEHOLDER (not read)."""
    leaves, treedef = jax.tree_util.tree_flatten(layout)
    keep = set(indices)
    return jax.tree_util.tree_unflatten(treedef, [x if i in keep else ocp.PLACEHOLDER for i, x in enumerate(leaves)])


def _read_leaves(directory: str, layout: Any, item: str, indices: list[int]) -> list[Any]:
    """Leaves `indices` of item `item`; a read failure is an IntegrityError naming the first array that fails."""
    path = os.path.join(directory, item)
    if not os.path.isdir(path):
        raise IntegrityError(item, "missing")
    whole = len(indices) == len(jax.tree_util.tree_leaves(layout))
    try:
        leaves = jax.tree_util.tree_leaves(_read_tree(path, layout if whole else _only(layout, indices)))
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged data
        if storage.storage_fault(e):
            raise
        names = leaf_names(layout, item + "/")
        for i in indices if len(indices) > 1 else ():  # which one? each alone, in tree order
            try:
                _read_tree(path, _only(layout, [i]))
            except Exception as single:  # noqa: BLE001
                raise IntegrityError(names[i], f"unreadable ({storage.reason(single)})") from e
        raise IntegrityError(names[indices[0]] if len(indices) == 1 else item,
                             f"unreadable ({storage.reason(e)})") from e
    if whole:
        return leaves
    return [leaf for leaf in leaves if leaf is not ocp.PLACEHOLDER]


def _read_json_items(directory: str, entries: Mapping[str, Any], items: tuple[str, ...]) -> dict[str, Any]:
    """{item: value} of JSON items, each checked against its manifest entry."""
    values = {}
    for item in items:
        try:
            values[item] = storage.read_json(os.path.join(directory, item, JSON_FILE))
        except FileNotFoundError:
            raise IntegrityError(item, "missing") from None
        except (OSError, ValueError) as e:
            if storage.storage_fault(e):
                raise
            raise IntegrityError(item, f"unreadable ({storage.reason(e)})") from e
        if entries[item].get("json") != json_digest(values[item]):
            raise IntegrityError(item, "checksum mismatch")
    return values


def _agree(error: tuple[str, str] | None) -> tuple[str, str] | None:
    """The first process's (kind, message) error, or None: the same answer on every process (a collective)."""
    if jax.process_count() == 1:
        return error
    text = "" if error is None else f"{error[0]}\n{error[1]}"
    buffer = np.zeros(_MAX_MESSAGE, np.uint8)
    encoded = text.encode()[:_MAX_MESSAGE]
    buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    for row in np.asarray(multihost_utils.process_allgather(buffer)):
        found = bytes(row).rstrip(b"\0").decode(errors="replace")
        if found:
            kind, message = found.split("\n", 1)
            return kind, message
    return None


def agreed(directory: str, step: int | None, read: Callable[[], Any]) -> Any:
    """Runs `read` (this process's part of a restore); then every process raises the same error, or none does.

    A read error may hit one process only (the one whose devices hold a bad
    shard); the others must not carry on alone into the next collective.
    """
    local = value = None
    try:
        value = read()
    except IntegrityError as e:
        local = ("damaged", f"{e.what}\n{e.reason}")
    except Misfit as e:
        local = ("misfit", f"{directory} does not fit this model/optimizer: {e}")
    except Exception as e:  # noqa: BLE001 - shared with the other processes as one line, below
        fault = storage.storage_fault(e)
        local = ("storage" if fault else "error", f"cannot read {directory}: {fault or storage.reason(e)}")
        logging.info("reading %s failed", directory, exc_info=True)
    outcome = _agree(local)
    if outcome is None:
        return value
    kind, message = outcome
    if kind == "damaged":
        what, why = message.split("\n", 1)
        raise CheckpointDamagedError(directory, what, why, step)
    raise (StorageError if kind == "storage" else CheckpointError)(message)


def restore_verified(directory: str, arrays: Mapping[str, Any], json_items: tuple[str, ...] = (),
                     step: int | None = None) -> dict[str, Any]:
    """Reads the array items {name: target tree} and JSON items of a step or params directory, checked.

    Targets are trees of ShapeDtypeStructs: the arrays land on their
    shardings (any mesh) and in their dtypes (read in the saved dtype,
    checked, then cast). The items are read concurrently, and each is hashed
    while the next one is still being read. (Params directories are read box
    by box instead: `gptj.weights.params_dir.open_params`.) Every process must call
    this, and every process gets the same outcome: CheckpointDamagedError (checksum
    mismatch, unreadable or missing data, damaged manifest), StorageError
    (e.g. permission denied) or CheckpointError (the target is another model
    or optimizer, or an unexpected failure, which never counts as damage).
    """
    entries, layouts = agreed(directory, step, lambda: open_manifest(directory, arrays, json_items))
    leaves = {item: [None] * len(jax.tree_util.tree_leaves(layout)) for item, layout in layouts.items()}
    pending = None  # the part read last, being hashed while the next one is read

    def finish(item, chunk, read, started):  # compares a part's digests with the manifest, then casts it
        names, targets = leaf_names(layouts[item], item + "/"), jax.tree_util.tree_leaves(arrays[item])
        for i, leaf, digest in zip(chunk, read, finish_digests(started)):
            saved = entries[item][names[i]]["digest"]
            if saved != digest:
                raise CheckpointDamagedError(
                    directory, names[i], f"checksum mismatch (saved {saved}, read {digest})", step)
            leaves[item][i] = leaf if leaf.dtype == targets[i].dtype else leaf.astype(targets[i].dtype)

    chunks = [(item, list(range(len(leaves[item])))) for item in layouts]
    ahead = len(chunks)  # every item read at once
    reads: dict[int, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=ahead) as pool:

        def submit(k):  # starts reading part k in the background
            if k < len(chunks):
                item, chunk = chunks[k]
                reads[k] = pool.submit(_read_leaves, directory, layouts[item], item, chunk)

        for k in range(ahead):
            submit(k)
        try:
            for k, (item, chunk) in enumerate(chunks):
                try:
                    read = agreed(directory, step, reads.pop(k).result)
                finally:  # a bad array read before this one is named first, whatever happens here
                    if pending is not None:
                        finish(*pending)
                        pending = None
                submit(k + ahead)
                pending = (item, chunk, read, start_digests(read))
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    if pending is not None:
        finish(*pending)
    restored = {item: jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(arrays[item]), leaves[item])
                for item in layouts}
    restored.update(agreed(directory, step, lambda: _read_json_items(directory, entries, json_items)))
    return restored
