"""GPT-J language-model training: binds a run config to the generic Trainer.

`train_and_evaluate(config, workdir)` is what `main.py --mode=train` runs on
every host:

1. the model config: the workdir's own (when it holds a checkpoint to resume),
   else that of the weights `init_from` names, else `config.model`;
2. mesh + rule set -> Partitioner; GPT-J module, next-token loss (optional
   z-loss), the reference's optimizer -> Trainer;
3. `workdir/config.json` (the resolved run config; its "model" is the model);
4. the train state: resume the workdir's newest complete checkpoint (with the
   data iterator's position), else start from `init_from`, else initialise;
5. AOT compile (per-device memory is logged), then the loop with metrics,
   validation, checkpoint and profiling hooks; SIGTERM/SIGINT saves and
   returns 'preempted'.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable, Iterable, NamedTuple

import jax
import numpy as np
from absl import logging

from gptj import checkpoint as ckpt_lib
from gptj import losses
from gptj import metrics as metrics_lib
from gptj import optimizer as optimizer_lib
from gptj import train_hooks
from gptj.config_validation import ConfigError, parse_init_from, validate
from gptj.model import GPTJ, GPTJConfig, count_params, resolve_dtype
from gptj.params_io import CONFIG_FILE, read_model_config
from gptj.partitioning import Partitioner
from gptj.trainer import Trainer

# Model fields a run may choose whatever the weights were trained with (numerics
# and memory policy); every other field is the weights' shape and comes from them.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")
# Resuming keeps the checkpoint's master-weight dtype (its optimizer state was saved in it).
RESUME_FIELDS = tuple(f for f in RUNTIME_FIELDS if f != "param_dtype")


class InitSource(NamedTuple):
    """What `init_from` names: kind ('hf', 'mtj', 'gptj'), path, its model config, numpy params if read."""

    kind: str
    path: str
    model: GPTJConfig
    params: Any = None


def _run_model(config) -> GPTJConfig:
    return GPTJConfig.from_dict(config.model.to_dict())


def _merge_model(run: GPTJConfig, weights: GPTJConfig, source: str, explicit: Iterable[str],
                 keep: tuple[str, ...] = RUNTIME_FIELDS) -> GPTJConfig:
    """The weights' shape with the run's `keep` fields; an explicit override of a shape field that differs is an error."""
    merged = weights.replace(**{name: getattr(run, name) for name in keep})
    conflicts = sorted(f for f in explicit if f not in keep and getattr(run, f) != getattr(merged, f))
    if conflicts:
        detail = ", ".join(f"model.{f}={getattr(run, f)!r} but the weights have {getattr(merged, f)!r}"
                           for f in conflicts)
        raise ConfigError(f"the weights in {source} fix the model's shape: {detail}; drop the override")
    differing = [f for f in weights.to_dict() if getattr(run, f) != getattr(merged, f)]
    if differing:
        logging.info("model shape from %s (differs from the config file in %s)", source, differing)
    return merged


def load_init_source(config, *, read_weights: bool) -> InitSource:
    """Resolves `config.init_from` to its model config (and, for hf/mtj with `read_weights`, its numpy params)."""
    kind, path = parse_init_from(config.init_from)
    pad = int(config.model.vocab_pad_multiple)
    if kind == "hf" and not read_weights:
        from gptj.convert import hf
        with open(os.path.join(path, CONFIG_FILE)) as f:
            return InitSource(kind, path, hf.model_config_from_hf(json.load(f), pad))
    if kind != "gptj":  # the mtj reader yields the model config only together with the weights
        from gptj import convert
        params, model = convert.read_weights(kind, path, pad)
        return InitSource(kind, path, model, params)
    return InitSource(kind, path, read_model_config(path))


def resolve_model_config(config, workdir: str | None = None, explicit_model_fields: Iterable[str] = (),
                         init_source: InitSource | None = None) -> GPTJConfig:
    """The model to train: the resumed workdir's, else the init_from weights', else config.model (see module doc)."""
    run = _run_model(config)
    if workdir and ckpt_lib.latest_step(workdir) is not None:
        return _merge_model(run, read_model_config(workdir), f"workdir {workdir}", explicit_model_fields,
                            keep=RESUME_FIELDS)
    if init_source is not None:
        # HF weights are padded on read, so the run chooses the padding there.
        keep = RUNTIME_FIELDS + (("vocab_pad_multiple",) if init_source.kind == "hf" else ())
        return _merge_model(run, init_source.model, f"init_from={config.init_from}", explicit_model_fields, keep)
    return run


def resolved_config(config, model: GPTJConfig):
    """A copy of the run config whose model section is `model`."""
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        resolved.model.update(model.to_dict())
    return resolved


def build_trainer(config, model: GPTJConfig, partitioner: Partitioner) -> Trainer:
    """The Trainer for a GPT-J model under `config`'s optimizer and train settings."""
    from gptj.data import train_batch_spec

    optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer.to_dict())
    z_loss = float(config.train.z_loss)
    return Trainer(
        GPTJ(model), lambda logits, batch: losses.next_token_loss(logits, batch, z_loss, accuracy=False),
        optimizer, partitioner, train_batch_spec(config), microbatches=int(config.train.microbatches),
        summarize=losses.summarize, lr_schedule=schedule, on_nonfinite=config.train.on_nonfinite,
        eval_loss_fn=lambda logits, batch: losses.next_token_loss(logits, batch, z_loss))


def build_partitioner(config) -> Partitioner:
    """The mesh and rule set the config names, over every device of every host."""
    return Partitioner.from_config(config.mesh)


class PlanStep(NamedTuple):
    """The train step of a config, unallocated: `train_step.lower(abstract_state, abstract_batch).compile()`."""

    train_step: Any
    abstract_state: Any
    abstract_batch: Any
    trainer: Trainer


def build_train_step_for_plan(config, partitioner: Partitioner | None = None) -> PlanStep:
    """The jitted train step with abstract (sharded ShapeDtypeStruct) state and batch; nothing is allocated.

    `PlanStep.trainer.compile()` compiles it ahead of time and returns a
    `gptj.trainer.MemoryReport` (per-device params, optimizer state and
    temporaries). The model config follows init_from for gptj and hf weights
    (read from their config.json); for mtj it is config.model.
    """
    partitioner = partitioner or build_partitioner(config)
    source = None
    if config.init_from and parse_init_from(config.init_from)[0] != "mtj":
        source = load_init_source(config, read_weights=False)
    trainer = build_trainer(config, resolve_model_config(config, init_source=source), partitioner)
    return PlanStep(trainer.jitted_train_step, trainer.abstract_state, trainer.abstract_batch, trainer)


def _put_numpy(params, shardings):
    """Numpy params -> global arrays laid out by `shardings` (each host copies only its own shards)."""
    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(one, params, shardings)


def state_from_init_source(trainer: Trainer, model: GPTJConfig, source: InitSource, fresh_optimizer: bool):
    """The train state `init_from` gives: params (+ optimizer and step from a gptj workdir unless fresh_optimizer)."""
    params_shardings = trainer.state_shardings["params"]
    if source.kind == "gptj":
        if not fresh_optimizer and ckpt_lib.latest_step(source.path) is not None:
            state, _ = ckpt_lib.Checkpointer(source.path, read_only=True).restore(trainer.abstract_state)
            logging.info("init_from %s: params, optimizer state and step %d", source.path, int(state["step"]))
            return state
        from gptj.params_io import load_params
        params, _ = load_params(source.path, shardings=params_shardings, dtype=model.param_dtype)
    else:
        dtype = resolve_dtype(model.param_dtype)
        params = _put_numpy(jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), source.params),
                            params_shardings)
    logging.info("init_from %s:%s: params with a fresh optimizer at step 0", source.kind, source.path)
    return trainer.state_from_params(params)


def _write_run_config(workdir: str, config_dict: dict) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)  # never a half-written config.json


def _flops_per_token(model: GPTJConfig, params_abstract, seq_len: int) -> float:
    non_embedding = count_params(params_abstract) - model.padded_vocab_size * model.d_model
    return metrics_lib.flops_per_token(non_embedding, model.num_layers, model.num_heads, model.head_dim, seq_len)


def train_and_evaluate(config, workdir: str, *, explicit_model_fields: Iterable[str] = (),
                       train_iter_fn: Callable | None = None, eval_iters_fn: Callable | None = None) -> str:
    """Trains as `config` says in `workdir`; returns 'completed' or 'preempted' (see the module docstring).

    `explicit_model_fields`: model fields set on the command line (an error
    if they contradict the weights being resumed or loaded). `train_iter_fn`
    and `eval_iters_fn` replace gptj.data's `build_train_iterator` /
    `build_eval_iterators` (same signature and protocol) for in-memory data.
    Raises ConfigError, WeightsError, NonFiniteLossError.
    """
    validate(config, "train", check_tasks=train_iter_fn is None)
    metrics_lib.quiet_library_logs()
    if train_iter_fn is None:
        from gptj import data
        train_iter_fn, eval_iters_fn = data.build_train_iterator, data.build_eval_iterators
    workdir = os.path.abspath(workdir)
    resuming = ckpt_lib.latest_step(workdir) is not None
    source = None
    if config.init_from and not resuming:
        source = load_init_source(config, read_weights=True)
    model = resolve_model_config(config, workdir, explicit_model_fields, source)
    if config.data.seq_len > model.max_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds the model's max_len={model.max_len}")
    config = resolved_config(config, model)
    config_dict = config.to_dict()
    _write_run_config(workdir, config_dict)

    partitioner = build_partitioner(config)
    trainer = build_trainer(config, model, partitioner)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep_last=config.train.keep_last,
                                         keep_every=config.train.keep_every)
    data_state = {}
    if resuming:
        state, data_state = checkpointer.restore(trainer.abstract_state)
        logging.info("resuming %s from step %d", workdir, int(state["step"]))
    elif source is not None:
        state = state_from_init_source(trainer, model, source, bool(config.train.fresh_optimizer))
    else:
        state = trainer.init_state(int(config.train.seed))
    n_params = count_params(trainer.abstract_state["params"])
    logging.info("model: %s parameters, %s", f"{n_params:,}", model)
    trainer.compile()

    train_iter = train_iter_fn(config, partitioner)
    if data_state:
        train_iter.set_state(data_state)
    eval_sets = eval_iters_fn(config, partitioner) if eval_iters_fn else {}

    train = config.train
    writer = metrics_lib.create_writer(os.path.join(workdir, "tensorboard"), use_wandb=train.use_wandb,
                                       workdir=workdir, config=config_dict)
    tokens_per_step = train.batch_size * config.data.seq_len
    throughput = metrics_lib.Throughput(
        tokens_per_step, _flops_per_token(model, trainer.abstract_state["params"], config.data.seq_len),
        jax.device_count(), train.peak_flops_per_device)
    hooks = [train_hooks.MetricsHook(writer, train.log_every, train.total_steps, throughput),
             train_hooks.EvalHook(trainer, eval_sets, train.eval_every, train.val_batches, writer, throughput),
             train_hooks.CheckpointHook(checkpointer, train.ckpt_every, train_iter, config_dict, throughput)]
    if config.eval.during_training:
        from gptj import eval_harness  # lm-eval is only needed when asked for
        hooks.append(eval_harness.HarnessHook(config, model, partitioner, writer, workdir, every=train.eval_every,
                                              throughput=throughput))
    profile = train_hooks.parse_profile_steps(train.profile_steps)
    if profile:
        hooks.append(train_hooks.ProfileHook(os.path.join(workdir, "profile"), profile))
    try:
        _, status = trainer.fit(state, train_iter, train.total_steps, hooks)
    finally:
        writer.close()
        checkpointer.close()
        if hasattr(train_iter, "close"):
            train_iter.close()
    logging.info("training %s at step %s", status, checkpointer.latest_step())
    return status
