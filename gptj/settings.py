"""Checks a run config before anything is built or compiled, with one clear line per problem.

`validate(config, mode)` raises ConfigError naming every problem it finds:
unknown sections or keys (against gptj/configs/base.py), an invalid model,
mesh or rule set, optimizer and train settings out of range, a batch that
does not split over the data-parallel devices and microbatches, unknown
seqio tasks, a malformed `init_from`, LoRA settings and `train.trainable`,
and quantized weights for training.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Mapping
from gptj.errors import ConfigError
from gptj.weights.spec import PEFT_PREFIX, parse_init_from

MODES = ("train", "eval", "sample", "serve", "plan")
# What a run may keep its frozen parameters in (lora.base_dtype).
BASE_DTYPES = ("bfloat16", "float32")


def _unknown_keys(config: Mapping[str, Any], schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names in `config` that `schema` lacks (recursing into sections)."""
    unknown = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in schema:
            unknown.append(name)
        elif isinstance(value, Mapping) and isinstance(schema[key], Mapping):
            unknown.extend(_unknown_keys(value, schema[key], name + "."))
    return unknown


def _check_optimizer(opt, problems: list[str]) -> None:
    if not opt.lr > 0:
        problems.append(f"optimizer.lr must be positive, got {opt.lr}")
    if opt.end_lr < 0:
        problems.append(f"optimizer.end_lr must be >= 0, got {opt.end_lr}")
    if opt.warmup_steps < 0:
        problems.append(f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
    if opt.anneal_steps <= 0:
        problems.append(f"optimizer.anneal_steps must be positive (set end_lr = lr for a constant rate), "
                        f"got {opt.anneal_steps}")
    if opt.weight_decay < 0:
        problems.append(f"optimizer.weight_decay must be >= 0, got {opt.weight_decay}")
    for name in ("b1", "b2"):
        if not 0 <= opt[name] < 1:
            problems.append(f"optimizer.{name} must lie in [0, 1), got {opt[name]}")
    if not opt.eps > 0:
        problems.append(f"optimizer.eps must be positive, got {opt.eps}")
    if opt.clip_norm < 0:
        problems.append(f"optimizer.clip_norm must be >= 0 (0 disables clipping), got {opt.clip_norm}")


def _check_train(config, data_parallel: int | None, problems: list[str]) -> None:
    from gptj.core.hooks import parse_profile_steps

    train = config.train
    for name in ("batch_size", "microbatches", "total_steps", "log_every", "keep_last"):
        if train[name] <= 0:
            problems.append(f"train.{name} must be positive, got {train[name]}")
    for name in ("ckpt_every", "keep_every", "eval_every", "val_batches"):
        if train[name] < 0:
            problems.append(f"train.{name} must be >= 0, got {train[name]}")
    if train.z_loss < 0:
        problems.append(f"train.z_loss must be >= 0, got {train.z_loss}")
    if train.loss_chunk_tokens < 0:
        problems.append(f"train.loss_chunk_tokens must be >= 0 (0: the full-logits loss), got {train.loss_chunk_tokens}")
    if train.loss_chunk_vocab < -1:
        problems.append(f"train.loss_chunk_vocab must be -1 (auto), 0 (whole vocabulary) or positive, "
                        f"got {train.loss_chunk_vocab}")
    if train.peak_flops_per_device < 0:
        problems.append(f"train.peak_flops_per_device must be >= 0, got {train.peak_flops_per_device}")
    if train.on_nonfinite not in ("stop", "skip"):
        problems.append(f"train.on_nonfinite must be 'stop' or 'skip', got {train.on_nonfinite!r}")
    try:
        parse_profile_steps(train.profile_steps)
    except ValueError as e:
        problems.append(str(e))
    if data_parallel and train.batch_size > 0 and train.microbatches > 0:
        if train.batch_size % (data_parallel * train.microbatches):
            problems.append(
                f"train.batch_size={train.batch_size} must be divisible by the data-parallel size ({data_parallel}, "
                f"from mesh.data and rule set {config.mesh.rules!r}) times train.microbatches="
                f"{train.microbatches} = {data_parallel * train.microbatches}")
    if config.data.seq_len <= 0:
        problems.append(f"data.seq_len must be positive, got {config.data.seq_len}")
    elif not config.init_from and config.data.seq_len > config.model.max_len:
        problems.append(f"data.seq_len={config.data.seq_len} exceeds model.max_len={config.model.max_len}")
    if not config.data.train_task:
        problems.append("data.train_task is empty: name the seqio task to train on")
    if train.use_wandb and importlib.util.find_spec("wandb") is None:
        problems.append("train.use_wandb is set but wandb is not installed (pip install wandb)")


def _check_init_from(spec: str, problems: list[str]) -> None:
    kind, path = parse_init_from(spec)
    if not path:
        problems.append(f"init_from={spec!r} names no path")
    elif not os.path.exists(path):
        problems.append(f"init_from={spec!r}: {path} does not exist")
    elif kind == "gptj":
        from gptj.weights import params_dir as params_io

        try:  # a params directory, a workdir, or one step of it (workdir/checkpoints/N: an older step)
            params_io.read_model_config(path)
        except params_io.WeightsError as e:
            problems.append(f"init_from={spec!r}: {e}; use hf:PATH for HuggingFace or mtj:PATH for "
                            "mesh-transformer-jax checkpoints")


def _check_lora(config, mode: str, problems: list[str]) -> None:
    """LoRA settings, `train.trainable` as a regular expression, and the base weights a frozen run needs."""
    from gptj.model.transformer import LoraConfig

    lora = config.lora
    try:
        LoraConfig.from_dict(lora.to_dict())
    except (TypeError, ValueError) as e:
        problems.append(f"lora: {e}")
    if lora.base_dtype not in BASE_DTYPES:
        problems.append(f"lora.base_dtype must be one of {BASE_DTYPES}, got {lora.base_dtype!r}")
    if lora.init_from:
        path = lora.init_from[len(PEFT_PREFIX):]
        if not lora.init_from.startswith(PEFT_PREFIX) or not path:
            problems.append(f"lora.init_from={lora.init_from!r} must name a PEFT adapter directory as peft:DIR")
        elif not os.path.isdir(path):
            problems.append(f"lora.init_from={lora.init_from!r}: {path} does not exist")
    trainable = config.train.trainable
    if trainable:
        try:
            re.compile(trainable)
        except re.error as e:
            problems.append(f"train.trainable={trainable!r} is not a regular expression ({e})")
    freezes = bool(trainable) or lora.rank > 0 or bool(lora.init_from)
    if mode == "train" and freezes and not config.init_from:
        problems.append("LoRA and train.trainable freeze base weights: set init_from to the weights to fine-tune "
                        "(hf:PATH, mtj:PATH or a gptj workdir / params directory)")


def _recorded_quantization(path: str) -> str:
    """'int8 per channel' etc. when the gptj weights at `path` are quantized ('' if not, or unreadable here)."""
    from gptj.weights import params_dir as params_io
    from gptj.model import quantized as quantize

    try:
        return quantize.describe(params_io.read_model_config(path))
    except params_io.WeightsError:
        return ""  # reading the weights says what is wrong with them


def _check_not_quantized(config, workdir: str | None, problems: list[str]) -> None:
    """Training refuses quantized weights: integers have no gradient, and their rounding would be trained in."""
    advice = "quantized weights are for sampling, serving and evaluation; train the full-precision weights"
    if config.model.get("quant_bits", 0):
        problems.append(f"model.quant_bits={config.model.quant_bits}: {advice}")
    kind, path = parse_init_from(str(config.init_from or ""))
    if kind == "gptj" and path and os.path.isdir(path) and _recorded_quantization(path):
        problems.append(f"init_from={path} holds {_recorded_quantization(path)}-quantized weights: {advice} they "
                        "were made from")
    if workdir and os.path.isdir(workdir) and _recorded_quantization(workdir):
        problems.append(f"--workdir={workdir} is a params directory of {_recorded_quantization(workdir)}-quantized "
                        f"weights, not a training workdir: {advice} in a new workdir")


def _check_harness_tasks(config, problems: list[str]) -> None:
    """Harness tasks asked for during training must exist and have local data before step 1."""
    if not list(config.eval.harness_tasks):
        problems.append("eval.during_training is set but eval.harness_tasks is empty")
        return
    from gptj.evaluation import harness_tasks as eval_tasks  # imports lm-eval: only for runs that evaluate while training
    try:
        eval_tasks.load_tasks(list(config.eval.harness_tasks), str(config.eval.include_path or ""))
    except eval_tasks.EvalError as e:
        problems.append(f"eval: {e}")


def validate(config, mode: str = "train", *, check_tasks: bool = True, workdir: str | None = None) -> None:
    """Raises ConfigError listing every problem of `config` for `mode`; returns None if it can run.

    Touches no accelerator memory and compiles nothing (it asks jax only for
    the device count). In train mode, `check_tasks` registers the config's
    seqio tasks to prove they exist (runs on in-memory data turn it off) and,
    with `eval.during_training`, finds the harness tasks and their local data;
    it refuses quantized weights as `init_from`, or as `workdir` when given.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    from gptj.configs import base
    from gptj.model.transformer import GPTJConfig
    from gptj.core.partitioning import Partitioner, make_mesh
    from gptj.errors import PartitioningError

    problems = [f"unknown config key {name!r}" for name in _unknown_keys(config.to_dict(), base.get_config().to_dict())]
    if problems:  # the checks below would trip over the same misspelt names
        raise ConfigError("; ".join(problems) + " (see gptj/configs/base.py for the known keys)")
    try:
        GPTJConfig.from_dict(config.model.to_dict())
    except (TypeError, ValueError) as e:
        problems.append(f"model: {e}")
    data_parallel = None
    try:  # a plan is made for a machine other than this one, so its mesh is checked there
        if mode != "plan":
            mesh = make_mesh(config.mesh.data, config.mesh.model)
            data_parallel = Partitioner(mesh, config.mesh.rules).data_parallel_size
    except PartitioningError as e:
        problems.append(str(e))
    if config.init_from:
        _check_init_from(config.init_from, problems)
    _check_lora(config, mode, problems)
    if mode == "train":
        _check_not_quantized(config, workdir, problems)
        _check_optimizer(config.optimizer, problems)
        _check_train(config, data_parallel, problems)
    if check_tasks and mode == "train" and not problems:
        from gptj.data import tasks
        try:
            tasks.register_tasks_for_config(config)
        except ValueError as e:
            problems.append(f"data: {e}")
    if check_tasks and mode == "train" and not problems and config.eval.during_training:
        _check_harness_tasks(config, problems)
    if problems:
        raise ConfigError("; ".join(problems))
