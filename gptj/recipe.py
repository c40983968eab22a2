"""The GPT-J language-model recipe: a run config bound to the generic Trainer.

What `--mode=train` (gptj.train), `--mode=eval` (gptj.evaluation) and
`--mode=plan` (gptj.plan) build the same way:

- the model config: the resumed workdir's, else that of the weights
  `init_from` names (`gptj.weights.source`), else `config.model`; the run keeps
  its runtime fields (dtype, remat, ...) (`resolve_model_config`);
- the LoRA adapters: `config.lora`, or the PEFT adapter `lora.init_from`
  names (`resolve_lora`);
- the Trainer: the GPT-J module, the next-token loss (fused with the output
  head, optional z-loss) and the reference's optimizer (`build_trainer`);
  with `train.objective=dpo`, the DPO loss over preference pairs and a frozen
  reference model (`gptj.dpo`), whose own weights, if it has any beyond the
  frozen base, come from init_from (`load_reference`);
- the first train state from `init_from` (`initial_state`), or, for LoRA and
  `train.trainable`, the frozen base read in `lora.base_dtype` and handed to
  the Trainer as its frozen tree (`load_frozen_base`, `adapted_initial_state`);
- the plain parameters inference would load (`inference_params`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
from absl import logging

from gptj.core import checkpoint as ckpt_lib
from gptj.core import losses
from gptj.core import optimizer as optimizer_lib
from gptj.core.param_tree import merge_params, param_paths, path_matcher, select_params
from gptj.core.partitioning import Partitioner, place
from gptj.core.pipeline import Schedule
from gptj.core.trainer import Trainer
from gptj.errors import ConfigError, TrainableError
from gptj.model import lora as lora_lib
from gptj.model.attention import resolve_attention_impl
from gptj.model.transformer import GPTJ, GPTJConfig, HeadInputs, LoraConfig, count_params, output_logits, resolve_dtype
from gptj.settings import RunSettings
from gptj.weights.source import RUNTIME_FIELDS, Weights, fingerprint, open_weights, with_runtime
from gptj.weights.spec import peft_adapter_dir

# Resuming keeps the checkpoint's master-weight dtype (its optimizer state was saved in it).
RESUME_FIELDS = tuple(f for f in RUNTIME_FIELDS if f != "param_dtype")


def run_model_config(config) -> GPTJConfig:
    """The model section of a run config (a ConfigDict or RunSettings) as a GPTJConfig."""
    return RunSettings.from_config(config).model


def open_init_weights(config) -> Weights:
    """The weights `init_from` names, opened (model config read; arrays not yet)."""
    settings = RunSettings.from_config(config)
    return open_weights(settings.init_from, settings.model.vocab_pad_multiple)


def resolve_model_config(config, workdir: str | None = None, explicit_model_fields: Iterable[str] = (),
                         init_weights: Weights | None = None) -> GPTJConfig:
    """The model to train: the resumed workdir's, else the init_from weights', else config.model (see module doc)."""
    run = run_model_config(config)
    if workdir and ckpt_lib.latest_step(workdir) is not None:
        return with_runtime(run, open_weights(workdir), explicit_model_fields, keep=RESUME_FIELDS)
    if init_weights is not None:
        return with_runtime(run, init_weights, explicit_model_fields)
    return run


def resolved_config(config, model: GPTJConfig, lora: LoraConfig | None = None) -> RunSettings:
    """The run's settings with `model` as their model section (and `lora`'s shape in the lora section)."""
    settings = RunSettings.from_config(config).replace(model=model)
    if lora is None:
        return settings
    return settings.override("lora", rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets))


def run_lora(config) -> LoraConfig | None:
    """The run's LoRA adapters (None: no LoRA) as the lora section says; no file is read."""
    return RunSettings.from_config(config).lora.adapters


def resolve_lora(config) -> LoraConfig | None:
    """The run's LoRA adapters, the PEFT adapter's shape (rank, alpha, targets) when `lora.init_from` names one.

    The adapter's shape wins over the config's (a warning names what differs);
    dropout is a training choice and stays the config's.
    """
    section = RunSettings.from_config(config).lora
    lora = section.adapters
    if not section.init_from:
        return lora
    from gptj.weights.formats.peft import read_peft_config

    adapter = read_peft_config(peft_adapter_dir(section.init_from))
    adapter = dataclasses.replace(adapter, dropout=section.dropout)
    if lora is not None and lora != adapter:
        logging.warning("lora.init_from=%s has rank %d, alpha %g, targets %s: they replace the config's "
                        "(rank %d, alpha %g, targets %s)", section.init_from, adapter.rank, adapter.alpha,
                        list(adapter.targets), lora.rank, lora.alpha, list(lora.targets))
    return adapter


# The weights GPT-J casts to its compute dtype before every use (gptj.model.transformer: each matmul's
# kernel): a microbatch's gradient of them is taken in that dtype, the same values in half the bytes
# (Trainer's microbatch_grad_dtype). The embedding (gathered, then cast), biases and LayerNorms stay.
CAST_BEFORE_USE = r"(.*/)?(q_proj|k_proj|v_proj|out_proj|fc_in_kernel|fc_out_kernel|lm_head_kernel)"


def build_trainer(config, model: GPTJConfig, partitioner: Partitioner) -> Trainer:
    """The Trainer for a GPT-J model under `config`'s optimizer, train and LoRA settings.

    With LoRA or `train.trainable`, the Trainer freezes the other parameters
    (LoRA: kept in `lora.base_dtype`); a pattern that trains nothing, or no
    adapter of a LoRA run, is a ConfigError naming the parameter paths.

    With `train.loss_chunk_tokens` > 0 the model returns its head's inputs
    and the loss applies the head chunk by chunk (`losses.fused_next_token_loss`,
    see `head_loss_fns`); with 0 it returns the full logits and the loss is
    `losses.next_token_loss` over them.

    On a mesh with stages, the model runs its layers as a pipeline of
    `train.microbatches` microbatches (`pipeline_schedule`).

    With `train.objective=dpo` the model reads pairs ([B, 2, L]: `dpo.PairModel`)
    and the loss is `gptj.dpo`'s, against a reference model, the starting
    policy: the same GPT-J without adapters (with `lora.init_from`'s adapters
    if it starts from some), over the frozen base and, where it differs from
    that base (no LoRA, base parameters that train, starting adapters), its
    own copy in `dpo.reference_dtype` (`load_reference` reads it). On stages,
    the reference runs on the same pipeline.
    """
    from gptj.data.pipeline import train_batch_spec

    settings = RunSettings.from_config(config)
    train = settings.train
    optimizer, schedule = optimizer_lib.make_optimizer(dataclasses.asdict(settings.optimizer))
    z_loss = train.z_loss
    chunk_tokens = train.loss_chunk_tokens
    if chunk_tokens < 0:
        raise ConfigError(f"train.loss_chunk_tokens must be >= 0 (0: the full-logits loss), got {chunk_tokens}")
    lora = settings.lora.adapters
    # `auto` picks the attention kernel of the devices the mesh holds, not of this process's backend: a plan for a
    # GPU or TPU target compiles on a CPU host (and the CPU's kernel, its blocks unrolled, compiled GPT-J-6B's
    # 2048-token step 5x slower and planned memory for a kernel the target never runs).
    model = model.replace(attention_impl=resolve_attention_impl(model.attention_impl, partitioner.platform))
    pipeline = pipeline_schedule(model, partitioner, train.microbatches)
    module = GPTJ(model, lora=lora, head_inputs=bool(chunk_tokens), pipeline=pipeline)
    summarize, objective = losses.summarize, {}
    if train.objective == "dpo":
        from gptj import dpo

        loss_fn = eval_loss_fn = dpo.loss_fn(settings.dpo, model, chunk_tokens)
        summarize = dpo.summarize
        module = dpo.PairModel(module)
        # The reference is the starting policy: the model without adapters, unless it starts from an adapter.
        reference_lora = dataclasses.replace(lora, dropout=0.0) if settings.lora.init_from else None
        reference = GPTJ(model, lora=reference_lora, head_inputs=bool(chunk_tokens), pipeline=pipeline)
        objective = dict(reference_model=dpo.PairModel(reference), reference_dtype=settings.dpo.reference_dtype)
    elif chunk_tokens:
        vocab_chunk = loss_vocab_chunk(train.loss_chunk_vocab, partitioner)
        loss_fn, eval_loss_fn = head_loss_fns(model, chunk_tokens, vocab_chunk, z_loss)
    else:
        loss_fn = lambda logits, batch: losses.next_token_loss(logits, batch, z_loss, accuracy=False)  # noqa: E731
        eval_loss_fn = lambda logits, batch: losses.next_token_loss(logits, batch, z_loss)  # noqa: E731
    trainable = lora_lib.trainable_pattern(train.trainable, lora)
    trainer = Trainer(
        module, loss_fn, optimizer, partitioner,
        train_batch_spec(settings), microbatches=train.microbatches, summarize=summarize,
        lr_schedule=schedule, on_nonfinite=train.on_nonfinite, seed=train.seed,
        eval_loss_fn=eval_loss_fn, rng_streams=("dropout",) if lora is not None and lora.dropout > 0 else (),
        trainable=trainable, frozen_dtype=settings.lora.base_dtype if lora is not None else None,
        microbatch_grad_dtype=model.dtype if model.dtype != model.param_dtype else None,
        microbatch_grad_params=CAST_BEFORE_USE, **objective)
    try:
        trained = param_paths(trainer.abstract_state["params"])
    except TrainableError as e:
        raise ConfigError(f"train.trainable: {e}") from None
    if lora is not None and not any(lora_lib.is_adapter(p) for p in trained):
        raise ConfigError(f"train.trainable={trainable!r} trains no LoRA adapter (it trains {trained}); "
                          f"include {lora_lib.ADAPTER_PATTERN!r}")
    return trainer


def pipeline_schedule(model: GPTJConfig, partitioner: Partitioner, microbatches: int) -> Schedule | None:
    """The pipeline the model runs on `partitioner`'s stages (None without stages); ConfigError if it cannot."""
    if partitioner.stages == 1:
        return None
    schedule = Schedule(stages=partitioner.stages, microbatches=microbatches)
    problems = schedule.problems(model.num_layers, names=("mesh.stage", "train.microbatches", "model.num_layers"))
    if problems:
        raise ConfigError("; ".join(problems))
    return schedule


# Vocabulary entries per chunk of the fused loss on a CPU, when train.loss_chunk_vocab is -1 (auto): one
# chunk's fp32 logits, LOSS_CHUNK_LOGITS_BYTES at most, then stay in cache (see benchmarks/train_kernels.py).
LOSS_CHUNK_LOGITS_BYTES = 4 << 20


def loss_vocab_chunk(requested: int, partitioner: Partitioner) -> int:
    """Vocabulary entries per chunk of the fused loss (0: the whole vocabulary at once).

    `requested` is train.loss_chunk_vocab: >= 0 is taken as given; -1 (auto)
    chunks the vocabulary only on a CPU mesh, where it keeps each chunk's
    element-wise work in cache, and only where the vocabulary axis is not
    split over devices (slicing a sharded axis would serialise them); it
    stays -1 then, for `head_loss_fns` to size once the batch shape is known.
    """
    if requested < -1:
        raise ConfigError(f"train.loss_chunk_vocab must be -1 (auto), 0 (whole vocabulary) or positive, "
                          f"got {requested}")
    if requested >= 0:
        return requested
    vocab_split = partitioner.axis_size(dict(reversed(partitioner.rules)).get("act_vocab"))
    return -1 if partitioner.platform == "cpu" and vocab_split == 1 else 0


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
    settings = RunSettings.from_config(config)
    init_weights = open_init_weights(settings) if settings.init_from else None
    settings = resolved_config(settings, resolve_model_config(settings, init_weights=init_weights),
                               resolve_lora(settings))
    return build_trainer(settings, settings.model, partitioner)


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
    identity: dict  # what config.json records under gptj.weights.source.BASE_WEIGHTS_KEY


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


def load_reference(trainer: Trainer, config, weights: Weights, base: FrozenBase | None) -> dict | None:
    """Gives a DPO Trainer its reference's own parameters (those it does not freeze), read from init_from.

    The reference is the starting policy. Under LoRA with fresh adapters that
    is the frozen base with the adapters off: it has nothing of its own, and
    nothing is read or allocated. Otherwise it holds, in `dpo.reference_dtype`,
    a frozen copy of what the policy changes from: the base parameters that
    train (no LoRA: all of them; `train.trainable`: those it names), read from
    `base` (the frozen base's read: its values of what trains, in
    `lora.base_dtype` under LoRA) when the run freezes anything, else from
    `weights`; and the starting adapters of `lora.init_from` (as TRL keeps a
    copy of an adapter it trains further). Call it before the base's values go
    to the first train state. Returns what config.json records of the copy
    (spec and fingerprint, `REFERENCE_KEY`; None without one), so that a
    resumed run can check that its reference did not change.
    """
    settings = RunSettings.from_config(config)
    own = param_paths(trainer.abstract_reference)
    if not own:
        logging.info("DPO reference: the frozen base %s with the adapters off (no copy of the weights)", weights.spec)
        return None
    dtype = settings.dpo.reference_dtype
    values = {}
    if not all(lora_lib.is_adapter(path) for path in own):
        # Base parameters that train: the frozen base's read of them, or (nothing frozen) all of init_from's.
        values = base.trainable if base is not None else weights.place(trainer.reference_shardings, dtype=dtype)
    spec = weights.spec
    if any(lora_lib.is_adapter(path) for path in own):
        from gptj.weights.formats.peft import read_peft

        values = merge_params(values, read_peft(peft_adapter_dir(settings.lora.init_from), settings.model)[1])
        spec = f"{spec} + {settings.lora.init_from}"
    trainer.set_reference(values)
    identity = {"spec": spec, "fingerprint": fingerprint(trainer.reference)}
    logging.info("DPO reference: a frozen copy of %s (fingerprint %s) in %s, %s parameters", spec,
                 identity["fingerprint"], dtype, f"{count_params(trainer.abstract_reference):,}")
    return identity


# What a DPO run's config.json records of its reference's own weights: {"spec", "fingerprint"}.
REFERENCE_KEY = "dpo_reference"


def adapted_initial_state(trainer: Trainer, model: GPTJConfig, base: FrozenBase, config):
    """The first state of a run over a frozen base: fresh adapters (or lora.init_from's), the base's trained values."""
    settings = RunSettings.from_config(config)
    params = merge_params(trainer.init_params(settings.train.seed), base.trainable)
    base.trainable = {}  # handed to the state, not kept beside it for the whole run
    if settings.lora.init_from:
        from gptj.weights.formats.peft import read_peft

        adapters = read_peft(peft_adapter_dir(settings.lora.init_from), model)[1]
        shardings = lora_lib.split_adapters(trainer.state_shardings["params"])[1]
        params = merge_params(params, place(adapters, shardings))
        logging.info("adapters from %s", settings.lora.init_from)
    return trainer.state_from_params(params)


def inference_params(trainer: Trainer, lora: LoraConfig | None, state):
    """The plain parameter tree of `state` that inference would load from its workdir.

    The frozen base joined to what trains, LoRA adapters merged into their
    kernels (a new copy of the adapted kernels; the state is untouched).
    """
    params = merge_params(trainer.frozen, state["params"]) if trainer.freezes else state["params"]
    return lora_lib.merge(params, lora) if lora else params
