"""The weights service: every run and tool that reads model weights goes through here.

A weights spec names where they are:

    hf:PATH    a HuggingFace GPTJForCausalLM directory (config.json + safetensors or .bin)
    mtj:PATH   a mesh-transformer-jax checkpoint (step_N/shard_i/*.npz)
    PATH       a gptj workdir (its newest complete checkpoint) or params directory

`open_weights(spec)` reads only the model config; `Weights.place(shardings)`
then reads the arrays and lays them out on the mesh, and `Weights.numpy()`
gives them to converters as host arrays.

The weights fix the model's shape. A run chooses the runtime fields
(`RUNTIME_FIELDS`: compute and storage dtypes, layer scan, remat, attention
kernel) whatever the weights were trained with; `with_runtime` merges the two
and refuses a shape override that the weights contradict.

Who calls what: training's `init_from` opens and places weights
(`gptj.train_lm`); sampling, serving and evaluation call `load_for_inference`
(the workdir's own weights, else `init_from`); the converters read `numpy()`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

import flax.linen as nn
from absl import logging

from gptj import checkpoint, params_io
from gptj.config_validation import ConfigError, parse_init_from
from gptj.model import GPTJConfig, abstract_params, resolve_dtype
from gptj.partitioning import Partitioner, place

# Model fields a run may choose whatever the weights were trained with (numerics
# and memory policy); every other field is the weights' shape and comes from them.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")
# Inference keeps the run's numerics and kernel; there is no backward pass to remat.
INFERENCE_FIELDS = ("dtype", "param_dtype", "scan_layers", "attention_impl")


@dataclasses.dataclass(frozen=True)
class Weights:
    """Opened weights: where they are and their model config; the arrays are read by `place` or `numpy`.

    `kind` is "hf", "mtj" or "gptj" (a workdir or params directory).
    """

    kind: str
    path: str
    config: GPTJConfig

    @property
    def spec(self) -> str:
        """The weights spec that names them again (`hf:PATH`, `mtj:PATH` or PATH)."""
        return self.path if self.kind == "gptj" else f"{self.kind}:{self.path}"

    def numpy(self) -> Any:
        """The parameter tree as host numpy arrays (fp32 for foreign formats, as stored for gptj's)."""
        if self.kind == "hf":
            from gptj.convert.hf import read_hf

            return read_hf(self.path, self.config.vocab_pad_multiple)[0]
        if self.kind == "mtj":
            from gptj.convert.mtj import read_mtj

            return read_mtj(self.path, vocab_pad_multiple=self.config.vocab_pad_multiple)[0]
        return params_io.to_numpy(params_io.load_params(self.path)[0])

    def place(self, shardings, dtype=None) -> Any:
        """The parameters laid out by `shardings` (a tree of NamedShardings), cast to `dtype` if given.

        gptj weights are restored straight into their shards (Orbax reshards on
        read); foreign weights are converted on the host, then each process
        copies the slices its devices own.
        """
        if self.kind == "gptj":
            return params_io.load_params(self.path, shardings, dtype=dtype)[0]
        return place(self.numpy(), shardings, None if dtype is None else resolve_dtype(dtype))


def open_weights(spec: str, vocab_pad_multiple: int = 1) -> Weights:
    """Opens the weights `spec` names, reading only their model config; see the module docstring.

    `vocab_pad_multiple` pads HF and mtj vocabularies on read (gptj weights
    keep the padding they were saved with). Raises WeightsError for weights
    that are missing, malformed or of another architecture.
    """
    kind, path = parse_init_from(spec)
    if kind == "hf":
        from gptj.convert.hf import read_hf_model_config

        config = read_hf_model_config(path, vocab_pad_multiple)
    elif kind == "mtj":
        from gptj.convert.mtj import read_mtj_model_config

        config = read_mtj_model_config(path, vocab_pad_multiple=vocab_pad_multiple)
    else:
        config = params_io.read_model_config(path)
    return Weights(kind, os.path.abspath(path) if kind == "gptj" else path, config)


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
    """The weights sampling, serving and eval use: the workdir's own, else `config.init_from`.

    A workdir that holds a checkpoint (or is a params directory) wins, so a run
    fine-tuned from `init_from` is used as trained.
    """
    init_from = str(config.get("init_from", "") or "")
    if has_own_weights(workdir) or not init_from:
        if not workdir:
            raise ConfigError("no weights: pass --workdir (a trained workdir or params directory) or "
                              "--config.init_from")
        return open_weights(workdir)
    return open_weights(init_from, int(config.model.vocab_pad_multiple))


def load_for_inference(config, workdir: str | None, partitioner: Partitioner) -> tuple[Any, GPTJConfig]:
    """(params on the partitioner's mesh, their model config) for sampling, serving and eval.

    The weights decide the model's shape; `config.model` decides its numerics
    (`INFERENCE_FIELDS`), so `--config.model.dtype=bfloat16` runs fp32 weights
    in bf16. Params are stored in the compute dtype: inference keeps no fp32
    master copy.
    """
    weights = inference_weights(config, workdir)
    run = GPTJConfig.from_dict(config.model.to_dict())
    model_config = with_runtime(run, weights, keep=INFERENCE_FIELDS).replace(remat_policy="none")
    model_config = model_config.replace(param_dtype=model_config.dtype)
    params = weights.place(param_shardings(model_config, partitioner), dtype=model_config.dtype)
    return params, model_config
