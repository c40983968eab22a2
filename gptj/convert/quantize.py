"""Quantized params directories: `python -m gptj.convert quantize --workdir=W --out=DIR [--bits=8|4] [--group_size=G]`.

The output is a params directory like any other (config.json, an Orbax tree,
its checksums), whose config records the quantization (`quant_bits`,
`quant_group_size`, `quant_targets`; see `gptj.model.quantized` for the layout) and
`param_dtype` bfloat16: the matrices are integers with bf16 scales, and
LayerNorms and biases are stored in bf16. Every reader recognises it from its
config: sample, serve and eval run it quantized; training refuses it.

The weights are streamed (`gptj.core.streaming`): the source is read a block at a
time and the output written a chunk at a time, so the host holds a few
16 MiB blocks, never the model (full-precision or quantized). A matrix is
read twice: once for its scales (the largest magnitude of each channel or
group, accumulated block by block), once to round its values against them.
"""

from __future__ import annotations

import os
from typing import Iterable

import jax
import numpy as np

from gptj.core import streaming
from gptj.core.streaming import Box, LazyArray, box_shape, chunk_boxes, chunk_shape, full_box
from gptj.model import quantized as quantize
from gptj.model.transformer import GPTJConfig
from gptj.weights import params_dir as params_io
from gptj.errors import WeightsError

# What a quantized directory stores its scales, LayerNorms and biases in.
STORAGE_DTYPE = "bfloat16"


def quantized_config(config: GPTJConfig, bits: int, group_size: int | None = None,
                     targets: Iterable[str] = quantize.TARGETS) -> GPTJConfig:
    """The config of `config`'s weights quantized to `bits` (group_size None: `quantize.default_group_size`).

    Raises ValueError (one line) for weights already quantized, a bit width
    other than 8 or 4, unknown targets or a group size that does not divide
    an input dimension.
    """
    if config.quant_bits:
        raise ValueError(f"the weights are already quantized ({quantize.describe(config)}); quantize the "
                         "full-precision weights they were made from")
    if bits not in quantize.BITS:
        raise ValueError(f"--bits must be 8 or 4, got {bits}")
    group_size = quantize.default_group_size(config, bits) if group_size is None else group_size
    try:
        return config.replace(quant_bits=bits, quant_group_size=group_size, quant_targets=tuple(targets),
                              param_dtype=STORAGE_DTYPE)
    except ValueError as e:
        raise ValueError(str(e).replace("invalid GPT-J config: ", "cannot quantize: ")) from None


class _Quantized:
    """One source matrix quantized box by box: its scales from one pass over it, its values from any box.

    `spans` are the matrix's absolute dims (the layer axis of a stacked one
    counted) that one scale spans, in groups of `group_size` along the last.
    The scales (small: a value per channel or group) are kept until every
    value has been read.
    """

    def __init__(self, w: LazyArray, bits: int, group_size: int, spans: tuple[int, int]):
        self.w, self.bits, self.group_size, self.spans = w.astype(np.float32), bits, group_size, spans
        self.scale_shape = quantize.scale_shape(w.shape, spans, group_size)
        self._scale: np.ndarray | None = None
        self._values_left = w.size

    def _scale_index(self, box: Box) -> tuple[Box, int]:
        """(the box of the scales the values in `box` use, the offset of box's first input in its first group)."""
        lo, hi = self.spans
        if not self.group_size:
            return box[:lo] + box[hi:], 0
        g, axis = self.group_size, box[hi - 1]
        return box[:hi - 1] + (slice(axis.start // g, (axis.stop - 1) // g + 1),) + box[hi:], axis.start % g

    def scale(self) -> np.ndarray:
        """The scales of the whole matrix (bf16), from one pass over it (each block read uncounted: not primary)."""
        if self._scale is not None:
            return self._scale
        lo, hi = self.spans
        amax = np.zeros(self.scale_shape, np.float32)
        for box in _tiles(self.w.shape, full_box(self.w.shape)):
            part = np.abs(self.w.read(box, primary=False))
            index, offset = self._scale_index(box)
            if self.group_size:  # the largest of each group (or part of one) the box holds
                starts = [0] + list(range(self.group_size - offset, part.shape[hi - 1], self.group_size))
                part = np.maximum.reduceat(part, starts, axis=hi - 1)
            else:
                part = np.max(part, axis=tuple(range(lo, hi)))
            np.maximum(amax[index], part, out=amax[index])
        self._scale = quantize.scale_from_amax(amax, self.bits)
        return self._scale

    def read_scale(self, box: Box, dtype, primary: bool) -> np.ndarray:
        return np.asarray(self.scale()[box], dtype)

    def read_values(self, box: Box, dtype, primary: bool) -> np.ndarray:
        """The values in `box`, rounded a block of the source at a time (read as `primary`)."""
        lo, hi = self.spans
        scale = self.scale()
        out = np.empty(box_shape(box), dtype)
        for tile in _tiles(box_shape(box), box):
            index, offset = self._scale_index(tile)
            if self.group_size:  # each scale repeated over its group, cut to the tile's inputs
                s = np.repeat(scale[index], self.group_size, axis=hi - 1)
                s = s[(slice(None),) * (hi - 1) + (slice(offset, offset + tile[hi - 1].stop - tile[hi - 1].start),)]
            else:
                s = np.expand_dims(scale[index], tuple(range(lo, hi)))
            within = tuple(slice(t.start - b.start, t.stop - b.start) for t, b in zip(tile, box))
            out[within] = quantize.round_to_scale(self.w.read(tile, primary), s, self.bits)
        if primary:
            self._values_left -= out.size
            if self._values_left <= 0:
                self._scale = None  # every value written: the scales are on disk
        return out


def _tiles(shape: tuple[int, ...], box: Box):
    """The boxes of fp32 blocks of at most `streaming.BLOCK_BYTES` that cover `box` (of `shape`), rows first."""
    for tile in chunk_boxes(shape, chunk_shape(shape, 4, streaming.BLOCK_BYTES)):
        yield tuple(slice(b.start + t.start, b.start + t.stop) for t, b in zip(tile, box))


def quantize_params(params: dict, config: GPTJConfig) -> dict:
    """`params` (LazyArrays or host arrays of the full-precision model) quantized as `config` says, lazily.

    `config` is a `quantized_config`. Returns a tree of LazyArrays: each
    target matrix becomes {"values", "scale"}, other floating-point leaves
    are cast to bf16; nothing is read until a consumer (`save_params`,
    `place`, `read_all`) reads their boxes, and the values of any box are
    exactly those `quantize.quantize_matrix` gives for the whole matrix.
    """
    out = jax.tree_util.tree_map(lambda x: LazyArray.of(x).astype(STORAGE_DTYPE), params)
    for target in config.quant_targets:
        matrix = quantize.MATRICES[target]
        node = out
        for key in matrix.path[:-1]:
            node = node[key]
        source = _leaf(params, matrix.path)
        spans = tuple(d + matrix.stacked for d in matrix.spans)
        q = _Quantized(source, config.quant_bits, config.quant_group_size, spans)
        node[matrix.path[-1]] = {
            quantize.VALUES: LazyArray(source.shape, quantize.int_dtype(config.quant_bits), q.read_values,
                                       source.source),
            quantize.SCALE: LazyArray(q.scale_shape, STORAGE_DTYPE, q.read_scale),
        }
    return out


def _leaf(tree: dict, path: tuple[str, ...]) -> LazyArray:
    for key in path:
        tree = tree[key]
    return LazyArray.of(tree)


def write_quantized(spec: str, out: str, bits: int, group_size: int | None = None,
                    targets: Iterable[str] = quantize.TARGETS, base: str | None = None) -> GPTJConfig:
    """Quantizes the weights `spec` names (any weights spec: workdir, params dir, hf:, mtj:) into the new `out`.

    Everything is checked before a weight is read (the source's config, the
    settings, the output not existing); returns the output's config.
    """
    from gptj.weights.source import open_weights

    if os.path.exists(os.path.join(out, params_io.PARAMS_SUBDIR)):
        raise WeightsError(f"{out} already holds params; choose a new output directory")
    weights = open_weights(spec, base=base)
    config = quantized_config(weights.config, bits, group_size, targets)
    params_io.save_params(out, quantize_params(weights.arrays(), config), config)
    return config
