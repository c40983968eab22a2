"""HuggingFace `GPTJForCausalLM` directories <-> gptj parameters.

HF stores torch Linear weights as [out, in]; gptj stores kernels as [in, ...out]
with heads split out (q/k/v: [embed, heads, head_dim], out_proj: [heads,
head_dim, embed]) and layers stacked on a leading axis. The embedding and head
are padded with zero rows up to the model's `padded_vocab_size` on import and
cut back to `vocab_size` on export, so a round trip is exact.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np

from gptj.model import GPTJConfig
from gptj.params_io import WeightsError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# Buffers some older HF GPT-J checkpoints saved alongside the weights.
_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias")
_MAX_SHARD_BYTES = 4 << 30


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
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise WeightsError(f"{hf_dir}: no such directory")
    if not os.path.isfile(path):
        raise WeightsError(f"{hf_dir}: no config.json; expected a save_pretrained directory of GPTJForCausalLM")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e


def _weight_files(hf_dir: str) -> list[str]:
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index_path = os.path.join(hf_dir, index_name)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(hf_dir, name) for name in files]
    for name in (SAFETENSORS_FILE, TORCH_FILE):
        if os.path.isfile(os.path.join(hf_dir, name)):
            return [os.path.join(hf_dir, name)]
    raise WeightsError(f"{hf_dir}: no weights ({SAFETENSORS_FILE}, {TORCH_FILE} or a sharded index)")


def _iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, fp32 numpy array) for every tensor of one weights file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).float().numpy()
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
            for name, tensor in state.items():
                yield name, tensor.float().numpy()
    except WeightsError:
        raise
    except Exception as e:  # safetensors and torch raise assorted types for damaged files
        raise WeightsError(f"{path}: unreadable weights file ({type(e).__name__}: {e})") from e


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])


def hf_state_to_params(state: dict[str, np.ndarray], config: GPTJConfig) -> dict[str, Any]:
    """gptj params (numpy) from an HF GPT-J state dict of numpy arrays."""
    d, h, k, ff = config.d_model, config.num_heads, config.head_dim, config.mlp_dim
    state = {n.removeprefix("model."): v for n, v in state.items() if not n.endswith(_IGNORED_SUFFIXES)}
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in state:
            raise WeightsError(f"HF checkpoint is missing {name!r}")
        value = state[name]
        if value.shape != shape:
            raise WeightsError(f"HF tensor {name!r} has shape {value.shape}, expected {shape} for a model of d_model "
                               f"{config.d_model}, {config.num_layers} layers and {config.vocab_size} tokens")
        used.add(name)
        return value

    def stacked(fn):
        return np.stack([fn(f"transformer.h.{i}.") for i in range(config.num_layers)])

    params = {
        "wte": _pad_rows(take("transformer.wte.weight", (config.vocab_size, d)), config.padded_vocab_size),
        "blocks": {
            "ln": {"scale": stacked(lambda p: take(p + "ln_1.weight", (d,))),
                   "bias": stacked(lambda p: take(p + "ln_1.bias", (d,)))},
            "attn": {
                **{f"{n}_proj": stacked(lambda p, n=n: take(p + f"attn.{n}_proj.weight", (h * k, d)).T.reshape(d, h, k))
                   for n in ("q", "k", "v")},
                "out_proj": stacked(lambda p: take(p + "attn.out_proj.weight", (d, h * k)).T.reshape(h, k, d)),
            },
            "mlp": {
                "fc_in_kernel": stacked(lambda p: take(p + "mlp.fc_in.weight", (ff, d)).T),
                "fc_in_bias": stacked(lambda p: take(p + "mlp.fc_in.bias", (ff,))),
                "fc_out_kernel": stacked(lambda p: take(p + "mlp.fc_out.weight", (d, ff)).T),
                "fc_out_bias": stacked(lambda p: take(p + "mlp.fc_out.bias", (d,))),
            },
        },
        "ln_f": {"scale": take("transformer.ln_f.weight", (d,)), "bias": take("transformer.ln_f.bias", (d,))},
        "lm_head_kernel": _pad_rows(take("lm_head.weight", (config.vocab_size, d)), config.padded_vocab_size).T,
        "lm_head_bias": _pad_rows(take("lm_head.bias", (config.vocab_size,)), config.padded_vocab_size),
    }
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise WeightsError(f"HF checkpoint has tensors GPT-J does not: {unexpected[:5]}"
                           + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    return jax_tree_to_float32(params)


def jax_tree_to_float32(tree):
    if isinstance(tree, dict):
        return {key: jax_tree_to_float32(value) for key, value in tree.items()}
    return np.ascontiguousarray(tree, dtype=np.float32)


def params_to_hf_state(params: dict[str, Any], config: GPTJConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy [out, in] array) pairs, one layer at a time, from gptj params (numpy)."""
    d, h, k, v = config.d_model, config.num_heads, config.head_dim, config.vocab_size
    blocks = params["blocks"]
    yield "transformer.wte.weight", np.asarray(params["wte"])[:v]
    for i in range(config.num_layers):
        p = f"transformer.h.{i}."
        yield p + "ln_1.weight", np.asarray(blocks["ln"]["scale"][i])
        yield p + "ln_1.bias", np.asarray(blocks["ln"]["bias"][i])
        for n in ("q", "k", "v"):
            yield p + f"attn.{n}_proj.weight", np.asarray(blocks["attn"][f"{n}_proj"][i]).reshape(d, h * k).T
        yield p + "attn.out_proj.weight", np.asarray(blocks["attn"]["out_proj"][i]).reshape(h * k, d).T
        yield p + "mlp.fc_in.weight", np.asarray(blocks["mlp"]["fc_in_kernel"][i]).T
        yield p + "mlp.fc_in.bias", np.asarray(blocks["mlp"]["fc_in_bias"][i])
        yield p + "mlp.fc_out.weight", np.asarray(blocks["mlp"]["fc_out_kernel"][i]).T
        yield p + "mlp.fc_out.bias", np.asarray(blocks["mlp"]["fc_out_bias"][i])
    yield "transformer.ln_f.weight", np.asarray(params["ln_f"]["scale"])
    yield "transformer.ln_f.bias", np.asarray(params["ln_f"]["bias"])
    yield "lm_head.weight", np.asarray(params["lm_head_kernel"])[:, :v].T
    yield "lm_head.bias", np.asarray(params["lm_head_bias"])[:v]


def read_hf_model_config(hf_dir: str, vocab_pad_multiple: int = 1) -> GPTJConfig:
    """The GPTJConfig of an HF GPT-J directory (its config.json), without reading the weights."""
    return model_config_from_hf(_read_hf_config(hf_dir), vocab_pad_multiple)


def read_hf(hf_dir: str, vocab_pad_multiple: int = 1) -> tuple[dict[str, Any], GPTJConfig]:
    """Reads an HF GPT-J `save_pretrained` directory (safetensors or .bin, sharded or not)."""
    config = read_hf_model_config(hf_dir, vocab_pad_multiple)
    state: dict[str, np.ndarray] = {}
    for path in _weight_files(hf_dir):
        state.update(_iter_tensors(path))
    return hf_state_to_params(state, config), config


def write_hf(params: dict[str, Any], config: GPTJConfig, out_dir: str, dtype: str = "float32") -> None:
    """Writes gptj params as an HF directory that `GPTJForCausalLM.from_pretrained` loads.

    Weights go to safetensors, split into shards of at most 4 GiB with an
    index file when larger, written one shard at a time.
    """
    import torch
    from safetensors.torch import save_file

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise WeightsError(f"unsupported export dtype {dtype!r}; use float32, bfloat16 or float16")
    if os.path.exists(os.path.join(out_dir, "config.json")):
        raise WeightsError(f"{out_dir} already holds a model; choose a new output directory")
    os.makedirs(out_dir, exist_ok=True)

    # Shards are written as soon as they fill, so a 6B export holds one shard in memory.
    written: list[tuple[str, list[str]]] = []
    shard: dict[str, Any] = {}
    shard_bytes = total = 0

    def flush():
        file_name = f"model-part{len(written) + 1:05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file_name), metadata={"format": "pt"})
        written.append((file_name, list(shard)))

    for name, value in params_to_hf_state(params, config):
        tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).to(torch_dtype)
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > _MAX_SHARD_BYTES:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = tensor
        shard_bytes += size
        total += size
    flush()
    if len(written) == 1:
        os.replace(os.path.join(out_dir, written[0][0]), os.path.join(out_dir, SAFETENSORS_FILE))
    else:
        weight_map = {}
        for i, (temp_name, names) in enumerate(written):
            file_name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(os.path.join(out_dir, temp_name), os.path.join(out_dir, file_name))
            weight_map.update({name: file_name for name in names})
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(config, dtype), f, indent=2)
