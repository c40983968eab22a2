"""Params directories: `config.json` (the model section), an Orbax tree of parameters and its checksums.

    params_dir/config.json           the model config
    params_dir/params/               the Orbax params tree
    params_dir/integrity/metadata    the checksum manifest (`gptj.integrity`), written last

A params directory is what the converters write and what inference reads; it
restores onto any mesh and rule set because Orbax reshards on restore, and
every read is checked against the manifest. A training workdir (`config.json`
with the whole run config, `checkpoints/`) is accepted wherever a params
directory is: `load_params` takes the params of its latest complete
checkpoint, and when those are damaged says which older checkpoint is intact.
So is one checkpoint step directory (`workdir/checkpoints/160`), which is how
an older step is chosen.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from gptj import checkpoint, integrity, storage
from gptj.checkpoint import CHECKPOINTS_SUBDIR, CONFIG_FILE
from gptj.model import GPTJConfig, abstract_params, resolve_dtype

# A params directory's tree has the same name as a checkpoint's params item, so
# the two are read the same way.
PARAMS_SUBDIR = checkpoint.PARAMS_ITEM


class WeightsError(ValueError):
    """Weights that cannot be read: a missing, malformed or foreign directory."""


def read_model_config(path: str) -> GPTJConfig:
    """The model config of a params directory or workdir (its `config.json`), or of a checkpoint step directory."""
    config_path = os.path.join(path, CONFIG_FILE)
    step_config = os.path.join(path, checkpoint.CONFIG_ITEM, integrity.JSON_FILE)  # the run config saved with a step
    if not os.path.isfile(config_path) and os.path.isfile(step_config):
        config_path = step_config
    if not os.path.isfile(config_path):
        raise WeightsError(f"{path}: no {CONFIG_FILE}; expected a gptj params directory, workdir or checkpoint "
                           "step directory")
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
    """Writes `params` (sharded or not), their checksums and the model config as a params directory.

    Every process must call this (Orbax writes each shard from its owner, and
    the checksums are a collective); only process 0 writes the JSON files.
    The manifest is written last, so a directory whose save was cut short
    reads as damaged, never as complete.
    """
    path = os.path.abspath(path)
    params_path = os.path.join(path, PARAMS_SUBDIR)
    if os.path.exists(params_path):
        raise WeightsError(f"{path} already holds params; choose a new output directory")
    manifest = integrity.build_manifest({PARAMS_SUBDIR: params})
    if jax.process_index() == 0:
        storage.write_json_atomic(os.path.join(path, CONFIG_FILE), config.to_dict())
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(params_path, params)
        checkpointer.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - a full disk or a refused write, as one line
        raise storage.as_storage_error(e, path, "cannot write params to") from e
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        storage.write_json_atomic(integrity.manifest_path(path), manifest)


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
    """Reads params from a params directory, workdir or step directory, checked, laid out by `shardings` if given.

    `shardings` is a tree of NamedShardings matching the params (from
    `Partitioner.abstract_state`); without it the params land on this
    process's first device, whatever mesh they were saved from. `dtype` casts
    on read (e.g. bfloat16 for inference). Damaged params are a WeightsError
    that names the first bad array and, for a workdir, the newest intact step.
    """
    config = read_model_config(path)
    params_path = resolve_params_path(path)
    directory = os.path.dirname(params_path)
    target = abstract_params_like(config, shardings, dtype=None if dtype is None else resolve_dtype(dtype))
    # Casting while reading, one array at a time, never holds the whole tree in both dtypes.
    cast = dtype is not None and resolve_dtype(dtype) != resolve_dtype(config.param_dtype)
    try:
        restored = integrity.restore_verified(directory, {PARAMS_SUBDIR: target}, one_array_at_a_time=cast)
    except storage.CheckpointDamagedError as e:
        raise WeightsError(f"{e}; {_intact_alternative(path, directory, target)}") from e
    except storage.CheckpointError as e:
        raise WeightsError(str(e)) from e
    return restored[PARAMS_SUBDIR], config


def _intact_alternative(path: str, damaged: str, target) -> str:
    """What to use instead of the damaged `damaged`: the newest older checkpoint of workdir `path` that is intact.

    Inference never falls back on its own; this names the way out. Older
    steps are checked newest first, until one passes.
    """
    if not os.path.isdir(os.path.join(path, CHECKPOINTS_SUBDIR)):
        return "nothing was read from it"
    damaged_step = int(os.path.basename(damaged))
    older = [s for s in reversed(checkpoint.all_steps(path)) if s < damaged_step]
    for i, step in enumerate(older):
        candidate = os.path.join(checkpoint.checkpoints_dir(path), str(step))
        try:
            integrity.restore_verified(candidate, {PARAMS_SUBDIR: target}, one_array_at_a_time=True)
        except storage.CheckpointDamagedError:
            continue
        rest = f"; older steps, not checked: {', '.join(map(str, older[i + 1:]))}" if older[i + 1:] else ""
        return f"intact: step {step} (pass {candidate} instead of {path}){rest}"
    return f"no older checkpoint of {path} is intact"


def to_numpy(tree):
    """A fully addressable copy of a (possibly sharded) tree as numpy arrays."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
