"""mesh-transformer-jax checkpoints (the reference's, GPT-J-6B's release included) -> gptj params.

What the reference writes (kingoflolz/mesh-transformer-jax: `mesh_transformer/checkpoint.py`,
`transformer_shard.py`, `layers.py`, `device_train.py`, `slim_model.py`, `to_hf_weights.py`):

* `model_dir/meta.json` is `{"step", "checkpoints": [steps...], "aux": {...}}`; the newest
  checkpoint is `model_dir/step_{checkpoints[-1]}/`. It does not record the shard count or the
  model shape: those live in the run's config JSON (e.g. `configs/6B_roto_256.json`:
  `layers`, `d_model`, `n_heads`, `n_vocab`, `pe_rotary_dims`, `seq`, `cores_per_replica`).
* `step_N/shard_i/{0..15}.npz`, one `shard_i` per model-parallel core (`cores_per_replica`).
  The train state `{"opt_state", "params", "step"}` is flattened with `jax.tree_flatten`
  (dict keys sorted, so optimizer state first, then params, then the step counter), cut into
  16 consecutive chunks (the first `len % 16` chunks one leaf longer) and chunk j is saved
  with `np.savez(*leaves)` as `j.npz` (members `arr_0, arr_1, ...`). Each shard directory
  holds that core's slice of every leaf, so a leaf's per-shard shape is the same everywhere.
* A "slim" checkpoint (`slim_model.py`, the released 9 GB GPT-J-6B weights) drops
  `opt_state` and casts params to bf16; a full one keeps the optimizer state (Adam's
  count, mu, nu and the schedule count for the reference's optax chain) and fp32 params.
* bf16 arrays come back from `np.load` as the 2-byte void dtype `|V2`: numpy has no
  bfloat16, so the bytes are reinterpreted, never converted.
* Params are haiku modules `causal_transformer_shard/~/<module>/~/<layer>` with leaves
  `w`/`b` (Linear, kernels [in, out]) and `scale`/`offset` (LayerNorm). Flattening sorts
  module names as strings (haiku's param mappings of the time, frozendict and FlatMapping,
  flatten in sorted key order too), so layers come as layer_0, layer_1, layer_10, ...

How each leaf is split over the S shards (per-shard shape -> gptj):

    embedding_shard/~/linear  w [V/S, d]   rows of wte                  (concat axis 0)
                              b [d]        one per shard, all added     (summed, folded into every wte row)
    layer_i/~/linear   (q)    w [d, d/S]   heads of the shard           (concat axis 1)
    layer_i/~/linear_1 (v)    w [d, d/S]   note the creation order q, v, k
    layer_i/~/linear_2 (k)    w [d, d/S]
    layer_i/~/linear_3 (out)  w [d/S, d]                                (concat axis 0)
    layer_i/~/linear_4 (fc_in)  w [d, 4d/S], b [4d/S]                   (concat last axis)
    layer_i/~/linear_5 (fc_out) w [4d/S, d], b [d] added on every shard (w concat axis 0, b summed)
    layer_i/~/replicated_layer_norm  scale, offset [d]                  (replicated; shard 0's is used)
    projection_shard/~/replicated_layer_norm  scale, offset [d]         (replicated; shard 0's is used)
    projection_shard/~/linear w [d, V/S], b [V/S]                       (concat last axis)

The embedding is a Linear over a one-hot of the shard's slice of the vocabulary, with a bias
on every shard; the shards' outputs are summed, so every token's embedding is its wte row
plus the sum of the S biases (HF's conversion folds that sum into every row; so do we).
fc_out's bias is likewise added once per shard before the psum. LayerNorm parameters are
copied on every shard, and the reference reads shard 0's copy (`all_gather(...)[0]`).

That is why the reference counts 6,053,381,344 parameters for GPT-J-6B while the model has
6,050,882,784 distinct ones (what HF and gptj count). Its count is the size of the sharded
state, where every [d] vector is held S = 8 times:
  29 LayerNorms (28 blocks + the head) x 2 vectors x 4096 x 7 extra copies  = 1,662,976
  28 fc_out biases x 4096 x 7 extra copies                                  =   802,816
  8 embedding biases x 4096 (HF and gptj fold them into wte: no tensor)      =    32,768
  total                                                                      = 2,498,560
and 6,050,882,784 + 2,498,560 = 6,053,381,344.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from absl import logging

from gptj.core.streaming import LazyArray, read_all
from gptj.errors import WeightsError
from gptj.model.transformer import GPTJConfig
from gptj.weights.params_dir import param_shapes, unflatten

META_FILE = "meta.json"
_PREFIX = "causal_transformer_shard/~/"
_CONFIG_KEYS = ("layers", "d_model", "n_heads", "n_vocab")

# configs/6B_roto_256.json, the config of the released GPT-J-6B weights, whose archives
# (step_383500/, step_383500_slim/) ship without it.
GPTJ_6B_MTJ_CONFIG: dict[str, Any] = {
    "layers": 28, "d_model": 4096, "n_heads": 16, "n_vocab": 50400, "norm": "layernorm", "pe": "rotary",
    "pe_rotary_dims": 64, "seq": 2048, "cores_per_replica": 8,
}


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One params leaf of the reference: its haiku name, per-shard shape and how shards combine."""

    module: str  # e.g. "layer_3/~/linear_4"
    name: str    # w, b, scale or offset
    shape: tuple[int, ...]
    merge: str   # concat0 | concat_last | sum | first

    @property
    def path(self) -> str:
        return f"{_PREFIX}{self.module}/{self.name}"


def model_config_from_mtj(values: Mapping[str, Any], vocab_pad_multiple: int = 1) -> tuple[GPTJConfig, int]:
    """(GPTJConfig, cores_per_replica) from the reference's config JSON, refusing other architectures."""
    missing = [k for k in _CONFIG_KEYS if k not in values]
    if missing:
        raise WeightsError(f"mesh-transformer-jax config lacks {missing}")
    if values.get("norm", "layernorm") != "layernorm":
        raise WeightsError(f"norm {values['norm']!r} is not GPT-J's LayerNorm; only norm='layernorm' imports")
    if values.get("pe", "rotary") != "rotary":
        raise WeightsError(f"pe {values['pe']!r} is not GPT-J's rotary embedding; only pe='rotary' imports")
    layers, d_model, heads, vocab = (int(values[k]) for k in _CONFIG_KEYS)
    shards = int(values.get("cores_per_replica", 1))
    for name, size in (("n_heads", heads), ("n_vocab", vocab), ("d_model", d_model)):
        if shards <= 0 or size % shards:
            raise WeightsError(f"{name}={size} is not divisible by cores_per_replica={shards}")
    try:
        config = GPTJConfig(vocab_size=vocab, num_layers=layers, d_model=d_model, num_heads=heads,
                            rotary_dim=int(values.get("pe_rotary_dims", d_model // heads)),
                            max_len=int(values.get("seq", 2048)), vocab_pad_multiple=vocab_pad_multiple)
    except ValueError as e:
        raise WeightsError(f"mesh-transformer-jax config is not a valid GPT-J: {e}") from e
    return config, shards


def param_leaves(config: GPTJConfig, shards: int) -> list[_Leaf]:
    """The reference's params leaves in the order `jax.tree_flatten` stores them."""
    d, v, ff = config.d_model, config.vocab_size, config.mlp_dim
    leaves = [
        _Leaf("embedding_shard/~/linear", "w", (v // shards, d), "concat0"),
        _Leaf("embedding_shard/~/linear", "b", (d,), "sum"),
        _Leaf("projection_shard/~/linear", "w", (d, v // shards), "concat_last"),
        _Leaf("projection_shard/~/linear", "b", (v // shards,), "concat_last"),
        _Leaf("projection_shard/~/replicated_layer_norm", "scale", (d,), "first"),
        _Leaf("projection_shard/~/replicated_layer_norm", "offset", (d,), "first"),
    ]
    for i in range(config.num_layers):
        layer = f"layer_{i}/~/"
        leaves += [_Leaf(layer + name, "w", (d, d // shards), "concat_last") for name in ("linear", "linear_1", "linear_2")]
        leaves += [
            _Leaf(layer + "linear_3", "w", (d // shards, d), "concat0"),
            _Leaf(layer + "linear_4", "w", (d, ff // shards), "concat_last"),
            _Leaf(layer + "linear_4", "b", (ff // shards,), "concat_last"),
            _Leaf(layer + "linear_5", "w", (ff // shards, d), "concat0"),
            _Leaf(layer + "linear_5", "b", (d,), "sum"),
            _Leaf(layer + "replicated_layer_norm", "scale", (d,), "first"),
            _Leaf(layer + "replicated_layer_norm", "offset", (d,), "first"),
        ]
    # jax flattens a dict of dicts by sorted module name, then sorted leaf name.
    return sorted(leaves, key=lambda leaf: (_PREFIX + leaf.module, leaf.name))


def find_step_dir(path: str) -> str:
    """The `step_N` directory of `path`: itself, or the newest one its `meta.json` lists."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: no such directory")
    if os.path.isdir(os.path.join(path, "shard_0")):
        return path
    meta_path = os.path.join(path, META_FILE)
    if os.path.isdir(os.path.join(path, "params")) and os.path.isfile(meta_path):
        raise WeightsError(f"{path}: a mesh-transformer-jax v2 checkpoint (params/shard_N.npz); only v1 "
                           "(step_N/shard_i/*.npz, which GPT-J-6B was released in) is supported")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                checkpoints = json.load(f)["checkpoints"]
            step = int(checkpoints[-1])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise WeightsError(f"{meta_path}: no checkpoint listed ({type(e).__name__}: {e})") from e
        step_dir = os.path.join(path, f"step_{step}")
        if not os.path.isdir(os.path.join(step_dir, "shard_0")):
            raise WeightsError(f"{meta_path} names step {step}, but {step_dir}/shard_0 does not exist")
        return step_dir
    raise WeightsError(f"{path}: not a mesh-transformer-jax checkpoint (no shard_0/ and no {META_FILE})")


def _find_config(step_dir: str) -> tuple[dict[str, Any] | None, str]:
    """The reference config JSON beside the checkpoint (in step_N/ or the model dir above it)."""
    found = []
    for folder in (step_dir, os.path.dirname(step_dir)):
        for candidate in sorted(glob.glob(os.path.join(folder, "*.json"))):
            if os.path.basename(candidate) == META_FILE:
                continue
            try:
                with open(candidate) as f:
                    values = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(values, dict) and all(k in values for k in _CONFIG_KEYS):
                found.append((values, candidate))
        if found:
            break
    shapes = {tuple(values.get(k) for k in _CONFIG_KEYS + ("pe_rotary_dims", "cores_per_replica"))
              for values, _ in found}
    if len(shapes) > 1:
        raise WeightsError(f"conflicting mesh-transformer-jax configs beside {step_dir}: "
                           f"{[p for _, p in found]}; pass the right one explicitly")
    return found[0] if found else (None, "")


def _shard_dirs(step_dir: str) -> list[str]:
    names = [n for n in os.listdir(step_dir) if re.fullmatch(r"shard_\d+", n)]
    indices = sorted(int(n.split("_")[1]) for n in names)
    if indices != list(range(len(indices))):
        raise WeightsError(f"{step_dir}: shard directories {indices} are not shard_0..shard_{len(indices) - 1}")
    return [os.path.join(step_dir, f"shard_{i}") for i in indices]


def _piece_count(shard_dir: str) -> int:
    indices = sorted(int(n[:-4]) for n in os.listdir(shard_dir) if re.fullmatch(r"\d+\.npz", n))
    if not indices or indices != list(range(len(indices))):
        raise WeightsError(f"{shard_dir}: expected files 0.npz..15.npz, found {indices or 'none'}")
    return len(indices)


def _open_npz(path: str):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: unreadable npz ({type(e).__name__}: {e}); truncated or damaged?") from e


def _as_float(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.dtype("V2"):  # how np.savez stores bfloat16
        x = np.ascontiguousarray(x).view(ml_dtypes.bfloat16)
    if x.dtype not in (np.float32, np.float16, np.float64, ml_dtypes.bfloat16):
        raise WeightsError(f"{where}: dtype {x.dtype} is not a floating-point weight")
    return x


class _ShardedLeaves:
    """Random access to leaf k of every shard, across the 16 npz pieces, loading lazily."""

    def __init__(self, shard_dirs: list[str]):
        self.shard_dirs = shard_dirs
        self.pieces = _piece_count(shard_dirs[0])
        self._files: dict[tuple[int, int], Any] = {}
        counts = None
        for shard, folder in enumerate(shard_dirs):
            if _piece_count(folder) != self.pieces:
                raise WeightsError(f"{folder}: {_piece_count(folder)} npz files, but shard_0 has {self.pieces}")
            shard_counts = [len(self._file(shard, j).files) for j in range(self.pieces)]
            if counts is None:
                counts = shard_counts
            elif shard_counts != counts:
                raise WeightsError(f"{folder}: holds {shard_counts} arrays per file, but shard_0 holds {counts}; "
                                   "shards of different checkpoints?")
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _file(self, shard: int, piece: int):
        key = (shard, piece)
        if key not in self._files:
            self._files[key] = _open_npz(os.path.join(self.shard_dirs[shard], f"{piece}.npz"))
        return self._files[key]

    def where(self, shard: int, index: int) -> str:
        piece = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"{os.path.join(self.shard_dirs[shard], f'{piece}.npz')} arr_{index - self.starts[piece]}"

    def get(self, shard: int, index: int) -> np.ndarray:
        piece = int(np.searchsorted(self.starts, index, side="right")) - 1
        name = f"arr_{index - self.starts[piece]}"
        try:
            return self._file(shard, piece)[name]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise WeightsError(f"{self.where(shard, index)}: unreadable ({type(e).__name__}: {e}); "
                               "truncated or damaged?") from e

    def shape(self, shard: int, index: int) -> tuple[int, ...]:
        """A leaf's shape from its .npy header, without reading the data."""
        piece = int(np.searchsorted(self.starts, index, side="right")) - 1
        member = f"arr_{index - self.starts[piece]}.npy"
        try:
            with self._file(shard, piece).zip.open(member) as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                return tuple(read(f)[0])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise WeightsError(f"{self.where(shard, index)}: unreadable ({type(e).__name__}: {e}); "
                               "truncated or damaged?") from e

    def close(self):
        for npz in self._files.values():
            npz.close()
        self._files.clear()


def _merge(parts: list[np.ndarray], merge: str) -> np.ndarray:
    """One reference leaf whole, in fp32, from its per-shard parts."""
    if merge == "first":
        return parts[0].astype(np.float32)
    if merge == "sum":
        return np.sum([p.astype(np.float32) for p in parts], axis=0)
    return np.concatenate(parts, axis=0 if merge == "concat0" else -1).astype(np.float32)


# gptj leaf -> the reference leaf (module, name) holding it; "{i}" is the layer of a stacked leaf. The
# embedding ("wte") is the embedding Linear's w plus its summed biases (see the module docstring).
_SOURCES = {
    "blocks/ln/scale": ("layer_{i}/~/replicated_layer_norm", "scale"),
    "blocks/ln/bias": ("layer_{i}/~/replicated_layer_norm", "offset"),
    "blocks/attn/q_proj": ("layer_{i}/~/linear", "w"),
    "blocks/attn/v_proj": ("layer_{i}/~/linear_1", "w"),
    "blocks/attn/k_proj": ("layer_{i}/~/linear_2", "w"),
    "blocks/attn/out_proj": ("layer_{i}/~/linear_3", "w"),
    "blocks/mlp/fc_in_kernel": ("layer_{i}/~/linear_4", "w"),
    "blocks/mlp/fc_in_bias": ("layer_{i}/~/linear_4", "b"),
    "blocks/mlp/fc_out_kernel": ("layer_{i}/~/linear_5", "w"),
    "blocks/mlp/fc_out_bias": ("layer_{i}/~/linear_5", "b"),
    "ln_f/scale": ("projection_shard/~/replicated_layer_norm", "scale"),
    "ln_f/bias": ("projection_shard/~/replicated_layer_norm", "offset"),
    "lm_head_kernel": ("projection_shard/~/linear", "w"),
    "lm_head_bias": ("projection_shard/~/linear", "b"),
}
# gptj leaves whose vocabulary axis is padded to padded_vocab_size with zeros.
_VOCAB_AXIS = {"wte": 0, "lm_head_kernel": 1, "lm_head_bias": 0}


class _Reader:
    """gptj leaves read from a checkpoint's shards, one reference leaf merged at a time.

    The last merged value (one layer of a stacked leaf, or the embedding) is
    kept for the next read, so the boxes of several devices cost one merge.
    """

    def __init__(self, store: _ShardedLeaves, first: int, layout: list[_Leaf], config: GPTJConfig):
        self.store, self.config = store, config
        self.index = {(leaf.module, leaf.name): (first + k, leaf) for k, leaf in enumerate(layout)}
        self._last: tuple[Any, np.ndarray] | None = None

    def _merged(self, module: str, name: str) -> np.ndarray:
        index, spec = self.index[(module, name)]
        parts = [_as_float(self.store.get(shard, index), self.store.where(shard, index))
                 for shard in range(len(self.store.shard_dirs))]
        return _merge(parts, spec.merge)

    def value(self, path: str, layer: int | None) -> np.ndarray:
        """gptj leaf `path` (its layer `layer` if stacked) whole, in fp32 and with its gptj shape."""
        if self._last is not None and self._last[0] == (path, layer):
            return self._last[1]
        self._last = None  # released before the next is merged
        c = self.config
        if path == "wte":  # every token's row plus the sum of the shard biases; padded rows stay zero
            value = self._merged("embedding_shard/~/linear", "w") + self._merged("embedding_shard/~/linear", "b")
        else:
            module, name = _SOURCES[path]
            value = self._merged(module.format(i=layer), name)
        if path in ("blocks/attn/q_proj", "blocks/attn/k_proj", "blocks/attn/v_proj"):
            value = value.reshape(c.d_model, c.num_heads, c.head_dim)
        elif path == "blocks/attn/out_proj":
            value = value.reshape(c.num_heads, c.head_dim, c.d_model)
        if path in _VOCAB_AXIS:
            widths = [(0, 0)] * value.ndim
            widths[_VOCAB_AXIS[path]] = (0, c.padded_vocab_size - c.vocab_size)
            value = np.pad(value, widths)
        self._last = ((path, layer), value)
        return value

    def leaf(self, path: str, shape: tuple[int, ...]) -> LazyArray:
        """gptj leaf `path` as a LazyArray (fp32; read in any dtype)."""
        def read(box, dtype, primary):
            if not path.startswith("blocks/"):
                return np.array(self.value(path, None)[box], dtype)
            out = np.empty(tuple(s.stop - s.start for s in box), dtype)
            for j, layer in enumerate(range(box[0].start, box[0].stop)):
                out[j] = self.value(path, layer)[box[1:]]
            return out

        return LazyArray(shape, np.float32, read)


def _check_optimizer_state(store: _ShardedLeaves, layout: list[_Leaf], summary: str) -> int:
    """Index of the first params leaf, after checking what precedes it is the reference's optimizer state.

    Slim checkpoints hold params + step; full ones the state of the reference's optax chain
    first: Adam's count, mu and nu (each shaped like the params), then the schedule's count.
    Anything else (an extra or missing leaf) is another architecture, not optimizer state.
    """
    n = len(layout)
    if len(store) == n + 1:
        return 0
    if len(store) != 3 * n + 3:
        raise WeightsError(f"{os.path.dirname(store.shard_dirs[0])}: {len(store)} arrays per shard, but a GPT-J with {summary} has {n + 1} (slim) or "
                           f"{3 * n + 3} (with Adam state): another architecture or config")
    expected = [()] + [leaf.shape for leaf in layout] * 2 + [()]
    for index, shape in enumerate(expected):
        if store.shape(0, index) != shape:
            raise WeightsError(f"{store.where(0, index)} has shape {store.shape(0, index)}, expected {shape} "
                               f"for the optimizer state of a GPT-J with {summary}: another architecture or config")
    return 2 * n + 2


def _checkpoint_config(step_dir: str, config: str | Mapping[str, Any] | None,
                       vocab_pad_multiple: int) -> tuple[GPTJConfig, int, str]:
    """(GPTJConfig, cores_per_replica, where the config came from) for a checkpoint; see `read_mtj`."""
    if config is None:
        values, source = _find_config(step_dir)
        if values is None:
            values, source = GPTJ_6B_MTJ_CONFIG, "GPT-J-6B's configs/6B_roto_256.json (no config JSON found beside it)"
    elif isinstance(config, str):
        try:
            with open(config) as f:
                values, source = json.load(f), config
        except (OSError, ValueError) as e:
            raise WeightsError(f"{config}: unreadable mesh-transformer-jax config ({e})") from e
    else:
        values, source = dict(config), "the given config"
    gptj_config, shards = model_config_from_mtj(values, vocab_pad_multiple)
    return gptj_config, shards, source


def read_mtj_model_config(path: str, config: str | Mapping[str, Any] | None = None,
                          vocab_pad_multiple: int = 1) -> GPTJConfig:
    """The GPTJConfig of a checkpoint (found as `read_mtj` finds it), without reading its weights."""
    return _checkpoint_config(find_step_dir(path), config, vocab_pad_multiple)[0]


def open_mtj(path: str, config: str | Mapping[str, Any] | None = None,
             vocab_pad_multiple: int = 1) -> tuple[dict[str, Any], GPTJConfig]:
    """A mesh-transformer-jax checkpoint as gptj params (LazyArrays, read a reference leaf at a time) and its config.

    `path` is a `step_N` directory or the model directory whose `meta.json` lists it (the
    newest is taken). `config` is the reference's config JSON (a path or dict); without it, a
    JSON with the reference's keys in `step_N/` or the model directory is used, and failing
    that GPT-J-6B's (`configs/6B_roto_256.json`), which the released weights were made with.
    Optimizer state, when present, is checked for shape and skipped (fine-tuning starts a
    fresh optimizer, as the reference's `--fresh-opt` does). Every leaf's shape is checked
    here, from the .npy headers: WeightsError, naming the file, for a truncated shard, a
    shard count other than the config's `cores_per_replica`, or leaves whose count or shapes
    do not fit the config (another architecture). The values are read when the arrays are:
    one layer of one leaf (or the embedding) merged from its shards at a time.
    """
    step_dir = find_step_dir(path)
    gptj_config, shards, source = _checkpoint_config(step_dir, config, vocab_pad_multiple)
    summary = (f"layers={gptj_config.num_layers} d_model={gptj_config.d_model} n_heads={gptj_config.num_heads} "
               f"n_vocab={gptj_config.vocab_size} cores_per_replica={shards} from {source}")

    shard_dirs = _shard_dirs(step_dir)
    if len(shard_dirs) != shards:
        raise WeightsError(f"{step_dir} holds {len(shard_dirs)} shard directories, but the checkpoint's config "
                           f"says cores_per_replica={shards} ({summary})")
    layout = param_leaves(gptj_config, shards)
    store = _ShardedLeaves(shard_dirs)
    first = _check_optimizer_state(store, layout, summary)
    for offset, spec in enumerate(layout):
        for shard in range(shards):
            shape = store.shape(shard, first + offset)
            if shape != spec.shape:
                raise WeightsError(
                    f"{store.where(shard, first + offset)} ({spec.module}/{spec.name}) has shape {shape}, "
                    f"expected {spec.shape} for {summary}: another architecture or config")
    step = store.get(0, len(store) - 1)
    if step.shape != () or step.dtype.kind not in "iu":
        raise WeightsError(f"{store.where(0, len(store) - 1)}: expected the scalar step counter, found "
                           f"{step.dtype} {step.shape}: another architecture or config")
    logging.info("mesh-transformer-jax step %d (%s; %s optimizer state)", int(step), summary,
                 "with" if first else "without")
    reader = _Reader(store, first, layout, gptj_config)
    return unflatten({p: reader.leaf(p, shape) for p, shape in param_shapes(gptj_config).items()}), gptj_config


def read_mtj(path: str, config: str | Mapping[str, Any] | None = None,
             vocab_pad_multiple: int = 1) -> tuple[dict[str, Any], GPTJConfig]:
    """A mesh-transformer-jax checkpoint as fp32 numpy params and its GPTJConfig (see `open_mtj`)."""
    params, gptj_config = open_mtj(path, config, vocab_pad_multiple)
    return read_all(params), gptj_config
