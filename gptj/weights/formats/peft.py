"""HuggingFace PEFT LoRA adapter directories <-> gptj adapters.

A PEFT adapter directory holds `adapter_config.json` (peft_type LORA, r,
lora_alpha, lora_dropout, target_modules, ...) and `adapter_model.safetensors`
with, per adapted torch Linear of `GPTJForCausalLM`,

    base_model.model.transformer.h.<i>.attn.q_proj.lora_A.weight   [r, in]
    base_model.model.transformer.h.<i>.attn.q_proj.lora_B.weight   [out, r]

and the module adds (lora_alpha / r) · B·A·x to the Linear's output. gptj
keeps A [layers, in..., r] and B [layers, r, out...] (`gptj.model.lora`), with
in/out split into heads where the kernel is (q/k/v: out = heads x head_dim;
out_proj: in = heads x head_dim), in the same order as HF's flattened
features, so A_peft = A[i].reshape(-1, r).T and B_peft = B[i].reshape(r, -1).T.
`peft.PeftModel.from_pretrained(GPTJForCausalLM.from_pretrained(BASE), DIR)`
loads what `write_peft` writes, with no missing or unexpected keys.

PEFT options gptj does not implement (DoRA, rsLoRA, per-module ranks,
adapter biases, modules_to_save, a subset of layers, regex targets) are
refused by name when reading.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from gptj.errors import WeightsError
from gptj.model.lora import adapter_pair, adapter_tree
from gptj.model.transformer import LORA_TARGETS, GPTJConfig, LoraConfig, abstract_params
from gptj.weights.params_dir import read_json_in

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Each target's torch module inside a GPT-J block (HF's names, which are also the targets').
HF_MODULES = {"q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj",
              "out_proj": "attn.out_proj", "fc_in": "mlp.fc_in", "fc_out": "mlp.fc_out"}
_PREFIX = "base_model.model.transformer.h."
# PEFT fields whose non-default values change what the adapters compute.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "lora_bias": False,
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "bias": "none", "target_parameters": None, "layer_replication": None, "exclude_modules": None}


def peft_name(layer: int, target: str, matrix: str) -> str:
    """The PEFT state-dict name of one layer's A ('A') or B ('B') of a target."""
    return f"{_PREFIX}{layer}.{HF_MODULES[target]}.lora_{matrix}.weight"


def peft_config_dict(lora: LoraConfig, base_model: str = "") -> dict[str, Any]:
    """The adapter_config.json PEFT writes for these adapters on a GPTJForCausalLM."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True, "revision": None,
    }


def lora_config_from_peft(values: dict[str, Any], where: str = "adapter_config.json") -> LoraConfig:
    """The LoraConfig of a PEFT adapter_config.json, refusing options gptj does not implement."""
    if values.get("peft_type") != "LORA":
        raise WeightsError(f"{where}: peft_type is {values.get('peft_type')!r}; only LORA adapters are supported")
    for field, default in _UNSUPPORTED.items():
        value = values.get(field, default)
        if value != default and not (default in (None, {}) and not value):
            raise WeightsError(f"{where}: {field}={value!r} is not supported (gptj implements plain LoRA: "
                               f"{field}={default!r})")
    targets = values.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not targets or any(t not in LORA_TARGETS for t in targets):
        raise WeightsError(f"{where}: target_modules {values.get('target_modules')!r} must name modules among "
                           f"{list(LORA_TARGETS)} (regular expressions are not supported)")
    try:
        return LoraConfig(rank=int(values["r"]), alpha=float(values.get("lora_alpha", 8)),
                          dropout=float(values.get("lora_dropout", 0.0)), targets=tuple(sorted(targets)))
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{where}: not a usable LoRA config ({type(e).__name__}: {e})") from e


def adapters_to_peft_state(adapters, config: GPTJConfig, lora: LoraConfig) -> dict[str, np.ndarray]:
    """PEFT's state dict ({name: fp32 [r, in] or [out, r]}) from gptj adapters (numpy)."""
    state = {}
    for target in lora.targets:
        a, b = (np.asarray(x, np.float32) for x in adapter_pair(adapters, target))
        for layer in range(config.num_layers):
            state[peft_name(layer, target, "A")] = np.ascontiguousarray(a[layer].reshape(-1, lora.rank).T)
            state[peft_name(layer, target, "B")] = np.ascontiguousarray(b[layer].reshape(lora.rank, -1).T)
    return state


def peft_state_to_adapters(state: dict[str, np.ndarray], config: GPTJConfig, lora: LoraConfig,
                           where: str = ADAPTER_WEIGHTS) -> dict:
    """gptj adapters (fp32 numpy, stacked over layers) from a PEFT state dict; every tensor must be used."""
    expected = adapter_pair_shapes(config, lora)
    state = {name.replace(".default.weight", ".weight"): value for name, value in state.items()}
    wanted = {peft_name(i, t, m) for t in lora.targets for m in "AB" for i in range(config.num_layers)}
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unexpected:
        raise WeightsError(f"{where}: does not fit a {config.num_layers}-layer GPT-J with LoRA on "
                           f"{list(lora.targets)}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                           f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    pairs = {}
    for target in lora.targets:
        a_shape, b_shape = expected[target]
        a_rows, b_rows = [], []
        for layer in range(config.num_layers):
            a_peft, b_peft = state[peft_name(layer, target, "A")], state[peft_name(layer, target, "B")]
            a_flat, b_flat = (lora.rank, int(np.prod(a_shape[1:-1]))), (int(np.prod(b_shape[2:])), lora.rank)
            for name, value, shape in ((peft_name(layer, target, "A"), a_peft, a_flat),
                                       (peft_name(layer, target, "B"), b_peft, b_flat)):
                if tuple(value.shape) != shape:
                    raise WeightsError(f"{where}: {name} has shape {tuple(value.shape)}, expected {shape}")
            a_rows.append(np.asarray(a_peft, np.float32).T.reshape(a_shape[1:]))
            b_rows.append(np.asarray(b_peft, np.float32).T.reshape(b_shape[1:]))
        pairs[target] = (np.stack(a_rows), np.stack(b_rows))
    return adapter_tree(pairs)


def adapter_pair_shapes(config: GPTJConfig, lora: LoraConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{target: (A's shape, B's shape)} of the adapters the model creates."""
    import flax.linen as nn

    tree = nn.meta.unbox(abstract_params(config, lora))
    return {t: tuple(tuple(x.shape) for x in adapter_pair(tree, t)) for t in lora.targets}


def write_peft(adapters, config: GPTJConfig, lora: LoraConfig, out_dir: str, base_model: str = "") -> None:
    """Writes gptj adapters as a PEFT adapter directory; refuses a directory that already holds one."""
    from safetensors.numpy import save_file

    if os.path.exists(os.path.join(out_dir, ADAPTER_CONFIG)) or os.path.exists(os.path.join(out_dir, ADAPTER_WEIGHTS)):
        raise WeightsError(f"{out_dir} already holds a PEFT adapter; choose a new output directory")
    os.makedirs(out_dir, exist_ok=True)
    save_file(adapters_to_peft_state(adapters, config, lora), os.path.join(out_dir, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_config_dict(lora, base_model), f, indent=2)


def read_peft_config(adapter_dir: str) -> LoraConfig:
    """The LoraConfig of a PEFT adapter directory (its adapter_config.json)."""
    values = read_json_in(adapter_dir, ADAPTER_CONFIG, "a PEFT adapter directory")
    return lora_config_from_peft(values, os.path.join(adapter_dir, ADAPTER_CONFIG))


def read_peft(adapter_dir: str, config: GPTJConfig) -> tuple[LoraConfig, dict]:
    """(LoraConfig, adapters as fp32 numpy) of a PEFT adapter directory for a model of `config`'s shape."""
    lora = read_peft_config(adapter_dir)
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    state = {}
    try:
        if os.path.isfile(weights):
            from safetensors import safe_open

            with safe_open(weights, framework="pt") as f:  # torch reads bf16/fp16 files too
                state = {name: f.get_tensor(name).float().numpy() for name in f.keys()}
        elif os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
            import torch

            weights = os.path.join(adapter_dir, "adapter_model.bin")
            loaded = torch.load(weights, map_location="cpu", weights_only=True)
            state = {name: tensor.float().numpy() for name, tensor in loaded.items()}
        else:
            raise WeightsError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (or adapter_model.bin)")
    except WeightsError:
        raise
    except Exception as e:  # safetensors and torch raise assorted types for damaged files
        raise WeightsError(f"{weights}: unreadable adapter weights ({type(e).__name__}: {e})") from e
    return lora, peft_state_to_adapters(state, config, lora, weights)
