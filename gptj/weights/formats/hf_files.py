"""HuggingFace weight files, one tensor (or one box of a tensor) at a time: safetensors both ways, `.bin` in.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`
and the tensors' bytes back to back after it. `WeightFiles` reads the headers
of every file of a checkpoint (single file or sharded with an index) up front
and then reads a box of one tensor by mapping a few of its rows at a time
(`np.memmap`, unmapped once their part of the box is copied out): the host
holds the box, never the file. `.bin` (torch pickle) files are memory-mapped the same way,
one file at a time (`torch.load(mmap=True)`), and reopened for each read so
that no more than one tensor's pages stay mapped.

`ShardedWriter` writes a sharded safetensors checkpoint whose tensors are all
known in advance: their offsets are planned from the shapes, so each tensor
is written straight to its place whenever it is ready, in any order, and the
host holds one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from typing import Any

import ml_dtypes
import numpy as np

from gptj.errors import WeightsError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# HF's default shard size (`save_pretrained(max_shard_size="5GB")`): decimal gigabytes, as HF counts them.
DEFAULT_MAX_SHARD_SIZE = "5GB"

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
# Bytes of a safetensors file mapped at once by a read.
_MAPPED_BYTES = 16 << 20
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from a size as HF writes it: 5GB (10^9), 500MB, 2GiB (2^30), or a plain number of bytes."""
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"a shard size must be positive, got {text}")
        return text
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not found:
        raise ValueError(f"not a size: {text!r} (write e.g. 5GB, 500MB, 2GiB or a number of bytes)")
    size = int(float(found.group(1)) * _SIZE_UNITS[found.group(2) or "B"])
    if size <= 0:
        raise ValueError(f"a shard size must be positive, got {text!r}")
    return size


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where one tensor's bytes are: its file, dtype and shape, and (safetensors) its byte offset in the file."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int = -1  # -1: in a .bin file, found by name


def _read_header(path: str) -> dict[str, _Tensor]:
    """The tensors of one safetensors file, from its header; WeightsError for a damaged or truncated file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        tensors, end = {}, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            tensors[name] = _Tensor(path, np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"]), 8 + length + begin)
            end = max(end, 8 + length + stop)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise WeightsError(f"{path}: unreadable weights file ({type(e).__name__}: {e})") from e
    if end > size:
        raise WeightsError(f"{path}: unreadable weights file (truncated: {size} bytes, its header describes {end})")
    return tensors


def _load_bin(path: str) -> tuple[dict[str, Any], bool]:
    """(a .bin file's tensors, whether they are memory-mapped): the legacy, non-zip format cannot be, and is read whole."""
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as e:
            if "zip" not in str(e).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as e:  # torch raises assorted types for damaged files
        raise WeightsError(f"{path}: unreadable weights file ({type(e).__name__}: {e})") from e


class WeightFiles:
    """The tensors of an HF checkpoint directory, read a box at a time (see the module docstring).

    `bytes_read` counts the bytes of every box read (in the stored dtype):
    what this process took from the files.
    """

    def __init__(self, hf_dir: str):
        self.tensors: dict[str, _Tensor] = {}
        self.bytes_read = 0
        self._legacy_bin: tuple[str, dict[str, Any]] | None = None  # the one non-mappable .bin file held
        for path in _weight_files(hf_dir):
            if path.endswith(".safetensors"):
                self.tensors.update(_read_header(path))
            else:
                state = _load_bin(path)[0]
                self.tensors.update({name: _Tensor(path, _torch_dtype(t), tuple(t.shape)) for name, t in state.items()})
                del state

    def read(self, name: str, box: tuple[slice, ...], dtype: Any) -> np.ndarray:
        """The box `box` (concrete bounds) of tensor `name`, as a new host array of `dtype`."""
        tensor = self.tensors[name]
        self.bytes_read += math.prod(s.stop - s.start for s in box) * tensor.dtype.itemsize
        if tensor.offset < 0:
            return self._read_bin(tensor, name, box, dtype)
        if not tensor.shape:
            return np.array(np.memmap(tensor.path, tensor.dtype, "r", tensor.offset, ()), dtype=dtype)
        out = np.empty(tuple(s.stop - s.start for s in box), dtype)
        row_bytes = max(1, math.prod(tensor.shape[1:]) * tensor.dtype.itemsize)
        if all(s.start == 0 and s.stop == n for s, n in zip(box[1:], tensor.shape[1:])):
            # Whole rows are contiguous bytes: read straight into the result (cast after, if asked).
            stored = out if out.dtype == tensor.dtype else np.empty(out.shape, tensor.dtype)
            with open(tensor.path, "rb") as f:
                f.seek(tensor.offset + box[0].start * row_bytes)
                if f.readinto(memoryview(stored.reshape(-1).view(np.uint8))) != stored.nbytes:
                    raise WeightsError(f"{tensor.path}: unreadable weights file (truncated inside {name})")
            if stored is not out:
                out[...] = stored
            return out
        # A few rows mapped at a time: a box of columns touches every page of its rows, and a mapping's
        # touched pages stay resident until it is unmapped.
        step = max(1, _MAPPED_BYTES // row_bytes)
        for start in range(box[0].start, box[0].stop, step):
            stop = min(start + step, box[0].stop)
            mapped = np.memmap(tensor.path, tensor.dtype, "r", tensor.offset + start * row_bytes,
                               (stop - start,) + tensor.shape[1:])
            out[start - box[0].start:stop - box[0].start] = mapped[(slice(None),) + box[1:]]
            del mapped  # unmapped: its pages leave this process
        return out

    def _read_bin(self, tensor: _Tensor, name: str, box: tuple[slice, ...], dtype: Any) -> np.ndarray:
        import torch

        if self._legacy_bin is not None and self._legacy_bin[0] == tensor.path:
            state = self._legacy_bin[1]
        else:
            self._legacy_bin = None
            state, mapped = _load_bin(tensor.path)
            if not mapped:  # read whole: kept for the next read rather than read again
                self._legacy_bin = (tensor.path, state)
        part = state[name][box]
        if part.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            values = part.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            values = part.numpy()
        return np.array(values, dtype=dtype)


def _torch_dtype(tensor) -> np.dtype:
    import torch

    if tensor.dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(torch.empty((), dtype=tensor.dtype).numpy().dtype)


def _weight_files(hf_dir: str) -> list[str]:
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index_path = os.path.join(hf_dir, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise WeightsError(f"{index_path}: unreadable index ({type(e).__name__}: {e})") from e
            return [os.path.join(hf_dir, name) for name in files]
    for name in (SAFETENSORS_FILE, TORCH_FILE):
        if os.path.isfile(os.path.join(hf_dir, name)):
            return [os.path.join(hf_dir, name)]
    raise WeightsError(f"{hf_dir}: no weights ({SAFETENSORS_FILE}, {TORCH_FILE} or a sharded index)")


def weight_files_present(out_dir: str) -> list[str]:
    """The HF weight files and indexes already in `out_dir` (what a new export must not overwrite)."""
    if not os.path.isdir(out_dir):
        return []
    pattern = re.compile(r"(model.*\.safetensors|pytorch_model.*\.bin)(\.index\.json)?")
    return sorted(n for n in os.listdir(out_dir) if pattern.fullmatch(n) or n == "config.json")


class ShardedWriter:
    """Writes safetensors shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own).

    `tensors` is every (name, shape, dtype) in file order; `write` then puts
    each one's values at its planned place, in any order. Files are written
    under temporary names; `commit` renames them (`model.safetensors`, or
    `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json`)
    once every tensor is written, and `abort` removes them.
    """

    def __init__(self, out_dir: str, tensors: list[tuple[str, tuple[int, ...], Any]], max_shard_bytes: int):
        self.out_dir = out_dir
        shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in tensors:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), np.dtype(dtype)))
            size += nbytes
        n = len(shards)
        self.names = [SAFETENSORS_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.total = sum(math.prod(shape) * dtype.itemsize for shard in shards for _, shape, dtype in shard)
        self._places: dict[str, tuple[int, int, int]] = {}  # name -> (file, offset, bytes)
        self._row_bytes = {name: math.prod(shape[1:]) * np.dtype(dtype).itemsize for name, shape, dtype in tensors}
        self._files: list[Any] = []
        self._unwritten = {name: math.prod(shape) * np.dtype(dtype).itemsize for name, shape, dtype in tensors}
        try:
            for k, shard in enumerate(shards):
                self._start_file(k, shard)
        except BaseException:
            self.abort()
            raise

    def _temporary(self, k: int) -> str:
        return os.path.join(self.out_dir, f".{self.names[k]}.partial")

    def _start_file(self, k: int, shard: list[tuple[str, tuple[int, ...], np.dtype]]) -> None:
        """Opens shard k's temporary file with its header written and its full size allocated."""
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in shard:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        f = open(self._temporary(k), "wb")
        self._files.append(f)
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
        for name, _, _ in shard:
            begin, stop = header[name]["data_offsets"]
            self._places[name] = (k, 8 + len(text) + begin, stop - begin)

    def write(self, name: str, values: np.ndarray, row: int = 0) -> None:
        """Writes tensor `name` (its planned dtype), or the rows of it from `row` on, to its place."""
        k, offset, nbytes = self._places[name]
        data = np.ascontiguousarray(values).view(np.uint8).reshape(-1)
        start = row * self._row_bytes[name]
        if start + data.size > nbytes:
            raise AssertionError(f"{name}: {data.size} bytes from row {row} overrun its {nbytes}")
        done = 0
        while done < data.size:
            done += os.pwrite(self._files[k].fileno(), data[done:], offset + start + done)
        self._unwritten[name] -= data.size
        if not self._unwritten[name]:
            del self._unwritten[name]

    def commit(self) -> None:
        """Closes the files and gives them their names, with the index for several shards."""
        if self._unwritten:
            raise AssertionError(f"tensors never written: {sorted(self._unwritten)[:5]}")
        for f in self._files:
            f.close()
        for k, name in enumerate(self.names):
            os.replace(self._temporary(k), os.path.join(self.out_dir, name))
        if len(self.names) > 1:
            weight_map = {tensor: self.names[k] for tensor, (k, _, _) in self._places.items()}
            with open(os.path.join(self.out_dir, SAFETENSORS_INDEX), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)

    def abort(self) -> None:
        """Removes the temporary files."""
        for k, f in enumerate(self._files):
            f.close()
            if os.path.exists(self._temporary(k)):
                os.remove(self._temporary(k))
