"""Quantized params directories: `python -m gptj.convert quantize --workdir=W --out=DIR [--bits=8|4] [--group_size=G]`.

The output is a params directory like any other (config.json, an Orbax tree,
its checksums), whose config records the quantization (`quant_bits`,
`quant_group_size`, `quant_targets`; see `gptj.quantize` for the layout) and
`param_dtype` bfloat16: the matrices are integers with bf16 scales, and
LayerNorms and biases are stored in bf16. Every reader recognises it from its
config: sample, serve and eval run it quantized; training refuses it.

Matrices are quantized one at a time, and a stacked one a layer at a time, so
the work needs about one layer's matrix in fp32 beside the weights; each
source matrix is released once quantized.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import ml_dtypes
import numpy as np

from gptj import params_io, quantize
from gptj.model import GPTJConfig

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


def _node(tree: dict, path: tuple[str, ...]) -> dict:
    for key in path[:-1]:
        tree = tree[key]
    return tree


def quantize_params(params: dict, config: GPTJConfig) -> dict:
    """`params` (host arrays of the full-precision model) quantized as `config` (a `quantized_config`) says.

    Consumes `params`: each matrix is replaced in the tree as soon as it is
    quantized, so the source arrays are freed one by one (when the caller
    holds no other reference). Other floating-point leaves are cast to bf16.
    """
    bits, group_size = config.quant_bits, config.quant_group_size
    for target in config.quant_targets:
        matrix = quantize.MATRICES[target]
        node = _node(params, matrix.path)
        w = node.pop(matrix.path[-1])
        if matrix.stacked:  # one layer at a time: the fp32 temporaries are one layer's
            layers = [quantize.quantize_matrix(w[i], bits, group_size, matrix.spans) for i in range(w.shape[0])]
            values, scale = np.stack([v for v, _ in layers]), np.stack([s for _, s in layers])
        else:
            values, scale = quantize.quantize_matrix(w, bits, group_size, matrix.spans)
        del w
        node[matrix.path[-1]] = {quantize.VALUES: values, quantize.SCALE: scale}
    return _cast_floats(params)


def _cast_floats(tree: Any) -> Any:
    """Floating-point leaves (LayerNorms, biases, unquantized matrices) to bf16; integers and scales as they are."""
    if quantize.is_quantized(tree):
        return tree
    if isinstance(tree, dict):
        return {k: _cast_floats(v) for k, v in tree.items()}
    return np.asarray(tree).astype(ml_dtypes.bfloat16)


def write_quantized(spec: str, out: str, bits: int, group_size: int | None = None,
                    targets: Iterable[str] = quantize.TARGETS, base: str | None = None) -> GPTJConfig:
    """Quantizes the weights `spec` names (any weights spec: workdir, params dir, hf:, mtj:) into the new `out`.

    Everything is checked before a weight is read (the source's config, the
    settings, the output not existing); returns the output's config.
    """
    from gptj.weights import open_weights

    if os.path.exists(os.path.join(out, params_io.PARAMS_SUBDIR)):
        raise params_io.WeightsError(f"{out} already holds params; choose a new output directory")
    weights = open_weights(spec, base=base)
    config = quantized_config(weights.config, bits, group_size, targets)
    params_io.save_params(out, quantize_params(weights.numpy(), config), config)
    return config
