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
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Iterable

from absl import logging

from gptj import checkpoint as ckpt_lib
from gptj import losses
from gptj import optimizer as optimizer_lib
from gptj.config_validation import ConfigError, validate
from gptj.driver import RunSchedule, train_in_workdir
from gptj.model import GPTJ, GPTJConfig, HeadInputs, count_params, output_logits, train_flops_per_token
from gptj.partitioning import Partitioner
from gptj.trainer import Trainer
from gptj.weights import RUNTIME_FIELDS, Weights, open_weights, with_runtime

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


def resolved_config(config, model: GPTJConfig):
    """A copy of the run config whose model section is `model`."""
    resolved = copy.deepcopy(config)
    with resolved.unlocked():
        resolved.model.update(model.to_dict())
    return resolved


def build_trainer(config, model: GPTJConfig, partitioner: Partitioner) -> Trainer:
    """The Trainer for a GPT-J model under `config`'s optimizer and train settings.

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
    return Trainer(
        GPTJ(model, head_inputs=bool(chunk_tokens)), loss_fn, optimizer, partitioner, train_batch_spec(config),
        microbatches=int(config.train.microbatches), summarize=losses.summarize, lr_schedule=schedule,
        on_nonfinite=config.train.on_nonfinite, seed=int(config.train.seed), eval_loss_fn=eval_loss_fn)


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
    return build_trainer(config, resolve_model_config(config, init_weights=init_weights), partitioner)


def initial_state(trainer: Trainer, model: GPTJConfig, weights: Weights, fresh_optimizer: bool):
    """The train state `init_from` gives: params (+ optimizer and step from a gptj workdir unless fresh_optimizer)."""
    if weights.kind == "gptj" and not fresh_optimizer and ckpt_lib.latest_step(weights.path) is not None:
        state, _ = ckpt_lib.Checkpointer(weights.path, read_only=True).restore(trainer.abstract_state)
        logging.info("init_from %s: params, optimizer state and step %d", weights.path, int(state["step"]))
        return state
    params = weights.place(trainer.state_shardings["params"], dtype=model.param_dtype)
    logging.info("init_from %s: params with a fresh optimizer at step 0", weights.spec)
    return trainer.state_from_params(params)


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
    init_weights = open_init_weights(config) if config.init_from and not resuming else None
    model = resolve_model_config(config, workdir, explicit_model_fields, init_weights)
    if config.data.seq_len > model.max_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds the model's max_len={model.max_len}")
    config = resolved_config(config, model)

    partitioner = Partitioner.from_config(config.mesh)
    trainer = build_trainer(config, model, partitioner)
    init_state = None
    if init_weights is not None:
        init_state = lambda: initial_state(trainer, model, init_weights, bool(config.train.fresh_optimizer))
    logging.info("model: %s parameters, %s", f"{count_params(trainer.abstract_state['params']):,}", model)

    extra_hooks = None
    if config.eval.during_training:
        def extra_hooks(context):
            from gptj import eval_harness  # lm-eval is only needed when asked for
            return [eval_harness.HarnessHook(config, model, partitioner, context.writer, context.workdir,
                                             every=config.train.eval_every, throughput=context.throughput)]

    result = train_in_workdir(
        trainer, workdir, train_iter_fn(config, partitioner), schedule=RunSchedule.from_config(config.train),
        init_state=init_state, eval_sets=eval_iters_fn(config, partitioner) if eval_iters_fn else {},
        run_config=config.to_dict(), flops_per_token=train_flops_per_token(model, int(config.data.seq_len)),
        extra_hooks=extra_hooks)
    return result.status
