"""LoRA adapters of GPT-J: where they sit in the parameter tree, what a run trains, and merging them.

The adapters are created and applied by `gptj.model.transformer.project` (the one helper
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
base model's speed and shape. The PEFT file format is `gptj.weights.formats.peft`.

A server holding several adapters over one base keeps them unmerged, in an
adapter pool (`pool_shapes`, `pool_entry`): every target, ranks padded to the
pool's, B scaled by alpha / rank, one slot per adapter.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptj.core.param_tree import merge_params, select_params
from gptj.model.transformer import LORA_TARGETS, LoraConfig, abstract_params, lora_param_names, pool_names

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
        node = _node(tree, module_path)
        for name, value in zip(lora_param_names(target), (a, b)):
            node[name] = value
    return tree


def _node(tree: dict, path: tuple[str, ...]) -> dict:
    """The dict at `path` in a nested dict, created if missing."""
    for key in path:
        tree = tree.setdefault(key, {})
    return tree


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _merge_layer_in_place(w, a, b, scale: float, layer):
    """W (donated) with its layer `layer` replaced by W + scale · A·B, summed in fp32, stored in W's dtype."""
    w_layer, a, b = (jax.lax.dynamic_index_in_dim(x, layer, keepdims=False) for x in (w, a, b))
    rank = a.shape[-1]
    product = jnp.matmul(a.astype(jnp.float32).reshape(-1, rank), b.astype(jnp.float32).reshape(rank, -1),
                         precision=jax.lax.Precision.HIGHEST)
    merged = (w_layer.astype(jnp.float32) + scale * product.reshape(w_layer.shape)).astype(w.dtype)
    return jax.lax.dynamic_update_index_in_dim(w, merged, layer, axis=0)


def _merged_kernel(w, a, b, scale: float, donate: bool):
    """A stacked kernel [layers, ...] with its adapters merged, a layer at a time (one layer in fp32 at once).

    A jax kernel is merged where it lies, keeping its sharding (in place if `donate`); a numpy one on the host.
    """
    rank = a.shape[-1]
    if isinstance(w, jax.Array):
        out = w if donate else jnp.copy(w)
        for layer in range(w.shape[0]):
            out = _merge_layer_in_place(out, a, b, float(scale), layer)
        return out
    out = np.empty(w.shape, w.dtype)
    for layer in range(w.shape[0]):
        a_layer, b_layer = np.asarray(a[layer], np.float32), np.asarray(b[layer], np.float32)
        product = a_layer.reshape(-1, rank) @ b_layer.reshape(rank, -1)
        out[layer] = np.asarray(w[layer], np.float32) + np.float32(scale) * product.reshape(w.shape[1:])
    return out


def merge(params, lora: LoraConfig, donate: bool = False):
    """The parameter tree without adapters, each adapted kernel replaced by W + alpha/r · A·B.

    `params` holds the base parameters and the adapters (numpy or jax arrays;
    a jax kernel keeps its sharding). The sum is formed in fp32 and stored in
    the kernel's dtype. `donate`: the caller gives up the jax kernels, which
    are then merged in place (no second copy of them in device memory).
    """
    base, adapters = split_adapters(params)
    merged = {}
    for target in lora.targets:
        module_path, kernel_name = KERNELS[target]
        a, b = adapter_pair(adapters, target)
        kernel = _module(base, module_path)[kernel_name]
        _node(merged, module_path)[kernel_name] = _merged_kernel(kernel, a, b, lora.scale, donate)
    return merge_params(base, merged)


# -- adapters pooled beside one base, for serving (the `adapter_pool` collection of gptj.model.transformer) --


def pool_shapes(config, slots: int, rank: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{target: (A's shape, B's shape)} of an adapter pool of `slots` adapters of rank <= `rank`, every target:
    A [layers, slots, in..., rank], B [layers, slots, rank, out...]."""
    tree = nn.meta.unbox(abstract_params(config, LoraConfig(rank=rank, targets=LORA_TARGETS)))
    shapes = {}
    for target in LORA_TARGETS:
        a, b = (tuple(x.shape) for x in adapter_pair(tree, target))
        shapes[target] = (a[:1] + (slots,) + a[1:], b[:1] + (slots,) + b[1:])
    return shapes


def pool_tree(pairs: dict[str, tuple[Any, Any]]) -> dict:
    """The `adapter_pool` collection's tree from {target: (A, B)} (its module paths and `pool_names`)."""
    tree: dict = {}
    for target, (a, b) in pairs.items():
        node = _node(tree, KERNELS[target][0])
        for name, value in zip(pool_names(target), (a, b)):
            node[name] = value
    return tree


def pool_entry(adapters, lora: LoraConfig, rank: int, config) -> dict:
    """One adapter as a slot of an adapter pool (`pool_tree` layout, fp32 numpy, without the slot axis).

    Every target is present: the adapter's own padded with zeros from its
    rank to `rank` (the extra columns of A and rows of B add exact zeros),
    B multiplied by alpha / rank; a target it does not adapt is all zeros.
    """
    if lora.rank > rank:
        raise ValueError(f"rank {lora.rank} exceeds the pool's rank {rank}")
    pairs = {}
    for target, (a_shape, b_shape) in pool_shapes(config, 1, rank).items():
        a_pad, b_pad = np.zeros(a_shape[:1] + a_shape[2:], np.float32), np.zeros(b_shape[:1] + b_shape[2:], np.float32)
        if lora.adapts(target):
            a, b = adapter_pair(adapters, target)
            a_pad[..., :lora.rank] = np.asarray(a, np.float32)
            b_pad[:, :lora.rank] = np.asarray(b, np.float32) * np.float32(lora.scale)
        pairs[target] = (a_pad, b_pad)
    return pool_tree(pairs)
