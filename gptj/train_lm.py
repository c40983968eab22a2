"""GPT-J language-model training: binds a run config to the generic Trainer and driver.

`train_and_evaluate(config, workdir)` is what `main.py --mode=train` runs on
every host:

1. the model config: the workdir's own (when it holds a checkpoint to resume),
   else that of the weights `init_from` names (`gptj.weights`), else
   `config.model`; the run keeps its runtime fields (dtype, remat, ...);
2. mesh + rule set -> Partitioner; GPT-J module, next-token loss (optional
   z-loss), the reference's optimizer -> Trainer (`build_trainer`);
3. the data: seqio tasks -> resumable global batches (`gptj.data`);
4. `gptj.driver.train_in_workdir`: resume or start (from `init_from`, else a
   fresh init), AOT compile, the loop with metrics, validation, checkpoints,
   profiling and (with `eval.during_training`) the evaluation harness.

LoRA and `train.trainable` freeze the base weights `init_from` names: they
are read in `lora.base_dtype` (LoRA) and handed to the Trainer as its frozen
tree; the train state, and so every checkpoint, holds only what trains. The
run records its base (`gptj.weights.BASE_WEIGHTS_KEY` in config.json: spec,
fingerprint, trained pattern) and checks it on resume, so adapters are never
silently resumed over other weights.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Any, Callable, Iterable

import jax
from absl import logging

from gptj import checkpoint as ckpt_lib
from gptj import lora as lora_lib
from gptj import losses
from gptj import optimizer as optimizer_lib
from gptj.config_validation import PEFT_PREFIX, ConfigError, validate
from gptj.driver import RunSchedule, train_in_workdir
from gptj.model import (GPTJ, GPTJConfig, HeadInputs, LoraConfig, count_params, output_logits, resolve_dtype,
                        train_flops_per_token)
from gptj.partitioning import Partitioner, place
from gptj.trainer import Trainer, TrainableError, merge_params, param_paths, path_matcher, select_params
from gptj.weights import BASE_WEIGHTS_KEY, RUNTIME_FIELDS, Weights, fingerprint, open_weights, with_runtime

# Resuming keeps the checkpoint's master-weight dtype (its optimizer state was saved in it).
RESUME_FIELDS = tuple(f for f in RUNTIME_FIELDS if f != "param_dtype")


def run_model_config(config) -> GPTJConfig:
    """The model section of a run config as a GPTJConfig."""
    return GPTJConfig.from_dict(config.model.to_dict())


def open_init_weights(config) -> Weights:
    """The weights `config.init_from` names, opened (model config read; arrays not yet)."""
    return open_weights(config.init_from, int(config.model.vocab_pad_multiple))


def resolve_model_config(config, workdir: str | None = None, explicit_model_fields: Iterable[str] = (),
                         init_weights: Weights | None = None) -> GPTJConfig:
    """The model to train: the resumed workdir's, else the init_from weights', else config.model (see module doc)."""
    run = run_model_config(config)
    if workdir and ckpt_lib.latest_step(workdir) is not None:
        return with_runtime(run, open_weights(workdir), explicit_model_fields, keep=RESUME_FIELDS)
    if init_weights is not None:
        return with_runtime(run, init_weights, explicit_model_fields)
    return run


def resolved_config(config, model: GPTJConfig, lora: LoraConfig | None = None):
    """A copy of the run config whose model section is `model` (and lora section's shape `lora`'s)."""
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        resolved.model.update(model.to_dict())
        if lora is not None:
            resolved.lora.update(dict(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets)))
    return resolved


def run_lora(config) -> LoraConfig | None:
    """The run's LoRA adapters (None: no LoRA) as `config.lora` says; no file is read."""
    lora = LoraConfig.from_dict(config.lora.to_dict())
    return lora if lora.rank > 0 else None


def resolve_lora(config) -> LoraConfig | None:
    """The run's LoRA adapters, the PEFT adapter's shape (rank, alpha, targets) when `lora.init_from` names one.

    The adapter's shape wins over the config's (a warning names what differs);
    dropout is a training choice and stays the config's.
    """
    lora = run_lora(config)
    if not config.lora.init_from:
        return lora
    from gptj.convert.peft import read_peft_config

    adapter = read_peft_config(config.lora.init_from[len(PEFT_PREFIX):])
    adapter = dataclasses.replace(adapter, dropout=float(config.lora.dropout))
    if lora is not None and lora != adapter:
        logging.warning("lora.init_from=%s has rank %d, alpha %g, targets %s: they replace the config's "
                        "(rank %d, alpha %g, targets %s)", config.lora.init_from, adapter.rank, adapter.alpha,
                        list(adapter.targets), lora.rank, lora.alpha, list(lora.targets))
    return adapter


def build_trainer(config, model: GPTJConfig, partitioner: Partitioner) -> Trainer:
    """The Trainer for a GPT-J model under `config`'s optimizer, train and LoRA settings.

    With LoRA or `train.trainable`, the Trainer freezes the other parameters
    (LoRA: kept in `lora.base_dtype`); a pattern that trains nothing, or no
    adapter of a LoRA run, is a ConfigError naming the parameter paths.

    With `train.loss_chunk_tokens` > 0 the model returns its head's inputs
    and the loss applies the head chunk by chunk (`losses.fused_next_token_loss`,
    see `head_loss_fns`); with 0 it returns the full logits and the loss is
    `losses.next_token_loss` over them.
    """
    from gptj.data import train_batch_spec

    optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer.to_dict())
    z_loss = float(config.train.z_loss)
    chunk_tokens = int(config.train.loss_chunk_tokens)
    if chunk_tokens < 0:
        raise ConfigError(f"train.loss_chunk_tokens must be >= 0 (0: the full-logits loss), got {chunk_tokens}")
    if chunk_tokens:
        vocab_chunk = loss_vocab_chunk(int(config.train.loss_chunk_vocab), partitioner)
        loss_fn, eval_loss_fn = head_loss_fns(model, chunk_tokens, vocab_chunk, z_loss)
    else:
        loss_fn = lambda logits, batch: losses.next_token_loss(logits, batch, z_loss, accuracy=False)  # noqa: E731
        eval_loss_fn = lambda logits, batch: losses.next_token_loss(logits, batch, z_loss)  # noqa: E731
    lora = run_lora(config)
    trainable = lora_lib.trainable_pattern(str(config.train.trainable), lora)
    trainer = Trainer(
        GPTJ(model, lora=lora, head_inputs=bool(chunk_tokens)), loss_fn, optimizer, partitioner,
        train_batch_spec(config), microbatches=int(config.train.microbatches), summarize=losses.summarize,
        lr_schedule=schedule, on_nonfinite=config.train.on_nonfinite, seed=int(config.train.seed),
        eval_loss_fn=eval_loss_fn, rng_streams=("dropout",) if lora is not None and lora.dropout > 0 else (),
        trainable=trainable, frozen_dtype=config.lora.base_dtype if lora is not None else None)
    try:
        trained = param_paths(trainer.abstract_state["params"])
    except TrainableError as e:
        raise ConfigError(f"train.trainable: {e}") from None
    if lora is not None and not any(lora_lib.is_adapter(p) for p in trained):
        raise ConfigError(f"train.trainable={trainable!r} trains no LoRA adapter (it trains {trained}); "
                          f"include {lora_lib.ADAPTER_PATTERN!r}")
    return trainer


# Vocabulary entries per chunk of the fused loss on a CPU, when train.loss_chunk_vocab is -1 (auto): one
# chunk's fp32 logits, LOSS_CHUNK_LOGITS_BYTES at most, then stay in cache (see benchmarks/train_kernels.py).
LOSS_CHUNK_LOGITS_BYTES = 4 << 20


def loss_vocab_chunk(requested: int, partitioner: Partitioner, backend: str | None = None) -> int:
    """Vocabulary entries per chunk of the fused loss (0: the whole vocabulary at once).

    `requested` is train.loss_chunk_vocab: >= 0 is taken as given; -1 (auto)
    chunks the vocabulary only on a CPU, where it keeps each chunk's
    element-wise work in cache, and only where the vocabulary axis is not
    split over devices (slicing a sharded axis would serialise them); it
    stays -1 then, for `head_loss_fns` to size once the batch shape is known.
    """
    import jax

    if requested < -1:
        raise ConfigError(f"train.loss_chunk_vocab must be -1 (auto), 0 (whole vocabulary) or positive, "
                          f"got {requested}")
    if requested >= 0:
        return requested
    vocab_split = partitioner.axis_size(dict(reversed(partitioner.rules)).get("act_vocab"))
    return -1 if (backend or jax.default_backend()) == "cpu" and vocab_split == 1 else 0


def head_loss_fns(model: GPTJConfig, chunk_tokens: int, vocab_chunk: int, z_loss: float):
    """(train loss, eval loss) over `HeadInputs`: the fused, chunked head + cross-entropy (eval also counts accuracy).

    vocab_chunk -1 sizes the vocabulary chunk so that one chunk's fp32 logits
    (its tokens x vocabulary entries) take LOSS_CHUNK_LOGITS_BYTES at most.
    """
    def logits_fn(hidden, kernel, bias, first_id):
        return output_logits(hidden, kernel, bias, model, first_id)

    def loss(head: HeadInputs, batch, accuracy: bool):
        width = vocab_chunk
        if width < 0:
            rows, length = batch["targets"].shape
            tokens = min(chunk_tokens, rows * length)
            width = max(1, LOSS_CHUNK_LOGITS_BYTES // (4 * tokens))
        return losses.fused_next_token_loss(head.hidden, head.kernel, head.bias, batch, logits_fn,
                                            chunk_tokens=chunk_tokens, vocab_chunk=width, z_loss=z_loss,
                                            accuracy=accuracy)

    return (lambda head, batch: loss(head, batch, False)), (lambda head, batch: loss(head, batch, True))


def build_trainer_for_plan(config, partitioner: Partitioner) -> Trainer:
    """The Trainer `train_and_evaluate` would build, without reading any weights (for --mode=plan).

    The model config follows init_from's config.json for gptj and hf weights
    (and the reference config for mtj).
    """
    init_weights = open_init_weights(config) if config.init_from else None
    config = resolved_config(config, resolve_model_config(config, init_weights=init_weights), resolve_lora(config))
    return build_trainer(config, run_model_config(config), partitioner)


def initial_state(trainer: Trainer, model: GPTJConfig, weights: Weights, fresh_optimizer: bool):
    """The train state `init_from` gives: params (+ optimizer and step from a gptj workdir unless fresh_optimizer)."""
    resumable = weights.kind == "gptj" and weights.adapted is None
    if resumable and not fresh_optimizer and ckpt_lib.latest_step(weights.path) is not None:
        state, _ = ckpt_lib.Checkpointer(weights.path, read_only=True).restore(trainer.abstract_state)
        logging.info("init_from %s: params, optimizer state and step %d", weights.path, int(state["step"]))
        return state
    params = weights.place(trainer.state_shardings["params"], dtype=model.param_dtype)
    logging.info("init_from %s: params with a fresh optimizer at step 0", weights.spec)
    return trainer.state_from_params(params)


@dataclasses.dataclass
class FrozenBase:
    """The base weights of a LoRA / train.trainable run, read and split: what the Trainer keeps frozen is set."""

    trainable: Any  # the base's values of parameters that train (fp32), for a fresh start
    identity: dict  # what config.json records under BASE_WEIGHTS_KEY


def load_frozen_base(trainer: Trainer, model: GPTJConfig, weights: Weights, base_dtype: str) -> FrozenBase:
    """Reads the base weights onto the mesh in `base_dtype`, gives the frozen ones to `trainer`, fingerprints them."""
    shardings = lora_lib.split_adapters(merge_params(trainer.state_shardings["params"], trainer.frozen_shardings))[0]
    base = weights.place(shardings, dtype=base_dtype)
    identity = {"spec": weights.spec, "fingerprint": fingerprint(base), "trained": trainer.trainable}
    trainable, frozen = select_params(base, path_matcher(trainer.trainable))
    trainer.set_frozen(frozen)
    # Parameters that train keep fp32 master copies (they were read in base_dtype with the rest).
    trainable = jax.tree_util.tree_map(lambda x: x.astype(resolve_dtype(model.param_dtype)), trainable)
    logging.info("frozen base %s (fingerprint %s): training %s", weights.spec, identity["fingerprint"],
                 param_paths(trainer.abstract_state["params"]))
    return FrozenBase(trainable, identity)


def adapted_initial_state(trainer: Trainer, model: GPTJConfig, base: FrozenBase, config):
    """The first state of a run over a frozen base: fresh adapters (or lora.init_from's), the base's trained values."""
    params = merge_params(trainer.init_params(int(config.train.seed)), base.trainable)
    base.trainable = {}  # handed to the state, not kept beside it for the whole run
    if config.lora.init_from:
        from gptj.convert.peft import read_peft

        adapters = read_peft(config.lora.init_from[len(PEFT_PREFIX):], model)[1]
        shardings = lora_lib.split_adapters(trainer.state_shardings["params"])[1]
        params = merge_params(params, place(adapters, shardings))
        logging.info("adapters from %s", config.lora.init_from)
    return trainer.state_from_params(params)


def inference_params(trainer: Trainer, lora: LoraConfig | None, state):
    """The plain parameter tree of `state` that inference would load from its workdir.

    The frozen base joined to what trains, LoRA adapters merged into their
    kernels (a new copy of the adapted kernels; the state is untouched).
    """
    params = merge_params(trainer.frozen, state["params"]) if trainer.freezes else state["params"]
    return lora_lib.merge(params, lora) if lora else params


def check_resume_settings(workdir: str, trainer: Trainer, config):
    """On resume: the workdir trained the same parameters (adapters, train.trainable) as this run will.

    Returns what it recorded of its base (None for a run that trained everything).
    """
    recorded = open_weights(workdir).adapted
    if recorded is None and not trainer.freezes:
        return None
    if recorded is None:
        raise ConfigError(f"{workdir} holds checkpoints of a run that trained every parameter; LoRA or "
                          f"train.trainable need a new workdir (start it from this one with init_from={workdir})")
    if not trainer.freezes:
        raise ConfigError(f"{workdir} was trained over frozen base weights {recorded.base_spec} (trained "
                          f"{recorded.trained!r}); resume it with the same lora and train.trainable settings")
    lora = run_lora(config)
    shape = (lambda l: None if l is None else (l.rank, l.alpha, tuple(sorted(l.targets))))
    if recorded.trained != trainer.trainable or shape(recorded.lora) != shape(lora):
        raise ConfigError(f"{workdir} trained {recorded.trained!r} with LoRA {shape(recorded.lora)} (rank, alpha, "
                          f"targets); this run asks for {trainer.trainable!r} with {shape(lora)}: resume with the "
                          "same settings or use a new workdir")
    return recorded


def check_resume_base(workdir: str, recorded, base: FrozenBase) -> None:
    """On resume: the base weights just read are the ones the workdir trained over (same fingerprint)."""
    if recorded.fingerprint != base.identity["fingerprint"]:
        raise ConfigError(f"{workdir} was trained over base weights {recorded.base_spec} with fingerprint "
                          f"{recorded.fingerprint}, but init_from={base.identity['spec']} has fingerprint "
                          f"{base.identity['fingerprint']}: a different base; resume with the original")
    if recorded.base_spec != base.identity["spec"]:
        logging.info("base weights moved: %s (recorded %s), same fingerprint", base.identity["spec"],
                     recorded.base_spec)


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
    if train_iter_fn is None:
        from gptj import data
        train_iter_fn, eval_iters_fn = data.build_train_iterator, data.build_eval_iterators
    workdir = os.path.abspath(workdir)
    resuming = ckpt_lib.latest_step(workdir) is not None
    lora = resolve_lora(config)
    freezes = lora_lib.trainable_pattern(str(config.train.trainable), lora) is not None
    init_weights = open_init_weights(config) if config.init_from and (freezes or not resuming) else None
    model = resolve_model_config(config, workdir, explicit_model_fields, init_weights)
    if config.data.seq_len > model.max_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds the model's max_len={model.max_len}")
    config = resolved_config(config, model, lora)

    partitioner = Partitioner.from_config(config.mesh)
    trainer = build_trainer(config, model, partitioner)
    run_config = config.to_dict()
    recorded = check_resume_settings(workdir, trainer, config) if resuming else None
    init_state = None
    if trainer.freezes:
        if resuming and with_runtime(model, init_weights) != model:
            raise ConfigError(f"init_from={init_weights.spec} has another shape ({init_weights.config}) than the "
                              f"model {workdir} trained ({model})")
        base = load_frozen_base(trainer, model, init_weights, config.lora.base_dtype if lora else model.param_dtype)
        run_config[BASE_WEIGHTS_KEY] = base.identity
        if resuming:
            check_resume_base(workdir, recorded, base)
            base.trainable = {}  # the checkpoint holds what trains
        init_state = lambda: adapted_initial_state(trainer, model, base, config)
    elif init_weights is not None:
        init_state = lambda: initial_state(trainer, model, init_weights, bool(config.train.fresh_optimizer))
    logging.info("model: %s parameters (%s trained), %s",
                 f"{count_params(trainer.abstract_state['params']) + count_params(trainer.abstract_frozen):,}",
                 f"{count_params(trainer.abstract_state['params']):,}", model)

    def harness_hook(context):
        from gptj import eval_harness  # lm-eval is only needed when asked for
        return [eval_harness.HarnessHook(config, model, partitioner, context.writer, context.workdir,
                                         every=config.train.eval_every, throughput=context.throughput,
                                         params_of=functools.partial(inference_params, trainer, lora))]

    result = train_in_workdir(
        trainer, workdir, train_iter_fn(config, partitioner), schedule=RunSchedule.from_config(config.train),
        init_state=init_state, eval_sets=eval_iters_fn(config, partitioner) if eval_iters_fn else {},
        run_config=run_config, flops_per_token=train_flops_per_token(model, int(config.data.seq_len)),
        extra_hooks=harness_hook if config.eval.during_training else None)
    return result.status
