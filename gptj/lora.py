"""LoRA adapters of GPT-J: where they sit in the parameter tree, what a run trains, and merging them.

The adapters are created and applied by `gptj.model.project` (the one helper
every projection calls), as `<target>_lora_a` [layers, in..., rank] and
`<target>_lora_b` [layers, rank, out...] beside the kernel they adapt:

    target     kernel                      adapters
    q_proj     blocks/attn/q_proj          blocks/attn/q_proj_lora_{a,b}
    k_proj     blocks/attn/k_proj          blocks/attn/k_proj_lora_{a,b}
    v_proj     blocks/attn/v_proj          blocks/attn/v_proj_lora_{a,b}
    out_proj   blocks/attn/out_proj        blocks/attn/out_proj_lora_{a,b}
    fc_in      blocks/mlp/fc_in_kernel     blocks/mlp/fc_in_lora_{a,b}
    fc_out     blocks/mlp/fc_out_kernel    blocks/mlp/fc_out_lora_{a,b}

`merge` folds trained adapters into their kernels (W + alpha/r · A·B), so a
fine-tuned model runs for inference, or leaves as a HuggingFace model, at the
base model's speed and shape. The PEFT file format is `gptj.convert.peft`.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptj.model import LoraConfig, lora_param_names, resolve_dtype
from gptj.trainer import merge_params, select_params

# What a LoRA run trains unless `train.trainable` says otherwise: the adapters alone.
ADAPTER_PATTERN = r".*_lora_[ab]"
_ADAPTER = re.compile(ADAPTER_PATTERN)

# Each target's kernel: (module path, kernel name).
KERNELS = {
    "q_proj": (("blocks", "attn"), "q_proj"),
    "k_proj": (("blocks", "attn"), "k_proj"),
    "v_proj": (("blocks", "attn"), "v_proj"),
    "out_proj": (("blocks", "attn"), "out_proj"),
    "fc_in": (("blocks", "mlp"), "fc_in_kernel"),
    "fc_out": (("blocks", "mlp"), "fc_out_kernel"),
}


def is_adapter(path: str) -> bool:
    """Whether a parameter path names a LoRA adapter (A or B)."""
    return _ADAPTER.fullmatch(path) is not None


def trainable_pattern(trainable: str, lora: LoraConfig | None) -> str | None:
    """The regular expression of the parameters a run trains; None when all of them train.

    `trainable` is `train.trainable` ('' = the default): with LoRA the
    default is the adapters alone, without LoRA everything.
    """
    if trainable:
        return trainable
    return ADAPTER_PATTERN if lora is not None and lora.rank > 0 else None


def split_adapters(params) -> tuple[dict, dict]:
    """(the base parameters, the adapters) of a parameter tree."""
    adapters, base = select_params(params, is_adapter)
    return base, adapters


def _module(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def adapter_pair(adapters, target: str) -> tuple[Any, Any]:
    """(A, B) of one target from an adapters tree."""
    module_path, _ = KERNELS[target]
    a_name, b_name = lora_param_names(target)
    module = _module(adapters, module_path)
    return module[a_name], module[b_name]


def adapter_tree(pairs: dict[str, tuple[Any, Any]]) -> dict:
    """An adapters tree from {target: (A, B)} (the inverse of `adapter_pair`)."""
    tree: dict = {}
    for target, (a, b) in pairs.items():
        module_path, _ = KERNELS[target]
        a_name, b_name = lora_param_names(target)
        node = tree
        for key in module_path:
            node = node.setdefault(key, {})
        node[a_name], node[b_name] = a, b
    return tree


def delta(a, b):
    """A·B per layer, in A's input layout and B's output layout: [L, in..., r] x [L, r, out...] -> [L, in..., out...].

    numpy in, numpy out (fp32); jax in, jax out (fp32, full precision).
    """
    layers, rank = a.shape[0], a.shape[-1]
    shape = a.shape[:-1] + b.shape[2:]
    if isinstance(a, jax.Array) or isinstance(b, jax.Array):
        product = jnp.matmul(jnp.asarray(a, jnp.float32).reshape(layers, -1, rank),
                             jnp.asarray(b, jnp.float32).reshape(layers, rank, -1),
                             precision=jax.lax.Precision.HIGHEST)
        return product.reshape(shape)
    product = np.matmul(np.asarray(a, np.float32).reshape(layers, -1, rank),
                        np.asarray(b, np.float32).reshape(layers, rank, -1))
    return product.reshape(shape)


def _merged_kernel(w, a, b, scale: float, dtype):
    """W + scale · A·B, computed in fp32 and stored in `dtype` (default W's); keeps W's sharding."""
    dtype = w.dtype if dtype is None else resolve_dtype(dtype)
    if isinstance(w, jax.Array):
        fn = jax.jit(lambda w, a, b: (w.astype(jnp.float32) + scale * delta(a, b)).astype(dtype),
                     out_shardings=w.sharding)
        return fn(w, a, b)
    return (np.asarray(w, np.float32) + np.float32(scale) * delta(a, b)).astype(dtype)


def merge(params, lora: LoraConfig, dtype=None):
    """The parameter tree without adapters, each adapted kernel replaced by W + alpha/r · A·B.

    `params` holds the base parameters and the adapters (numpy or jax arrays;
    a jax kernel keeps its sharding). The sum is formed in fp32 and stored in
    `dtype` (default: each kernel's own).
    """
    base, adapters = split_adapters(params)
    merged = {}
    for target in lora.targets:
        module_path, kernel_name = KERNELS[target]
        a, b = adapter_pair(adapters, target)
        kernel = _module(base, module_path)[kernel_name]
        node = merged
        for key in module_path:
            node = node.setdefault(key, {})
        node[kernel_name] = _merged_kernel(kernel, a, b, lora.scale, dtype)
    return merge_params(base, merged)
