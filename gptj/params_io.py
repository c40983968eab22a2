"""Params directories: `config.json` (the model section) plus an Orbax tree of parameters.

A params directory is what the converters write and what inference reads; it
restores onto any mesh and rule set because Orbax reshards on restore. A
training workdir (`config.json` with the whole run config, `checkpoints/`)
is accepted wherever a params directory is: `load_params` takes the params of
its latest complete checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gptj import checkpoint
from gptj.checkpoint import CHECKPOINTS_SUBDIR, CONFIG_FILE
from gptj.model import GPTJConfig, abstract_params, resolve_dtype

# A params directory's tree has the same name as a checkpoint's params item, so
# the two are read the same way.
PARAMS_SUBDIR = checkpoint.PARAMS_ITEM


class WeightsError(ValueError):
    """Weights that cannot be read: a missing, malformed or foreign directory."""


def read_model_config(path: str) -> GPTJConfig:
    """The model config of a params directory or a workdir (its `config.json`)."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise WeightsError(f"{path}: no {CONFIG_FILE}; expected a gptj params directory or workdir")
    try:
        with open(config_path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{config_path}: unreadable ({e})") from e
    values = values.get("model", values)  # a workdir's config.json holds the whole run config
    try:
        return GPTJConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{config_path}: not a GPT-J model config ({e})") from e


def save_params(path: str, params: Any, config: GPTJConfig) -> None:
    """Writes `params` (sharded or not) and the model config as a params directory.

    Every process must call this (Orbax writes each shard from its owner);
    only process 0 writes config.json.
    """
    path = os.path.abspath(path)
    params_path = os.path.join(path, PARAMS_SUBDIR)
    if os.path.exists(params_path):
        raise WeightsError(f"{path} already holds params; choose a new output directory")
    if jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_path, params)
    checkpointer.wait_until_finished()


def abstract_params_like(config: GPTJConfig, shardings=None, dtype=None):
    """ShapeDtypeStructs of the model's params (optionally with shardings and a storage dtype)."""
    abstract = nn.meta.unbox(abstract_params(config))
    if shardings is None:
        # Orbax would otherwise try to recreate the saving run's device layout.
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: local, abstract)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), abstract, shardings)


def resolve_params_path(path: str) -> str:
    """The Orbax params tree inside a params directory, or inside a workdir's latest checkpoint."""
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: no such directory")
    if os.path.isdir(os.path.join(path, PARAMS_SUBDIR)):
        return os.path.join(os.path.abspath(path), PARAMS_SUBDIR)
    if os.path.isdir(os.path.join(path, CHECKPOINTS_SUBDIR)):
        try:
            return checkpoint.latest_params_path(path)
        except checkpoint.CheckpointError as e:
            raise WeightsError(str(e)) from None
    raise WeightsError(f"{path}: neither a params directory (config.json + params/) nor a workdir (checkpoints/)")


def load_params(path: str, shardings=None, dtype=None) -> tuple[Any, GPTJConfig]:
    """Reads params from a params directory or workdir, laid out by `shardings` if given.

    `shardings` is a tree of NamedShardings matching the params (from
    `Partitioner.abstract_state`); without it the params land on this
    process's first device, whatever mesh they were saved from. `dtype` casts on read (e.g. bfloat16 for inference).
    """
    config = read_model_config(path)
    params_path = resolve_params_path(path)
    target = abstract_params_like(config, shardings)
    try:
        restored = ocp.StandardCheckpointer().restore(params_path, target)
    except Exception as e:  # orbax/tensorstore raise many types for a damaged tree
        raise WeightsError(f"{params_path}: could not restore params for {config} ({type(e).__name__}: {e})") from e
    if dtype is not None:
        restored = jax.tree_util.tree_map(lambda x: x.astype(resolve_dtype(dtype)), restored)
    return restored, config


def to_numpy(tree):
    """A fully addressable copy of a (possibly sharded) tree as numpy arrays."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def cast_tree(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(resolve_dtype(dtype)), tree)
