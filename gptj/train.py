"""`--mode=train`: GPT-J language-model training, the recipe (gptj.recipe) run by the generic driver.

`train_and_evaluate(config, workdir)` (config: a ConfigDict or gptj.settings.RunSettings) is what `main.py --mode=train` runs on
every host:

1. the model config: the workdir's own (when it holds a checkpoint to resume),
   else that of the weights `init_from` names (`gptj.weights.source`), else
   `config.model`; the run keeps its runtime fields (dtype, remat, ...);
2. mesh + rule set -> Partitioner; GPT-J module, next-token loss (optional
   z-loss), the reference's optimizer -> Trainer (`gptj.recipe.build_trainer`);
3. the data: seqio tasks -> resumable global batches (`gptj.data.pipeline`);
4. `gptj.core.driver.train_in_workdir`: resume or start (from `init_from`, else a
   fresh init), AOT compile, the loop with metrics, validation, checkpoints,
   profiling and (with `eval.during_training`) the evaluation harness.

`train.objective=dpo` trains on preference pairs against a frozen reference
(`gptj.dpo`): init_from's weights, read on every start, resumes included.
Under LoRA they are the frozen base with the adapters off; otherwise the
parameters that train are also read into a frozen copy
(`recipe.load_reference`), whose fingerprint config.json records and a
resumed run checks.

LoRA and `train.trainable` freeze the base weights `init_from` names: they
are read in `lora.base_dtype` (LoRA) and handed to the Trainer as its frozen
tree; the train state, and so every checkpoint, holds only what trains. The
run records its base (`gptj.weights.source.BASE_WEIGHTS_KEY` in config.json: spec,
fingerprint, trained pattern) and checks it on resume, so adapters are never
silently resumed over other weights.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Iterable

from absl import logging

from gptj import recipe
from gptj.core import checkpoint as ckpt_lib
from gptj.core.driver import RunSchedule, train_in_workdir
from gptj.core.partitioning import Partitioner
from gptj.core.trainer import Trainer
from gptj.errors import ConfigError
from gptj.model import lora as lora_lib
from gptj.model.transformer import count_params, train_flops_per_token
from gptj.settings import RunSettings, validate
from gptj.weights.source import BASE_WEIGHTS_KEY, open_weights, read_run_config, with_runtime


def check_resume_settings(workdir: str, trainer: Trainer, settings: RunSettings):
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
    lora = settings.lora.adapters
    shape = (lambda l: None if l is None else (l.rank, l.alpha, tuple(sorted(l.targets))))
    if recorded.trained != trainer.trainable or shape(recorded.lora) != shape(lora):
        raise ConfigError(f"{workdir} trained {recorded.trained!r} with LoRA {shape(recorded.lora)} (rank, alpha, "
                          f"targets); this run asks for {trainer.trainable!r} with {shape(lora)}: resume with the "
                          "same settings or use a new workdir")
    return recorded


def check_resume_base(workdir: str, recorded, base: recipe.FrozenBase) -> None:
    """On resume: the base weights just read are the ones the workdir trained over (same fingerprint)."""
    if recorded.fingerprint != base.identity["fingerprint"]:
        raise ConfigError(f"{workdir} was trained over base weights {recorded.base_spec} with fingerprint "
                          f"{recorded.fingerprint}, but init_from={base.identity['spec']} has fingerprint "
                          f"{base.identity['fingerprint']}: a different base; resume with the original")
    if recorded.base_spec != base.identity["spec"]:
        logging.info("base weights moved: %s (recorded %s), same fingerprint", base.identity["spec"],
                     recorded.base_spec)


def check_resume_reference(workdir: str, identity: dict | None) -> None:
    """On resume: a DPO run's reference copy is the one the workdir trained against (same fingerprint)."""
    recorded = read_run_config(workdir).get(recipe.REFERENCE_KEY)
    if identity is None or not recorded:
        return
    if recorded["fingerprint"] != identity["fingerprint"]:
        raise ConfigError(f"{workdir} was trained against the DPO reference {recorded['spec']} with fingerprint "
                          f"{recorded['fingerprint']}, but init_from={identity['spec']} has fingerprint "
                          f"{identity['fingerprint']}: a different reference; resume with the original")


def train_and_evaluate(config, workdir: str, *, explicit_model_fields: Iterable[str] = (),
                       train_iter_fn: Callable | None = None, eval_iters_fn: Callable | None = None) -> str:
    """Trains as `config` says in `workdir`; returns 'completed' or 'preempted' (see the module docstring).

    `explicit_model_fields`: model fields set on the command line (an error
    if they contradict the weights being resumed or loaded). `train_iter_fn`
    and `eval_iters_fn` replace gptj.data.pipeline's `build_train_iterator` /
    `build_eval_iterators` (same signature and protocol) for in-memory data.
    Raises ConfigError, WeightsError, NonFiniteLossError.
    """
    settings = validate(config, "train", check_tasks=train_iter_fn is None)
    if train_iter_fn is None:
        from gptj.data import pipeline
        train_iter_fn, eval_iters_fn = pipeline.build_train_iterator, pipeline.build_eval_iterators
    workdir = os.path.abspath(workdir)
    resuming = ckpt_lib.latest_step(workdir) is not None
    lora = recipe.resolve_lora(settings)
    freezes = lora_lib.trainable_pattern(settings.train.trainable, lora) is not None
    dpo = settings.train.objective == "dpo"  # init_from is its reference, needed on resume too
    needs_weights = freezes or dpo or not resuming
    init_weights = recipe.open_init_weights(settings) if settings.init_from and needs_weights else None
    model = recipe.resolve_model_config(settings, workdir, explicit_model_fields, init_weights)
    if settings.data.seq_len > model.max_len:
        raise ConfigError(f"data.seq_len={settings.data.seq_len} exceeds the model's max_len={model.max_len}")
    settings = recipe.resolved_config(settings, model, lora)

    partitioner = Partitioner.from_config(settings.mesh)
    trainer = recipe.build_trainer(settings, model, partitioner)
    run_config = settings.to_dict()
    recorded = check_resume_settings(workdir, trainer, settings) if resuming else None
    init_state = base = None
    if (trainer.freezes or dpo) and resuming and with_runtime(model, init_weights) != model:
        raise ConfigError(f"init_from={init_weights.spec} has another shape ({init_weights.config}) than the "
                          f"model {workdir} trained ({model})")
    if trainer.freezes:
        base = recipe.load_frozen_base(trainer, model, init_weights,
                                       settings.lora.base_dtype if lora else model.param_dtype)
        run_config[BASE_WEIGHTS_KEY] = base.identity
    if dpo:
        reference = recipe.load_reference(trainer, settings, init_weights, base)
        if resuming:
            check_resume_reference(workdir, reference)
        if reference is not None:
            run_config[recipe.REFERENCE_KEY] = reference
    if trainer.freezes:
        if resuming:
            check_resume_base(workdir, recorded, base)
            base.trainable = {}  # the checkpoint holds what trains
        init_state = lambda: recipe.adapted_initial_state(trainer, model, base, settings)
    elif init_weights is not None:
        # A DPO run starts its own optimizer at step 0: init_from is its reference, not a run it continues.
        fresh_optimizer = settings.train.fresh_optimizer or dpo
        init_state = lambda: recipe.initial_state(trainer, model, init_weights, fresh_optimizer)
    logging.info("model: %s parameters (%s trained), %s",
                 f"{count_params(trainer.abstract_state['params']) + count_params(trainer.abstract_frozen):,}",
                 f"{count_params(trainer.abstract_state['params']):,}", model)

    flops_per_token = train_flops_per_token(model, settings.data.seq_len)
    if dpo:  # the reference's forward pass: a third more (forward 2N, training 6N per token)
        flops_per_token *= 4 / 3

    def harness_hook(context):
        from gptj.evaluation import harness as eval_harness  # lm-eval is only needed when asked for
        return [eval_harness.HarnessHook(settings, model, partitioner, context.writer, context.workdir,
                                         every=settings.train.eval_every, throughput=context.throughput,
                                         params_of=functools.partial(recipe.inference_params, trainer, lora))]

    result = train_in_workdir(
        trainer, workdir, train_iter_fn(settings, partitioner), schedule=RunSchedule.from_config(settings.train),
        init_state=init_state, eval_sets=eval_iters_fn(settings, partitioner) if eval_iters_fn else {},
        run_config=run_config, flops_per_token=flops_per_token,
        extra_hooks=harness_hook if settings.eval.during_training else None)
    return result.status
