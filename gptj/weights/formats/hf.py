"""HuggingFace `GPTJForCausalLM` directories <-> gptj parameters, a tensor (or a box of one) at a time.

HF stores torch Linear weights as [out, in]; gptj stores kernels as [in, ...out]
with heads split out (q/k/v: [embed, heads, head_dim], out_proj: [heads,
head_dim, embed]) and layers stacked on a leading axis. The embedding and head
are padded with zero rows up to the model's `padded_vocab_size` on import and
cut back to `vocab_size` on export, so a round trip is exact.

`_LAYOUT` says, for every gptj leaf, which HF tensor holds it (one per layer
for stacked leaves) and how the axes map. Reading (`open_hf`) gives each leaf
as a LazyArray whose boxes are read from the HF tensors' matching slices
(several tensors for a box spanning layers), so a process that owns a shard
of a leaf reads that shard's bytes and nothing else. Writing (`write_hf`)
goes a leaf and a layer at a time into safetensors shards planned up front
(`gptj.weights.formats.hf_files`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from gptj.core import streaming
from gptj.core.streaming import LazyArray
from gptj.errors import WeightsError
from gptj.model.transformer import GPTJConfig, resolve_dtype
from gptj.weights.formats import hf_files
from gptj.weights.params_dir import param_shapes, read_json_in, unflatten

# Buffers some older HF GPT-J checkpoints saved alongside the weights.
_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias")


def model_config_from_hf(hf: dict[str, Any], vocab_pad_multiple: int = 1) -> GPTJConfig:
    """Maps an HF GPT-J config.json onto GPTJConfig, refusing what gptj does not implement."""
    if hf.get("model_type") != "gptj":
        raise WeightsError(f"not a GPT-J config: model_type is {hf.get('model_type')!r}, expected 'gptj'")
    if hf.get("rotary_dim") is None:
        raise WeightsError("HF GPT-J configs with rotary_dim=None (RoPE over the whole model width) are not supported")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise WeightsError(f"activation_function {activation!r} is not GPT-J's tanh GELU (gelu_new)")
    if hf.get("tie_word_embeddings", False):
        raise WeightsError("tied input/output embeddings are not GPT-J; gptj keeps an untied lm_head")
    try:
        return GPTJConfig(
            vocab_size=int(hf["vocab_size"]), num_layers=int(hf["n_layer"]), d_model=int(hf["n_embd"]),
            num_heads=int(hf["n_head"]), rotary_dim=int(hf["rotary_dim"]), max_len=int(hf["n_positions"]),
            d_ff=int(hf.get("n_inner") or 0), layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            vocab_pad_multiple=vocab_pad_multiple, init_std=float(hf.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise WeightsError(f"HF config lacks the GPT-J field {e.args[0]!r}") from e


def hf_config_dict(config: GPTJConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The config.json of an HF GPT-J model with gptj's shape."""
    return {
        "architectures": ["GPTJForCausalLM"],
        "model_type": "gptj",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_len,
        "n_embd": config.d_model,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "rotary_dim": config.rotary_dim,
        "n_inner": config.d_ff or None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": config.init_std,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 50256 if config.vocab_size > 50256 else None,
        "eos_token_id": 50256 if config.vocab_size > 50256 else None,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def _read_hf_config(hf_dir: str) -> dict[str, Any]:
    return read_json_in(hf_dir, "config.json", "a save_pretrained directory of GPTJForCausalLM")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a gptj leaf is in an HF checkpoint: the tensor (`{i}`: the layer, for stacked leaves) and its axes.

    `axes`: "same" (gptj = HF), "T" (gptj = HF transposed: Linear kernels),
    "heads_in" (gptj [embed, heads, head_dim] = HF [heads * head_dim, embed]
    transposed) or "heads_out" (gptj [heads, head_dim, embed] = HF [embed,
    heads * head_dim] transposed). `vocab_axis`: the gptj axis padded to
    `padded_vocab_size` (zeros past `vocab_size`).
    """

    hf: str
    axes: str = "same"
    vocab_axis: int | None = None


_LAYOUT = {
    "wte": _Layout("transformer.wte.weight", vocab_axis=0),
    "blocks/ln/scale": _Layout("transformer.h.{i}.ln_1.weight"),
    "blocks/ln/bias": _Layout("transformer.h.{i}.ln_1.bias"),
    "blocks/attn/q_proj": _Layout("transformer.h.{i}.attn.q_proj.weight", "heads_in"),
    "blocks/attn/k_proj": _Layout("transformer.h.{i}.attn.k_proj.weight", "heads_in"),
    "blocks/attn/v_proj": _Layout("transformer.h.{i}.attn.v_proj.weight", "heads_in"),
    "blocks/attn/out_proj": _Layout("transformer.h.{i}.attn.out_proj.weight", "heads_out"),
    "blocks/mlp/fc_in_kernel": _Layout("transformer.h.{i}.mlp.fc_in.weight", "T"),
    "blocks/mlp/fc_in_bias": _Layout("transformer.h.{i}.mlp.fc_in.bias"),
    "blocks/mlp/fc_out_kernel": _Layout("transformer.h.{i}.mlp.fc_out.weight", "T"),
    "blocks/mlp/fc_out_bias": _Layout("transformer.h.{i}.mlp.fc_out.bias"),
    "ln_f/scale": _Layout("transformer.ln_f.weight"),
    "ln_f/bias": _Layout("transformer.ln_f.bias"),
    "lm_head_kernel": _Layout("lm_head.weight", "T", vocab_axis=1),
    "lm_head_bias": _Layout("lm_head.bias", vocab_axis=0),
}


def _stacked(path: str) -> bool:
    return path.startswith("blocks/")


def _hf_shape(layout: _Layout, shape: tuple[int, ...], config: GPTJConfig) -> tuple[int, ...]:
    """The HF tensor's shape for one gptj leaf of `shape` (one layer of it, for stacked leaves)."""
    shape = list(shape)
    if layout.vocab_axis is not None:
        shape[layout.vocab_axis] = config.vocab_size
    if layout.axes == "T":
        return tuple(reversed(shape))
    if layout.axes == "heads_in":  # [d, h, k] <- [h * k, d]
        return (shape[1] * shape[2], shape[0])
    if layout.axes == "heads_out":  # [h, k, d] <- [d, h * k]
        return (shape[2], shape[0] * shape[1])
    return tuple(shape)


def hf_tensors(config: GPTJConfig) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """{HF tensor name: (gptj leaf path, layer or None, HF shape)}, in HF's order (layer by layer)."""
    shapes = param_shapes(config)
    out = {_LAYOUT["wte"].hf: ("wte", None, _hf_shape(_LAYOUT["wte"], shapes["wte"], config))}
    for i in range(config.num_layers):
        for path, layout in _LAYOUT.items():
            if _stacked(path):
                out[layout.hf.format(i=i)] = (path, i, _hf_shape(layout, shapes[path][1:], config))
    for path in ("ln_f/scale", "ln_f/bias", "lm_head_kernel", "lm_head_bias"):
        out[_LAYOUT[path].hf] = (path, None, _hf_shape(_LAYOUT[path], shapes[path], config))
    return out


def _read_box(files: hf_files.WeightFiles, name: str, layout: _Layout, box: tuple[slice, ...], dtype,
              config: GPTJConfig) -> np.ndarray:
    """The box `box` of one gptj leaf (one layer of it) from HF tensor `name`, as a new array of `dtype`."""
    shape = tuple(s.stop - s.start for s in box)
    if layout.vocab_axis is not None and box[layout.vocab_axis].stop > config.vocab_size:
        # Rows past the real vocabulary are padding: zeros, read from nowhere.
        axis = layout.vocab_axis
        real = box[axis].start, min(box[axis].stop, config.vocab_size)
        out = np.zeros(shape, dtype)
        if real[1] > real[0]:
            inner = box[:axis] + (slice(*real),) + box[axis + 1:]
            part = (slice(None),) * axis + (slice(0, real[1] - real[0]),)
            out[part] = _read_box(files, name, dataclasses.replace(layout, vocab_axis=None), inner, dtype, config)
        return out
    k = config.head_dim
    if layout.axes == "T":
        return _transposed(files.read(name, box[::-1], dtype))
    if layout.axes == "heads_in":  # [d, h, k] from [h * k, d]: whole heads' rows, then the head_dim slice
        d, h, hd = box
        rows = files.read(name, (slice(h.start * k, h.stop * k), d), dtype)
        return _transposed(rows).reshape(-1, h.stop - h.start, k)[:, :, hd]
    if layout.axes == "heads_out":  # [h, k, d] from [d, h * k]
        h, hd, d = box
        cols = files.read(name, (d, slice(h.start * k, h.stop * k)), dtype)
        return _transposed(cols).reshape(h.stop - h.start, k, -1)[:, hd]
    return files.read(name, box, dtype)


def _transposed(x: np.ndarray, tile: int = 256) -> np.ndarray:
    """A 2-D array transposed into a new C-ordered one, a cache-sized tile at a time (about twice numpy's speed)."""
    out = np.empty(x.shape[::-1], x.dtype)
    for i in range(0, x.shape[0], tile):
        for j in range(0, x.shape[1], tile):
            out[j:j + tile, i:i + tile] = x[i:i + tile, j:j + tile].T
    return out


def _leaf(files: hf_files.WeightFiles, path: str, shape: tuple[int, ...], config: GPTJConfig) -> LazyArray:
    """gptj leaf `path` as a LazyArray over the HF tensors that hold it (fp32; read in any dtype)."""
    layout = _LAYOUT[path]

    def read(box, dtype, primary):
        if not _stacked(path):
            return _read_box(files, layout.hf, layout, box, dtype, config)
        out = np.empty(tuple(s.stop - s.start for s in box), dtype)
        for j, i in enumerate(range(box[0].start, box[0].stop)):
            out[j] = _read_box(files, layout.hf.format(i=i), layout, box[1:], dtype, config)
        return out

    return LazyArray(shape, np.float32, read)


def open_hf(hf_dir: str, vocab_pad_multiple: int = 1) -> tuple[dict[str, Any], GPTJConfig, hf_files.WeightFiles]:
    """(gptj params as LazyArrays, their config, the files they read from) of an HF GPT-J directory.

    Only the config and the files' headers are read here; they are checked
    against the config (every tensor present, of the right shape, none
    foreign). The arrays read HF's bytes box by box (see the module docstring),
    in any dtype (`astype`); their own dtype is float32.
    """
    config = read_hf_model_config(hf_dir, vocab_pad_multiple)
    files = hf_files.WeightFiles(hf_dir)
    expected = hf_tensors(config)
    found = {}
    for name in files.tensors:
        plain = name.removeprefix("model.")
        if not plain.endswith(_IGNORED_SUFFIXES):
            found[plain] = name
    for plain, (_, _, shape) in expected.items():
        if plain not in found:
            raise WeightsError(f"HF checkpoint is missing {plain!r}")
        if files.tensors[found[plain]].shape != shape:
            raise WeightsError(f"HF tensor {plain!r} has shape {files.tensors[found[plain]].shape}, expected {shape} "
                               f"for a model of d_model {config.d_model}, {config.num_layers} layers and "
                               f"{config.vocab_size} tokens")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise WeightsError(f"HF checkpoint has tensors GPT-J does not: {unexpected[:5]}"
                           + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    files.tensors.update({plain: files.tensors[name] for plain, name in found.items()})
    params = {path: _leaf(files, path, shape, config) for path, shape in param_shapes(config).items()}
    return unflatten(params), config, files


def read_hf_model_config(hf_dir: str, vocab_pad_multiple: int = 1) -> GPTJConfig:
    """The GPTJConfig of an HF GPT-J directory (its config.json), without reading the weights."""
    return model_config_from_hf(_read_hf_config(hf_dir), vocab_pad_multiple)


def read_hf(hf_dir: str, vocab_pad_multiple: int = 1) -> tuple[dict[str, Any], GPTJConfig]:
    """An HF GPT-J `save_pretrained` directory (safetensors or .bin, sharded or not) as fp32 numpy params."""
    params, config, _ = open_hf(hf_dir, vocab_pad_multiple)
    return jax.tree_util.tree_map(np.asarray, params), config


def _to_hf(values: np.ndarray, layout: _Layout, config: GPTJConfig) -> np.ndarray:
    """One gptj leaf's values (one layer of it) as its HF tensor: padding cut, axes back to HF's."""
    if layout.vocab_axis is not None:
        values = values[(slice(None),) * layout.vocab_axis + (slice(0, config.vocab_size),)]
    if layout.axes == "T":
        return values.T
    if layout.axes == "heads_in":
        return values.reshape(values.shape[0], -1).T
    if layout.axes == "heads_out":
        return values.reshape(-1, values.shape[-1]).T
    return values


def _hf_row_slabs(leaf: LazyArray, layout: _Layout, config: GPTJConfig, dtype):
    """(first row, HF rows in `dtype`) of an unstacked leaf's HF tensor, read in row slabs of the leaf.

    The leaf is read a slab of its rows (`streaming.BLOCK_BYTES`) at a time,
    the order it is stored in. Where HF's rows are the leaf's rows they go
    out slab by slab; where they are its columns (the head's kernel) the HF
    tensor is assembled whole first (the largest tensor, held once). The
    vocabulary padding is read too (a checked source checks what is read
    whole) and left out.
    """
    transposed = layout.axes == "T"
    real = config.vocab_size if layout.vocab_axis is not None else leaf.shape[0]
    step = max(1, streaming.BLOCK_BYTES // max(1, leaf.nbytes // leaf.shape[0]))
    whole = np.empty((real, leaf.shape[0]), dtype) if transposed else None
    for start in range(0, leaf.shape[0], step):
        box = (slice(start, min(start + step, leaf.shape[0])),) + tuple(slice(0, n) for n in leaf.shape[1:])
        values = leaf.read(box)
        if transposed:
            whole[:, box[0]] = values[:, :real].T
        elif start < real:
            yield start, values[:real - start].astype(dtype, copy=False)
    if transposed:
        yield 0, whole


def write_hf(params: dict[str, Any], config: GPTJConfig, out_dir: str, dtype: str = "float32",
             max_shard_size: str | int | None = None) -> None:
    """Writes gptj params as an HF directory that `GPTJForCausalLM.from_pretrained` loads.

    `params`: host arrays or LazyArrays (read a layer of a leaf at a time,
    leaf after leaf, and their sources checked before anything is named as
    output). Weights go to safetensors shards of at most `max_shard_size`
    (HF's spelling: "5GB", "500MB", "2GiB" or bytes; default HF's 5GB; a
    larger tensor gets a shard of its own) with an index when there are several, as
    `save_pretrained` writes them; config.json last. The host holds one
    layer of one leaf (the largest: the embedding or the head) at a time.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise WeightsError(f"unsupported export dtype {dtype!r}; use float32, bfloat16 or float16")
    present = hf_files.weight_files_present(out_dir)
    if present:
        raise WeightsError(f"{out_dir} already holds a model ({', '.join(present[:3])}); choose a new output directory")
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    out_dtype = np.dtype(resolve_dtype(dtype))
    flat = {"/".join(str(k.key) for k in key): LazyArray.of(leaf)
            for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    if set(flat) != set(_LAYOUT):
        raise WeightsError(f"not a plain GPT-J parameter tree: {sorted(set(flat) ^ set(_LAYOUT))[:5]}")
    tensors = hf_tensors(config)
    writer = hf_files.ShardedWriter(out_dir, [(name, shape, out_dtype) for name, (_, _, shape) in tensors.items()],
                                    hf_files.parse_size(hf_files.DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size))
    try:
        error = None
        try:
            # Leaf by leaf, then layer by layer: a source stored a leaf per chunk decodes each chunk once.
            for path, leaf in flat.items():
                layout = _LAYOUT[path]
                if _stacked(path):
                    for i in range(leaf.shape[0]):
                        values = _to_hf(leaf.rows(i, i + 1).read()[0], layout, config)
                        writer.write(layout.hf.format(i=i), values.astype(out_dtype, copy=False))
                else:
                    for row, values in _hf_row_slabs(leaf, layout, config, out_dtype):
                        writer.write(layout.hf, values, row)
        except Exception as e:  # noqa: BLE001 - shared with the sources' checks, then raised by finish_reading
            error = e
        streaming.finish_reading(params, error)
        writer.commit()
    except BaseException:
        writer.abort()
        if created and not os.listdir(out_dir):  # a failed export leaves nothing behind
            os.rmdir(out_dir)
        raise
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(config, dtype), f, indent=2)
