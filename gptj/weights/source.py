"""The weights service: every run and tool that reads model weights goes through here.

A weights spec names where they are:

    hf:PATH    a HuggingFace GPTJForCausalLM directory (config.json + safetensors or .bin)
    mtj:PATH   a mesh-transformer-jax checkpoint (step_N/shard_i/*.npz)
    PATH       a gptj workdir (its newest complete checkpoint) or params directory

`open_weights(spec)` reads only the model config; `Weights.place(shardings)`
then reads the arrays and lays them out on the mesh (each process reading
only what its devices hold, a layer at a time), `Weights.arrays()` gives
them to converters as LazyArrays read box by box, and `Weights.numpy()` as
host arrays.

The weights fix the model's shape. A run chooses the runtime fields
(`RUNTIME_FIELDS`: compute and storage dtypes, layer scan, remat, attention
kernel) whatever the weights were trained with; `with_runtime` merges the two
and refuses a shape override that the weights contradict.

Weights trained over a frozen base (`Adapted`): a workdir of a LoRA or
`train.trainable` run keeps only what it trained, and records its base
(`BASE_WEIGHTS_KEY` in its config.json: the base's spec, a `fingerprint` of
its values, the pattern of trained parameters); a PEFT adapter directory
(`lora.init_from=peft:DIR`) adapts the `init_from` weights. Reading such
weights reads the base, checks it is the one trained over, puts the trained
parameters in and merges LoRA adapters into their kernels, so every reader
gets a plain GPT-J parameter tree that runs at full speed.

Quantized weights (`python -m gptj.convert quantize`): a params directory
whose config.json records `quant_bits` (and group size, targets). Opening it
gives that config, so every reader builds the quantized model and reads the
integer matrices as stored (`place` casts only the floating-point leaves);
they are for inference: training refuses them (`gptj.settings`),
and so do a PEFT adapter over them and the converters.

Who calls what: training's `init_from` opens and places weights
(`gptj.train`); sampling, serving and evaluation call `load_for_inference`
(the workdir's own weights, else `init_from`); the converters read `arrays()`.
A server holding several adapters over one base reads each with
`open_adapter` (unmerged: a PEFT directory or a gptj LoRA workdir, checked
against the base it is served over).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from gptj.core import checkpoint
from gptj.core.param_tree import merge_params, param_paths, path_matcher, select_params
from gptj.core.partitioning import Partitioner, place
from gptj.core.streaming import LazyArray, read_all
from gptj.errors import ConfigError, WeightsError
from gptj.model import lora as lora_lib
from gptj.model import quantized as quantize
from gptj.model.transformer import GPTJConfig, LoraConfig, abstract_params, resolve_dtype
from gptj.weights import params_dir as params_io
from gptj.weights.spec import PEFT_PREFIX, parse_init_from, peft_adapter_dir

# Model fields a run may choose whatever the weights were trained with (numerics
# and memory policy); every other field is the weights' shape and comes from them.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")
# Inference keeps the run's numerics and kernel; there is no backward pass to remat.
INFERENCE_FIELDS = ("dtype", "param_dtype", "scan_layers", "attention_impl")
# The key of a run's config.json that records the frozen base it trained over.
BASE_WEIGHTS_KEY = "base_weights"


@dataclasses.dataclass(frozen=True)
class Weights:
    """Opened weights: where they are and their model config; the arrays are read by `place` or `numpy`.

    `kind` is "hf", "mtj" or "gptj" (a workdir or params directory). With
    `adapted`, they are parameters trained over a frozen base, read merged
    into it (see the module docstring).
    """

    kind: str
    path: str
    config: GPTJConfig
    adapted: "Adapted | None" = None

    @property
    def spec(self) -> str:
        """The weights spec that names them again (`hf:PATH`, `mtj:PATH` or PATH)."""
        return self.path if self.kind == "gptj" else f"{self.kind}:{self.path}"

    def arrays(self) -> Any:
        """The parameter tree as LazyArrays (`gptj.core.streaming`): nothing is read until a consumer reads their boxes.

        Their dtype is float32 for foreign formats (HF, mtj; any dtype on
        read: `astype` casts each box from the stored dtype), the stored one
        for gptj's. Weights adapted over a base are merged on the host first.
        """
        if self.adapted is not None:
            return jax.tree_util.tree_map(LazyArray.of, self.adapted.numpy(self.config))
        if self.kind == "hf":
            from gptj.weights.formats.hf import open_hf

            return open_hf(self.path, self.config.vocab_pad_multiple)[0]
        if self.kind == "mtj":
            from gptj.weights.formats.mtj import open_mtj

            return open_mtj(self.path, vocab_pad_multiple=self.config.vocab_pad_multiple)[0]
        return params_io.open_params(self.path)[0]

    def numpy(self) -> Any:
        """The parameter tree as host numpy arrays (fp32 for foreign formats, as stored for gptj's), checked."""
        if self.adapted is not None:
            return self.adapted.numpy(self.config)
        return read_all(self.arrays())

    def place(self, shardings, dtype=None) -> Any:
        """The parameters laid out by `shardings` (a tree of NamedShardings), cast to `dtype` if given.

        Each process reads only the boxes its devices own, a layer at a time
        for large stacked leaves, casting each floating-point box from the
        stored dtype (`gptj.core.partitioning.place`; quantized values stay
        integers); gptj weights are checked as they are read.
        """
        if self.adapted is not None:
            return self.adapted.place(self.config, shardings, dtype)
        if self.kind == "gptj":
            return params_io.load_params(self.path, shardings, dtype=dtype)[0]
        return place(self.arrays(), shardings, None if dtype is None else resolve_dtype(dtype))


@dataclasses.dataclass(frozen=True)
class Adapted:
    """Parameters trained over frozen base weights, merged into them whenever they are read.

    `source` "gptj": `path` is a workdir whose checkpoints hold only the
    parameters matching `trained` (LoRA adapters and/or `train.trainable`),
    stored in `param_dtype`; `fingerprint` is its base's when training began.
    `source` "peft": `path` is a PEFT adapter directory. `base_spec` names the
    base (opened with `base_pad`, the vocabulary padding the run used).
    """

    base_spec: str
    base_pad: int
    source: str
    path: str
    lora: LoraConfig | None
    trained: str = lora_lib.ADAPTER_PATTERN
    fingerprint: str = ""
    param_dtype: str = "float32"

    def _base(self, config: GPTJConfig) -> "Weights":
        """The base weights, opened, with the shape of the model trained over them."""
        try:
            base = open_weights(self.base_spec, self.base_pad)
        except WeightsError as e:
            raise WeightsError(
                f"{self.path}: its base weights {self.base_spec} cannot be read ({e}); a LoRA or frozen-parameter "
                "run keeps only what it trained, so it needs its base (pass --config.init_from=... if it moved)"
            ) from None
        if with_runtime(config, base) != config:
            raise WeightsError(f"{self.path}: the base weights {self.base_spec} have another shape "
                                         f"({base.config}) than the model trained over them ({config})")
        return base

    def _check(self, fingerprint_: str) -> None:
        if self.fingerprint and fingerprint_ != self.fingerprint:
            raise WeightsError(
                f"{self.path} was trained over base weights with fingerprint {self.fingerprint}, but "
                f"{self.base_spec} has fingerprint {fingerprint_}: a different base (pass the original with "
                "--config.init_from)")

    def _abstract_trained(self, config: GPTJConfig):
        """ShapeDtypeStructs of what the run trained (as its checkpoints hold it)."""
        abstract = nn.meta.unbox(abstract_params(config.replace(param_dtype=self.param_dtype), self.lora))
        return select_params(abstract, path_matcher(self.trained))[0]

    def trained_params(self, config: GPTJConfig, shardings=None):
        """What the run trained or the adapter holds, as host numpy arrays, or laid out by `shardings`.

        `shardings`: a function (path, leaf) -> sharding; default this process's first device.
        """
        if self.source == "peft":
            from gptj.weights.formats.peft import read_peft

            adapters = read_peft(self.path, config)[1]
            if shardings is None:
                return adapters
            return jax.tree_util.tree_map_with_path(lambda p, x: place(x, shardings(_path(p), x)), adapters)
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        where = shardings or (lambda path, leaf: local)
        target = jax.tree_util.tree_map_with_path(
            lambda p, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where(_path(p), a)),
            self._abstract_trained(config))
        restored = checkpoint.Checkpointer(self.path, read_only=True).restore({"params": target}, params_only=True)
        params = restored[0]["params"]
        return params if shardings else params_io.to_numpy(params)

    def numpy(self, config: GPTJConfig):
        """The whole parameter tree on the host: base, trained parameters in, adapters merged (fp32)."""
        base = self._base(config).numpy()
        self._check(fingerprint(base))
        return self._merged(base, self.trained_params(config))

    def place(self, config: GPTJConfig, shardings, dtype=None):
        """The whole parameter tree laid out by `shardings` (the base model's), in `dtype` if given.

        The base is read in `dtype` (bfloat16 or float32; float32 for others),
        the trained parameters and adapters are laid out beside it (adapters
        replicated: they are small), and each adapted kernel is merged in fp32.
        """
        read_dtype = dtype if dtype is None or resolve_dtype(dtype) in (jnp.bfloat16, jnp.float32) else "float32"
        base = self._base(config).place(shardings, read_dtype)
        self._check(fingerprint(base))
        by_path = dict(zip(param_paths(shardings), jax.tree_util.tree_leaves(shardings)))
        replicated = NamedSharding(next(iter(by_path.values())).mesh, PartitionSpec())
        trained = self.trained_params(
            config, lambda path, _: replicated if lora_lib.is_adapter(path) else by_path[path])
        merged = self._merged(base, trained, read_dtype)
        return merged if dtype is None else jax.tree_util.tree_map(lambda x: x.astype(resolve_dtype(dtype)), merged)

    def _merged(self, base, trained, dtype=None):
        base_part, adapters = lora_lib.split_adapters(trained)
        if dtype is not None:
            base_part = jax.tree_util.tree_map(lambda x: x.astype(resolve_dtype(dtype)), base_part)
        params = merge_params(base, base_part)
        if self.lora is None:
            return params
        # The base was read for this call alone: its kernels are merged in place.
        return lora_lib.merge(merge_params(params, adapters), self.lora, donate=True)


def _path(key_path) -> str:
    return "/".join(str(k.key) for k in key_path)


_PRIMES = (2654435761, 2246822519, 3266489917, 668265263, 374761393)


@jax.jit
def _layer_sum(x, index):
    """The position-weighted sum, uint32 modulo 2^32, of the bf16 bit patterns of x[index]."""
    x = jax.lax.dynamic_index_in_dim(x, index, keepdims=False)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
    position = jnp.uint32(1) + index.astype(jnp.uint32) * jnp.uint32(_PRIMES[0])
    for dim, prime in zip(range(x.ndim), _PRIMES[1:]):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(prime)
    return jnp.sum(bits * position, dtype=jnp.uint32)


def fingerprint(params) -> str:
    """A short digest of a parameter tree's paths, shapes and values, to tell one set of weights from another.

    Values count as bfloat16 (so the fp32 weights and their bf16 copy agree)
    and are summed as integers modulo 2^32, position-weighted: exact in any
    order, hence the same on any mesh, host or device. One pass over the
    weights where they are, a layer at a time for leaves stacked over layers
    (3+ dimensions), which bounds the temporaries of a backend that does not
    fuse the integer reduction (XLA:CPU) to one layer's.
    """
    digest = hashlib.sha256()
    for path, leaf in zip(param_paths(params), jax.tree_util.tree_leaves(params)):
        leaf = jnp.asarray(leaf)  # a host array is copied to the device once, not once per layer
        stacked = leaf if leaf.ndim >= 3 else leaf[None]
        total = sum(int(s) for s in jax.device_get([_layer_sum(stacked, i) for i in range(stacked.shape[0])]))
        digest.update(f"{path}:{tuple(leaf.shape)}:{total % 2**32};".encode())
    return digest.hexdigest()[:16]


def read_run_config(path: str) -> dict[str, Any]:
    """The run config a workdir's config.json records ({} when it has none, or none that reads)."""
    try:
        with open(os.path.join(path, checkpoint.CONFIG_FILE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}  # read_model_config has already said what is wrong with it, if anything


def _recorded_adaptation(path: str, base: str | None) -> Adapted | None:
    """The Adapted a workdir's config.json records (None for a run that trained everything)."""
    run = read_run_config(path)
    record = run.get(BASE_WEIGHTS_KEY)
    if not record:
        return None
    lora = LoraConfig.from_dict(run.get("lora", {}))
    model = run.get("model", {})
    return Adapted(base_spec=base or record["spec"], base_pad=int(model.get("vocab_pad_multiple", 1)), source="gptj",
                   path=path, lora=lora if lora.rank > 0 else None, trained=record["trained"],
                   fingerprint=record["fingerprint"], param_dtype=str(model.get("param_dtype", "float32")))


def with_peft_adapter(weights: Weights, spec: str) -> Weights:
    """`weights` with the PEFT adapter `spec` (peft:DIR) merged in whenever they are read."""
    from gptj.weights.formats.peft import read_peft_config

    path = peft_adapter_dir(spec)
    if weights.config.quant_bits:
        raise ConfigError(f"lora.init_from={spec}: {weights.spec} holds {quantize.describe(weights.config)}-quantized "
                          "weights, which an adapter cannot be merged into; merge it into the full-precision "
                          "weights, then quantize the merged model")
    adapted = Adapted(base_spec=weights.spec, base_pad=weights.config.vocab_pad_multiple, source="peft", path=path,
                      lora=read_peft_config(path))
    return dataclasses.replace(weights, adapted=adapted)


# The model fields that fix an adapter's shapes (another base's adapters differ in one of them).
ADAPTER_SHAPE_FIELDS = ("num_layers", "d_model", "num_heads", "mlp_dim")


def _adapter_weights(path: str) -> tuple[str, Weights | None]:
    """(its directory, None) for a PEFT adapter directory (`peft:DIR`, or a directory holding
    adapter_config.json), (its directory, its opened Weights) for a gptj LoRA workdir."""
    from gptj.weights.formats.peft import ADAPTER_CONFIG

    directory = peft_adapter_dir(path)
    if path.startswith(PEFT_PREFIX) or os.path.isfile(os.path.join(directory, ADAPTER_CONFIG)):
        return directory, None
    if not os.path.isdir(directory):
        raise WeightsError(f"{directory}: no such directory (expected a PEFT adapter directory or a gptj LoRA "
                           "workdir)")
    try:
        weights = open_weights(directory)
    except WeightsError as e:
        raise WeightsError(f"{directory}: neither a PEFT adapter directory (no {ADAPTER_CONFIG}) nor a gptj LoRA "
                           f"workdir ({e})") from None
    adapted = weights.adapted
    if adapted is None or adapted.lora is None:
        raise WeightsError(f"{directory}: a model trained in full, not LoRA adapters; serve it on its own "
                           "(--workdir)")
    if adapted.trained != lora_lib.ADAPTER_PATTERN:
        raise WeightsError(f"{directory}: trained {adapted.trained!r} besides LoRA adapters, which cannot be "
                           "served over a shared base; serve it on its own (--workdir)")
    return directory, weights


def open_adapter_config(path: str) -> LoraConfig:
    """The LoraConfig of an adapter `open_adapter` reads (its config file only)."""
    from gptj.weights.formats.peft import read_peft_config

    directory, weights = _adapter_weights(path)
    return read_peft_config(directory) if weights is None else weights.adapted.lora


def open_adapter(path: str, base: GPTJConfig, base_fingerprint: Callable[[], str] | None = None
                 ) -> tuple[LoraConfig, Any]:
    """(LoraConfig, the adapters as fp32 numpy) of a LoRA adapter to serve, unmerged, over the base `base`.

    `path` is a HuggingFace PEFT adapter directory (`peft:DIR` or a directory
    holding adapter_config.json) or a gptj workdir of a LoRA run. A workdir
    must have trained its adapters only (`train.trainable` unset) over a
    model of the base's shape; with `base_fingerprint` (a function giving
    the served base's `fingerprint`, or "" where it cannot be told), its
    recorded base must have the same fingerprint, so another base of the same
    shape is refused too (compared where the two pad the vocabulary alike).
    Raises WeightsError with one line saying what does not fit.
    """
    from gptj.weights.formats.peft import read_peft

    directory, weights = _adapter_weights(path)
    if weights is None:
        return read_peft(directory, base)
    adapted = weights.adapted
    theirs = {f: getattr(weights.config, f) for f in ADAPTER_SHAPE_FIELDS}
    ours = {f: getattr(base, f) for f in ADAPTER_SHAPE_FIELDS}
    if theirs != ours:
        raise WeightsError(f"{directory}: adapters of a model with {theirs}, but the served base has {ours}")
    comparable = weights.config.padded_vocab_size == base.padded_vocab_size and adapted.fingerprint
    served = base_fingerprint() if base_fingerprint is not None and comparable else ""
    if served and served != adapted.fingerprint:
        raise WeightsError(
            f"{directory} was trained over base weights with fingerprint {adapted.fingerprint}, but the served base "
            f"has fingerprint {served}: another base")
    trained = adapted.trained_params(weights.config)
    return adapted.lora, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), trained)


def open_weights(spec: str, vocab_pad_multiple: int = 1, base: str | None = None) -> Weights:
    """Opens the weights `spec` names, reading only their model config; see the module docstring.

    `vocab_pad_multiple` pads HF and mtj vocabularies on read (gptj weights
    keep the padding they were saved with). `base`: for a workdir trained
    over frozen base weights, where those are now (default: where it recorded
    them). Raises WeightsError for weights that are missing, malformed or of
    another architecture.
    """
    kind, path = parse_init_from(spec)
    if kind == "hf":
        from gptj.weights.formats.hf import read_hf_model_config

        config = read_hf_model_config(path, vocab_pad_multiple)
    elif kind == "mtj":
        from gptj.weights.formats.mtj import read_mtj_model_config

        config = read_mtj_model_config(path, vocab_pad_multiple=vocab_pad_multiple)
    else:
        config = params_io.read_model_config(path)
        return Weights(kind, os.path.abspath(path), config, _recorded_adaptation(os.path.abspath(path), base))
    return Weights(kind, os.path.abspath(path), config)  # absolute: a run records the spec of its base


def with_runtime(run: GPTJConfig, weights: Weights, explicit: Iterable[str] = (),
                 keep: tuple[str, ...] = RUNTIME_FIELDS) -> GPTJConfig:
    """The weights' model shape with the run's `keep` fields.

    `explicit` names the model fields given on the command line: one that is
    not a `keep` field and differs from the weights is a ConfigError (it would
    otherwise be silently dropped). HF and mtj weights are padded on read, so
    their vocabulary padding is the run's too.
    """
    if weights.kind != "gptj":
        keep = keep + ("vocab_pad_multiple",)
    merged = weights.config.replace(**{name: getattr(run, name) for name in keep})
    conflicts = sorted(f for f in explicit if f not in keep and getattr(run, f) != getattr(merged, f))
    if conflicts:
        detail = ", ".join(f"model.{f}={getattr(run, f)!r} but the weights have {getattr(merged, f)!r}"
                           for f in conflicts)
        raise ConfigError(f"the weights in {weights.spec} fix the model's shape: {detail}; drop the override")
    differing = [f for f in merged.to_dict() if getattr(run, f) != getattr(merged, f)]
    if differing:
        logging.info("model shape from %s (differs from the config file in %s)", weights.spec, differing)
    return merged


def param_shardings(config: GPTJConfig, partitioner: Partitioner):
    """NamedShardings of the model's params under the partitioner's rule set."""
    boxed = abstract_params(config)
    return partitioner.shardings_for(nn.get_partition_spec(boxed), nn.meta.unbox(boxed), optimizer_subtree=None)


def has_own_weights(workdir: str | None) -> bool:
    """Whether `workdir` is a params directory or a workdir holding a complete checkpoint."""
    if not workdir:
        return False
    return (os.path.isdir(os.path.join(workdir, params_io.PARAMS_SUBDIR))
            or checkpoint.latest_step(workdir) is not None)


def inference_weights(config, workdir: str | None) -> Weights:
    """The weights sampling, serving and eval use: the workdir's own, else the run's `init_from`.

    `config`: the run's settings (gptj.settings.RunSettings, or a ConfigDict
    of the same sections): `init_from`, `model.vocab_pad_multiple`, `lora.init_from`.

    A workdir that holds a checkpoint (or is a params directory) wins, so a run
    fine-tuned from `init_from` is used as trained (a LoRA or frozen-parameter
    workdir over its base: `init_from` if given, else the base it recorded).
    Otherwise `init_from`, with the PEFT adapter `lora.init_from` if given.
    """
    init_from = config.init_from
    if has_own_weights(workdir) or not init_from:
        if not workdir:
            raise ConfigError("no weights: pass --workdir (a trained workdir or params directory) or "
                              "--config.init_from")
        return open_weights(workdir, base=init_from or None)
    weights = open_weights(init_from, config.model.vocab_pad_multiple)
    adapter = config.lora.init_from
    return with_peft_adapter(weights, adapter) if adapter else weights


def load_for_inference(config, workdir: str | None, partitioner: Partitioner) -> tuple[Any, GPTJConfig]:
    """(params on the partitioner's mesh, their model config) for sampling, serving and eval.

    The weights decide the model's shape; the run's `model` section decides its numerics
    (`INFERENCE_FIELDS`), so `--config.model.dtype=bfloat16` runs fp32 weights
    in bf16. Params are stored in the compute dtype: inference keeps no fp32
    master copy. On a CPU, `sample.cpu_dtype` (float32 unless "model") replaces
    the compute dtype: XLA:CPU's bf16 matmuls are slower than its fp32 ones.
    """
    weights = inference_weights(config, workdir)
    run = GPTJConfig.from_dict(config.model.to_dict())
    model_config = with_runtime(run, weights, keep=INFERENCE_FIELDS).replace(remat_policy="none")
    cpu_dtype = config.sample.cpu_dtype
    if cpu_dtype != "model" and model_config.dtype != cpu_dtype and jax.default_backend() == "cpu":
        logging.info("computing in %s on this CPU, not model.dtype=%s (faster; twice the memory of bfloat16 "
                     "weights): --config.sample.cpu_dtype=model keeps %s", cpu_dtype, model_config.dtype,
                     model_config.dtype)
        model_config = model_config.replace(dtype=cpu_dtype)
    model_config = model_config.replace(param_dtype=model_config.dtype)
    params = weights.place(param_shardings(model_config, partitioner), dtype=model_config.dtype)
    return params, model_config
