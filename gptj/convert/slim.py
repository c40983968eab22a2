"""Slim weights: params only, in bf16 (2 bytes per parameter), as a params directory for inference.

The reference's `slim_model.py` did the same to its checkpoints (drop the optimizer state,
cast params to bf16); GPT-J-6B's 9 GB release is such a checkpoint. Here the input is any
gptj workdir (its latest checkpoint), checkpoint step directory or params directory, and the
output a params directory whose config says `param_dtype="bfloat16"`, so it loads as bf16
wherever weights are read. The compute dtype is left as it was: the slim model's logits are
exactly those of the original model with its params cast to bf16.
"""

from __future__ import annotations

import jax

from gptj.model.transformer import GPTJConfig
from gptj.weights.params_dir import save_params
from gptj.weights.source import Weights, open_weights

SLIM_DTYPES = ("bfloat16", "float16")


def slim(src: "str | Weights", out: str, dtype: str = "bfloat16", base: str | None = None) -> GPTJConfig:
    """Writes the params of `src` (a workdir or params directory, or opened weights) to `out` in `dtype`.

    Returns the output's config.

    The params are streamed: each block is read in its saved dtype (checked
    against its checksum, see `gptj.core.integrity`), cast and written before the
    next is read, so neither the full-precision params nor the slim ones are
    ever all held at once; damaged params leave nothing behind. A LoRA or
    frozen-parameter workdir is read merged over its base (`base`: where that
    is now, if it moved).
    """
    if dtype not in SLIM_DTYPES:
        raise ValueError(f"slim dtype must be one of {SLIM_DTYPES}, got {dtype!r}")
    weights = open_weights(src, base=base) if isinstance(src, str) else src
    slim_config = weights.config.replace(param_dtype=dtype)
    save_params(out, jax.tree_util.tree_map(lambda x: x.astype(dtype), weights.arrays()), slim_config)
    return slim_config


def params_bytes(params) -> int:
    """Bytes of a tree of arrays or ShapeDtypeStructs (what a slim export halves)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
