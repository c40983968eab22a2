"""Params directories: `config.json` (the model section), an Orbax tree of parameters and its checksums.

    params_dir/config.json           the model config
    params_dir/params/               the Orbax params tree
    params_dir/integrity/metadata    the checksum manifest (`gptj.core.integrity`), written last

A params directory is what the converters write and what inference reads. It
is written a block at a time (`save_params` takes LazyArrays, see
`gptj.core.streaming`), each array stored in chunks of about a layer, and read
the same way: `open_params` gives LazyArrays, and `load_params` places them
onto any mesh and rule set, each process reading only the boxes its devices
own, a layer at a time. Every box read is checked against the manifest. A training workdir (`config.json`
with the whole run config, `checkpoints/`) is accepted wherever a params
directory is: `load_params` takes the params of its latest complete
checkpoint, and when those are damaged says which older checkpoint is intact.
So is one checkpoint step directory (`workdir/checkpoints/160`), which is how
an older step is chosen.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from gptj.core import checkpoint, integrity, storage, streaming
from gptj.core.checkpoint import CHECKPOINTS_SUBDIR, CONFIG_FILE
from gptj.core.partitioning import place
from gptj.core.streaming import LazyArray
from gptj.errors import CheckpointDamagedError, CheckpointError, IntegrityError, WeightsError
from gptj.model.transformer import GPTJConfig, abstract_params, resolve_dtype

# A params directory's tree has the same name as a checkpoint's params item, so
# the two are read the same way.
PARAMS_SUBDIR = checkpoint.PARAMS_ITEM


def read_json_in(directory: str, filename: str, expected: str) -> dict[str, Any]:
    """The JSON file `filename` of `directory` (a config an HF or PEFT directory holds); WeightsError if it
    is missing or unreadable, the message saying what `directory` was `expected` to be."""
    path = os.path.join(directory, filename)
    if not os.path.isdir(directory):
        raise WeightsError(f"{directory}: no such directory")
    if not os.path.isfile(path):
        raise WeightsError(f"{directory}: no {filename}; expected {expected}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e


def read_model_config(path: str) -> GPTJConfig:
    """The model config of a params directory or workdir (its `config.json`), or of a checkpoint step directory.

    A step directory holds the run config saved with it; where that has no
    model (a checkpoint saved without one), the config.json of the workdir
    around it (WORKDIR/checkpoints/N) is used.
    """
    step_config = os.path.join(path, checkpoint.CONFIG_ITEM, integrity.JSON_FILE)  # the run config saved with a step
    parent = os.path.dirname(os.path.normpath(path))
    workdir_config = (os.path.join(os.path.dirname(parent), CONFIG_FILE)
                      if os.path.basename(parent) == CHECKPOINTS_SUBDIR else None)
    candidates = [os.path.join(path, CONFIG_FILE), step_config, workdir_config]
    for config_path in filter(None, candidates):
        if not os.path.isfile(config_path):
            continue
        try:
            with open(config_path) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise WeightsError(f"{config_path}: unreadable ({e})") from e
        if config_path != step_config or values.get("model"):
            break
    else:
        raise WeightsError(f"{path}: no {CONFIG_FILE}; expected a gptj params directory, workdir or checkpoint "
                           "step directory")
    values = values.get("model", values)  # a workdir's config.json holds the whole run config
    try:
        return GPTJConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{config_path}: not a GPT-J model config ({e})") from e


def save_params(path: str, params: Any, config: GPTJConfig) -> None:
    """Writes `params`, their checksums and the model config as a params directory.

    Leaves may be host arrays, LazyArrays (read and written a block at a time,
    so a converter never holds the model: see `gptj.core.streaming`) or jax
    arrays (sharded or not). Every process must call this (Orbax writes each
    jax shard from its owner, and the checksums are a collective); process 0
    writes the host and lazy leaves and the JSON files. Checksums of lazy and
    host leaves are taken from the blocks as they are written. The sources
    the lazy leaves were read from are checked before the manifest is
    written, which is last: a directory whose save was cut short reads as
    damaged, never as complete, and one whose source turned out damaged is
    removed.
    """
    path = os.path.abspath(path)
    params_path = os.path.join(path, PARAMS_SUBDIR)
    if os.path.exists(params_path):
        raise WeightsError(f"{path} already holds params; choose a new output directory")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    streamed = integrity.StreamedDigests([np.shape(leaf) for leaf in leaves])
    to_save = [leaf if isinstance(leaf, jax.Array) else _digested(LazyArray.of(leaf), streamed, i)
               for i, leaf in enumerate(leaves)]
    created = not os.path.exists(path)
    try:
        if jax.process_index() == 0:
            storage.write_json_atomic(os.path.join(path, CONFIG_FILE), config.to_dict())
        try:
            streaming.save_tree(params_path, jax.tree_util.tree_unflatten(treedef, to_save))
        except Exception as e:  # noqa: BLE001 - a full disk or a refused write, as one line
            if isinstance(e, (CheckpointError, WeightsError)):
                raise
            if isinstance(e, IntegrityError):  # the source is damaged, not the output
                streaming.finish_reading(params, e)
            raise storage.as_storage_error(e, path, "cannot write params to") from e
        streaming.finish_reading(params)
    except BaseException:
        if jax.process_index() == 0:
            _remove_output(path, created)
        raise
    digests = streamed.digests()
    on_device = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
    for i, digest in zip(on_device, integrity.array_digests([leaves[i] for i in on_device])):
        digests[i] = digest
    manifest = integrity.build_manifest({PARAMS_SUBDIR: params}, digests={PARAMS_SUBDIR: digests})
    if jax.process_index() == 0:
        storage.write_json_atomic(integrity.manifest_path(path), manifest)


def _digested(leaf: LazyArray, digests: integrity.StreamedDigests, index: int) -> LazyArray:
    """`leaf`, adding each block it gives to `digests` (array `index`): its checksum is taken as it is written."""
    def read(box, dtype, primary):
        values = leaf.read(box, primary)
        digests.add(index, values, tuple(s.start for s in box))
        return values

    return LazyArray(leaf.shape, leaf.dtype, read)


def _remove_output(path: str, created: bool) -> None:
    """Removes what a failed `save_params` wrote into `path` (all of it if it created `path`)."""
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return
    shutil.rmtree(os.path.join(path, PARAMS_SUBDIR), ignore_errors=True)
    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        os.remove(os.path.join(path, CONFIG_FILE))


def abstract_params_like(config: GPTJConfig, shardings=None, dtype=None):
    """ShapeDtypeStructs of the model's params (optionally with shardings and a storage dtype)."""
    abstract = nn.meta.unbox(abstract_params(config))
    if shardings is None:
        # Orbax would otherwise try to recreate the saving run's device layout.
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: local, abstract)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), abstract, shardings)


def param_shapes(config: GPTJConfig) -> dict[str, tuple[int, ...]]:
    """{leaf path, e.g. "blocks/attn/q_proj": shape} of the model's parameters, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params(config)))[0]
    return {"/".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """A nested dict from {"a/b/c": value} (the inverse of `param_shapes`' paths)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, name = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = value
    return tree


def resolve_params_path(path: str) -> str:
    """The Orbax params tree inside a params directory, or inside a workdir's latest checkpoint."""
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: no such directory")
    if os.path.isdir(os.path.join(path, PARAMS_SUBDIR)):
        return os.path.join(os.path.abspath(path), PARAMS_SUBDIR)
    if os.path.isdir(os.path.join(path, CHECKPOINTS_SUBDIR)):
        try:
            return checkpoint.latest_params_path(path)
        except CheckpointError as e:
            raise WeightsError(str(e)) from None
    raise WeightsError(f"{path}: neither a params directory (config.json + params/) nor a workdir (checkpoints/)")


class _CheckedRead:
    """The checks of one saved params tree read box by box (a `gptj.core.streaming.Source`).

    Every box read as primary is hashed as it arrives (`integrity.block_digest`);
    once the reader is done, `verify` compares each array's sum with the
    manifest, the same verdict on every process.
    """

    def __init__(self, directory: str, entries: dict[str, Any], names: list[str], shapes: list[tuple[int, ...]]):
        self.directory, self.entries, self.names = directory, entries, names
        self.digests = integrity.StreamedDigests(shapes)

    def reader(self, index: int, store) -> streaming.Reader:
        """The box reader of array `index`, stored in the opened TensorStore `store`."""
        def read(box, dtype, primary):
            try:
                values = np.asarray(store[box].read().result())
            except Exception as e:  # noqa: BLE001 - TensorStore reports damaged data with many types
                if storage.storage_fault(e):
                    raise
                raise IntegrityError(self.names[index], f"unreadable ({storage.reason(e)})") from e
            if primary:
                self.digests.add(index, values, tuple(s.start for s in box))
            return values.astype(dtype, copy=False)

        return read

    def verify(self, error: BaseException | None = None) -> None:
        """Raises CheckpointDamagedError for the first array whose checksum differs (every process must call it).

        `error`: this process's read failure, raised on every process
        (damaged data as CheckpointDamagedError).
        """
        def raise_error():
            if error is not None:
                raise error

        integrity.agreed(self.directory, None, raise_error)
        for name, digest in zip(self.names, self.digests.digests()):
            saved = self.entries[name]["digest"]
            if saved != digest:
                raise CheckpointDamagedError(self.directory, name,
                                                     f"checksum mismatch (saved {saved}, read {digest})")


def _open_checked(directory: str, config: GPTJConfig) -> Any:
    """The params tree saved in `directory` (a params or step directory) as checked LazyArrays in their saved dtypes."""
    target = {PARAMS_SUBDIR: abstract_params_like(config)}
    entries, layouts = integrity.agreed(directory, None, lambda: integrity.open_manifest(directory, target))
    layout = layouts[PARAMS_SUBDIR]
    leaves, treedef = jax.tree_util.tree_flatten(layout)
    names = integrity.leaf_names(layout, PARAMS_SUBDIR + "/")
    checked = _CheckedRead(directory, entries[PARAMS_SUBDIR], names, [leaf.shape for leaf in leaves])
    stores = integrity.agreed(directory, None, lambda: jax.tree_util.tree_leaves(
        streaming.open_tree(os.path.join(directory, PARAMS_SUBDIR), layout)))
    return jax.tree_util.tree_unflatten(treedef, [
        LazyArray(leaf.shape, leaf.dtype, checked.reader(i, store), checked)
        for i, (leaf, store) in enumerate(zip(leaves, stores))])


def open_params(path: str) -> tuple[Any, GPTJConfig]:
    """(the params as LazyArrays in their saved dtypes, the model config) of a params directory, workdir or step.

    Nothing but metadata is read until the arrays are: every box a consumer
    reads is checked as it arrives, and the consumer's `finish_reading`
    (which `gptj.core.partitioning.place`, `save_params` and the HF writer call)
    gives the verdict. Raises WeightsError for a directory that is not a
    params directory, CheckpointError for one of another model.
    """
    config = read_model_config(path)
    return _open_checked(os.path.dirname(resolve_params_path(path)), config), config


def load_params(path: str, shardings=None, dtype=None) -> tuple[Any, GPTJConfig]:
    """Reads params from a params directory, workdir or step directory, checked, laid out by `shardings` if given.

    `shardings` is a tree of NamedShardings matching the params (from
    `Partitioner.abstract_state`); without it the params land on this
    process's first device, whatever mesh they were saved from. Each process
    reads only the boxes its devices own, a layer at a time for large stacked
    leaves (`gptj.core.partitioning.place`), casting each floating-point one to
    `dtype` (e.g. bfloat16 for inference) as it is read (integers, such as
    quantized values, stay as stored). Damaged params are a WeightsError
    that names the first bad array and, for a workdir, the newest intact step.
    """
    try:
        arrays, config = open_params(path)
        if shardings is None:
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: local, arrays)
        return place(arrays, shardings, None if dtype is None else resolve_dtype(dtype)), config
    except CheckpointDamagedError as e:
        raise WeightsError(f"{e}; {intact_alternative(path, e.path)}") from e
    except CheckpointError as e:
        raise WeightsError(str(e)) from e


def intact_alternative(path: str, damaged: str) -> str:
    """What to use instead of the damaged `damaged`: the newest older checkpoint of workdir `path` that is intact.

    Inference and the converters never fall back on their own; this names the
    way out. Older steps are checked newest first (read block by block),
    until one passes.
    """
    checkpoints = os.path.join(path, CHECKPOINTS_SUBDIR)
    if os.path.dirname(os.path.abspath(damaged)) != os.path.abspath(checkpoints):
        return "nothing was read from it"  # a params directory, or a damaged base of a LoRA workdir
    damaged_step = int(os.path.basename(damaged))
    older = [s for s in reversed(checkpoint.all_steps(path)) if s < damaged_step]
    for i, step in enumerate(older):
        candidate = os.path.join(checkpoint.checkpoints_dir(path), str(step))
        try:
            streaming.read_through(_open_checked(candidate, read_model_config(path)))
        except CheckpointDamagedError:
            continue
        rest = f"; older steps, not checked: {', '.join(map(str, older[i + 1:]))}" if older[i + 1:] else ""
        return f"intact: step {step} (pass {candidate} instead of {path}){rest}"
    return f"no older checkpoint of {path} is intact"


def to_numpy(tree):
    """A fully addressable copy of a (possibly sharded) tree as numpy arrays."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
