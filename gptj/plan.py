"""`python main.py --mode=plan`: what one device must hold to train (or serve) the config, before renting the devices.

The train step is compiled ahead of time on abstract inputs (shapes, dtypes and
shardings only; nothing is allocated), for the config's model, mesh and rule set on
this machine's devices. On a CPU machine, fake devices stand in for a pod slice:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python main.py --config=gptj/configs/gptj_6b.py --mode=plan --device_memory_gib=16 \\
        --config.train.batch_size=16 --config.train.microbatches=16 --config.mesh.rules=zero1

Reported per device: params and optimizer state (from the shardings, exact), XLA's
temporaries (gradients, activations, collectives' buffers, as the compiler scheduled
them; the CPU compiler's numbers approximate an accelerator's), the peak (arguments +
outputs not aliased by donation + temporaries), and the arithmetic they should match:
parameter count x bytes per value / the number of devices each is split over. A LoRA or
`train.trainable` run also shows its frozen parameters (kept in `lora.base_dtype` for
LoRA); its params and optimizer rows are the trained parameters only. A DPO run
(`train.objective=dpo`) shows its reference model's own parameters: none under LoRA
(the frozen base with the adapters off), else a frozen copy in `dpo.reference_dtype`,
beside what the other ways to a reference would take.

A mesh whose sizes are both given (no -1) uses the first data x model devices, so one
machine with 8 fake devices plans a single-device run too. When the peak does not fit,
the plan names the ways out: LoRA over the frozen base, zero3 over enough devices (an
estimate, to be planned on that many), full rematerialisation, smaller microbatches.

`--target=` (`tpu:v3-8`, `gpu:h100x8`, ...: gptj.targets) compiles for that hardware with its own
compiler instead, on this machine, for devices it does not have: the temporaries are the TPU's or
GPU's, device memory defaults to the target's HBM, and the plan adds the compiled FLOPs per device
beside the model's count and the least time a step can take there (`Work`).

`--plan=serve` plans inference instead (`make_serve_plan`): the weights in the
compute dtype, in int8 and in int4 (`gptj.model.quantized`), each with the KV cache
for `--batch_size` rows of `--context_len` tokens, the adapter pool of
`config.serve.adapters` / `max_adapters` (every target at the pool's rank), the
prefix cache's block store (`config.serve.prefix_cache_gib`), and the temporaries
of a prefill of the whole context and of one decode step (rows through adapters
when there are any), compiled the same way:

    python main.py --config=gptj/configs/gptj_6b.py --mode=plan --plan=serve --batch_size=1 --context_len=2048 \
        --device_memory_gib=8 --config.mesh.data=1 --config.mesh.model=1
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from gptj import recipe, targets
from gptj.core.param_tree import merge_params
from gptj.core.partitioning import STAGE_AXIS, Partitioner, make_mesh, per_device_bytes
from gptj.core.pipeline import Schedule
from gptj.core.trainer import MemoryReport
from gptj.errors import AdapterError, ConfigError, PartitioningError
from gptj.inference.adapters import adapter_pool_size
from gptj.inference.prefix_cache import prefix_block_bytes, store_blocks
from gptj.model import quantized as quantize
from gptj.model.lora import pool_shapes, pool_tree
from gptj.model.transformer import (ADAPTER_POOL, GPTJ, GPTJConfig, abstract_params, cache_logical_axes, count_params,
                                    init_cache, matmul_params, output_logits, recompute_flops_per_token,
                                    resolve_dtype, train_flops_per_token)
from gptj.settings import RunSettings
from gptj.weights.source import open_weights, param_shardings, with_runtime

GIB = 2**30
# Adam keeps two fp32 moments per parameter (mu and nu).
ADAM_MOMENT_BYTES = 8


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one compiled train step, and the arithmetic beside them."""

    num_params: int
    mesh: dict[str, int]  # axis sizes; the stage axis only when it has more than one stage
    rule_set: str
    params: int
    opt_state: int
    temporaries: int | None
    peak: int | None
    params_expected: int
    opt_state_expected: int
    device_memory: int | None
    num_frozen: int = 0  # parameters frozen (LoRA base, train.trainable); num_params counts the trained ones
    frozen: int = 0
    frozen_expected: int = 0
    frozen_dtype: str = ""
    lora_params_expected: int = 0  # what a LoRA run's frozen bf16 base would take per device under these rules
    host: "HostMemory | None" = None  # host memory of reading and writing this model's weights
    pipeline: Schedule | None = None  # the pipeline over the mesh's stages (None: no stage axis)
    objective: str = "lm"
    num_reference: int = 0  # the DPO reference's own parameters (beyond the frozen ones)
    reference: int = 0
    reference_expected: int = 0
    reference_dtype: str = ""
    reference_copy_expected: int = 0  # a frozen copy of the whole model in dpo.reference_dtype, per device
    compiled_for: str = ""  # "the TPU compiler for 8 TPU v3 devices (tpu:v3-8)"; "" for this machine's devices
    refused: str = ""  # the target compiler's out-of-memory refusal, when it would not compile the step
    work: "Work | None" = None  # FLOPs and the step-time bound on a target
    compiler_checked: bool = False  # a TPU compiler checked the step against the device memory planned for

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits `device_memory` (None when either is unknown; False when the compiler refused).

        A TPU compiler refuses a program that does not fit the TPU's HBM, so for its own HBM its
        verdict is the answer: its memory analysis may count buffers that share space (GPT-J-6B's
        v3-8 fine-tuning compiles, though arguments + temporaries add up to 16.5 GiB).
        """
        if self.refused:
            return False
        if self.compiler_checked:
            return True
        if self.peak is None or self.device_memory is None:
            return None
        return self.peak <= self.device_memory


@dataclasses.dataclass(frozen=True)
class Work:
    """What one step of a compiled program does on a target, per device, and the least time it takes."""

    tokens: int  # per step, all devices
    devices: int
    compiled_flops: float  # per device, as the target's compiler emitted the program
    model_flops: float  # per device: 6N + attention (frozen weights: no weight gradients)
    recompute_flops: float  # per device: what the remat policy recomputes
    cost: "targets.ProgramCost"
    bound: "targets.StepBound"
    peak_flops: float  # per device

    @property
    def tokens_per_s(self) -> float:
        """The most tokens per second the step allows (tokens over the bound)."""
        return self.tokens / self.bound.seconds

    @property
    def mfu(self) -> float:
        """The most model FLOPs utilisation the step allows."""
        return self.model_flops / (self.bound.seconds * self.peak_flops)


def _split_ways(partitioner, rules) -> int:
    """Over how many devices a weight matrix is divided under `rules` (its embed x heads/mlp dims)."""
    table = dict(reversed(rules))
    axes = set()
    for name in ("embed", "mlp"):
        axis = table.get(name)
        axes |= {axis} if isinstance(axis, str) else set(axis or ())
    return math.prod(partitioner.mesh.shape.get(a, 1) for a in axes)


def _expected_bytes(params, bytes_per_param: int, ways: int, stages: int) -> int:
    """Per-device bytes of `params` (a tree) split `ways` ways, its stacked layers (`blocks`) also over the stages."""
    stacked = count_params(params.get("blocks", {}))
    return (stacked // stages + count_params(params) - stacked) * bytes_per_param // ways


def _device_memory(device_memory_gib: float | None, target: targets.Target | None = None) -> int | None:
    """--device_memory_gib, else the target's HBM per device, else what this machine's devices report."""
    if device_memory_gib is not None:
        if device_memory_gib <= 0:
            raise ValueError(f"--device_memory_gib must be positive, got {device_memory_gib}")
        return int(device_memory_gib * GIB)
    if target is not None:
        return target.accelerator.hbm_bytes
    stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
    return stats.get("bytes_limit")


def _partitioner(mesh_config) -> Partitioner:
    """The config's mesh and rule set; sizes given in full use the first stage x data x model devices."""
    stage, data, model = mesh_config.stage, mesh_config.data, mesh_config.model
    devices = jax.devices()
    if data > 0 and model > 0 and stage * data * model < len(devices):
        devices = devices[:stage * data * model]
    return Partitioner(make_mesh(data, model, devices=devices, stage=stage), mesh_config.rules)


def _planning_partitioner(mesh_config) -> Partitioner:
    """`_partitioner`, with the way out on a CPU machine that has too few devices."""
    try:
        return _partitioner(mesh_config)
    except PartitioningError as e:
        if jax.devices()[0].platform != "cpu":
            raise
        raise PartitioningError(f"{e} (to plan for more devices on a CPU machine, fake them: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=N)") from e


def _cpu_options(partitioner: Partitioner) -> dict | None:
    """XLA options that make a CPU compile's memory stand for an accelerator's (None elsewhere).

    XLA:CPU has no bf16 matmul: it widens bf16 operands to fp32 (and int4 ones to int8), and
    loop-invariant code motion then hoists that widening of the whole stacked weights out of the
    layer loop: a copy of every layer that a GPU or TPU, which multiply bf16 and read int4
    natively, never makes. Planned on CPU, a program compiles without that pass.
    """
    if partitioner.mesh.devices.flat[0].platform != "cpu":
        return None
    return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def _target(target: str | None, mesh_settings) -> targets.Target | None:
    """The parsed `--target`, its compiler found and the config's mesh checked against it (nothing loaded yet)."""
    if not target:
        return None
    parsed = targets.parse_target(target)
    targets.mesh_shape(parsed, mesh_settings.data, mesh_settings.model, mesh_settings.stage)
    targets.check_compiler(parsed)
    return parsed


def _partitioner_for(mesh_settings, target: targets.Target | None) -> Partitioner:
    """The mesh over the target's compile-only devices, or over this machine's (fake) devices."""
    if target is None:
        return _planning_partitioner(mesh_settings)
    return targets.target_partitioner(target, mesh_settings)


def _compiled_for(target: targets.Target | None) -> str:
    return "" if target is None else f"{target.compiler} for {target.describe()}"


def _compiler_checked(target: targets.Target | None, device_memory: int | None) -> bool:
    """Whether the target's compiler itself checks the plan's device memory: a TPU's, against its own HBM."""
    return (target is not None and target.accelerator.platform == "tpu"
            and device_memory == target.accelerator.hbm_bytes)


def _where(compiled_for: str, devices: int) -> str:
    """What a plan's header says it was compiled for."""
    return f"compiled by {compiled_for}" if compiled_for else f"{devices} {jax.devices()[0].platform} devices"


def make_plan(config, device_memory_gib: float | None = None, target: str | None = None) -> Plan:
    """Compiles the train step of `config` (a ConfigDict or RunSettings) on abstract inputs; what one device holds.

    `target` ('tpu:v3-8', 'gpu:h100x8': gptj.targets.parse_target) compiles it with that
    hardware's compiler for its devices, and adds the step's FLOPs and time bound (`Plan.work`).
    """
    settings = RunSettings.from_config(config)
    parsed = _target(target, settings.mesh)
    device_memory = _device_memory(device_memory_gib, parsed)
    partitioner = _partitioner_for(settings.mesh, parsed)
    trainer = recipe.build_trainer_for_plan(settings, partitioner)
    abstract, frozen = trainer.abstract_state, trainer.abstract_frozen
    n, n_frozen = count_params(abstract["params"]), count_params(frozen)
    n_reference = count_params(trainer.abstract_reference)
    weight_bytes = np.dtype(jax.tree_util.tree_leaves(abstract["params"])[0].dtype).itemsize
    frozen_dtype = np.dtype(jax.tree_util.tree_leaves(frozen)[0].dtype) if n_frozen else None
    reference_dtype = np.dtype(settings.dpo.reference_dtype)
    if parsed is None:
        # Only frozen weights narrower than fp32 are widened (see _cpu_options); trained ones are fp32.
        narrow_frozen = any(dtype is not None and dtype.itemsize < 4
                            for dtype in (frozen_dtype, reference_dtype if n_reference else None))
        options = _cpu_options(partitioner) if narrow_frozen else None
    else:
        options = targets.compiler_options(parsed)
    refused, work = "", None
    try:
        with targets.chatter_held() if parsed else contextlib.nullcontext():
            report = trainer.compile(options)
    except jax.errors.JaxRuntimeError as e:  # a TPU compiler refuses a program that does not fit its HBM
        refused = targets.refusal(e) if parsed is not None else None
        if not refused:
            raise
        report = _refused_report(trainer, refused)
    if not refused and parsed is not None:
        work = _train_work(trainer, settings, partitioner, parsed, n, n_frozen)
    rule_set = partitioner.rule_set
    params_ways, stages = _split_ways(partitioner, rule_set.rules), partitioner.stages
    model_params = nn.meta.unbox(abstract_params(trainer.model.config))
    return Plan(
        num_params=n, mesh=_mesh_sizes(partitioner), rule_set=rule_set.name, params=report.params,
        opt_state=report.opt_state, temporaries=report.temporaries, peak=report.peak,
        params_expected=_expected_bytes(abstract["params"], weight_bytes, params_ways, stages),
        opt_state_expected=_expected_bytes(abstract["params"], ADAM_MOMENT_BYTES,
                                           _split_ways(partitioner, rule_set.optimizer_rules), stages),
        device_memory=device_memory, num_frozen=n_frozen, frozen=report.frozen,
        frozen_expected=(0 if frozen_dtype is None else
                         _expected_bytes(frozen, frozen_dtype.itemsize, params_ways, stages)),
        frozen_dtype="" if frozen_dtype is None else frozen_dtype.name,
        lora_params_expected=_expected_bytes(merge_params(abstract["params"], frozen), 2, params_ways, stages),
        host=host_memory(trainer.model.config), pipeline=trainer.model.pipeline,
        compiled_for=_compiled_for(parsed), refused=refused, work=work,
        compiler_checked=_compiler_checked(parsed, device_memory),
        objective=settings.train.objective, num_reference=n_reference, reference=report.reference,
        reference_expected=_expected_bytes(trainer.abstract_reference, reference_dtype.itemsize, params_ways,
                                           stages),
        reference_dtype=reference_dtype.name if settings.train.objective == "dpo" else "",
        reference_copy_expected=_expected_bytes(model_params, reference_dtype.itemsize, params_ways, stages))


def _refused_report(trainer, refused: str) -> MemoryReport:
    """What one device would hold when the compiler refused the step: the state from its shardings, and the
    temporaries the refusal names (the peak: at least the two together)."""
    def held(tree):
        return per_device_bytes(tree, jax.tree_util.tree_map(lambda a: a.sharding, tree))

    state, frozen, reference = trainer.abstract_state, trainer.abstract_frozen, trainer.abstract_reference
    temporaries = targets.refused_temporaries(refused)
    arguments = held(state) + held(frozen) + held(reference) + held(trainer.abstract_batch)
    return MemoryReport(params=held(state["params"]), opt_state=held(state["opt_state"]), temporaries=temporaries,
                        arguments=arguments, outputs=0, aliased=0, code=None, frozen=held(frozen),
                        reference=held(reference))


def _train_work(trainer, settings: RunSettings, partitioner: Partitioner, target: targets.Target, n_trained: int,
                n_frozen: int) -> Work:
    """The compiled train step's FLOPs, bytes and collectives, beside the model's own count, and its time bound."""
    model = trainer.model.config
    seq_len, tokens = settings.data.seq_len, settings.train.batch_size * settings.data.seq_len
    devices = partitioner.mesh.size
    per_token = train_flops_per_token(model, seq_len)
    if n_frozen:  # frozen weights get no weight gradients (2 FLOPs per weight per token fewer); adapters train
        per_token += -2.0 * matmul_params(model) + (6.0 if getattr(trainer.model, "lora", None) else 2.0) * n_trained
    if settings.train.objective == "dpo":  # two sequences a pair, and the reference's forward pass over each
        tokens *= 2
        per_token += train_flops_per_token(model, seq_len) / 3
    cost = targets.program_cost(trainer.compiled_train_step, partitioner.mesh, target.accelerator)
    return Work(tokens=tokens, devices=devices, compiled_flops=cost.flops, model_flops=tokens * per_token / devices,
                recompute_flops=tokens * recompute_flops_per_token(model, seq_len) / devices, cost=cost,
                bound=targets.step_time_bound(cost, target.accelerator), peak_flops=target.accelerator.peak_flops)


def ways_out(plan: Plan, config) -> list[str]:
    """What would make a plan that does not fit, fit: one line each, with the flags to set."""
    ways = []
    if not plan.num_frozen:
        ways.append(f"LoRA: freeze the weights in bfloat16 ({plan.lora_params_expected / GIB:.2f} GiB per device "
                    "here) and train low-rank adapters, with no gradient or optimizer state for the base: "
                    "--config.lora.rank=16 --config.init_from=... (gptj/configs/gptj_6b_lora.py)")
    devices, model = math.prod(plan.mesh.values()), plan.mesh.get("model", 1)
    # Weights, gradients and optimizer state (most of a full fine-tune's peak) split over zero3's
    # devices; activations do not. The estimate splits the whole peak and keeps 10% for them.
    total = plan.peak * devices
    needed = next((n for n in (2 ** k for k in range(1, 13)) if n > devices and total / n <= 0.9 * plan.device_memory),
                  None)
    if needed is not None:
        ways.append(f"zero3 over {needed} devices (about {total / needed / GIB:.1f} GiB each if all of this peak "
                    f"splits; activations do not, so plan it on {needed} devices): --config.mesh.rules=zero3 "
                    f"--config.mesh.data={max(1, needed // model)} --config.mesh.model={model}, with "
                    "train.batch_size a multiple of the data-parallel size")
    if plan.rule_set == "megatron" and model > 1:
        ways.append("sequence parallelism: --config.mesh.rules=megatron_sp (the residual stream, its LayerNorms and "
                    f"what is saved of them split {model} ways over model by sequence, not replicated)")
    layers = config.model.num_layers
    state = plan.params + plan.opt_state + plan.frozen
    stages = next((n for n in (2, 4, 8, 16) if layers % n == 0
                   and plan.peak - state * (1 - 1 / n) <= 0.9 * plan.device_memory), None)
    if plan.pipeline is None and stages is not None:
        ways.append(f"a pipeline of {stages} stages (the layers' weights, gradients and optimizer state split "
                    f"{stages} more ways, about {(plan.peak - state * (1 - 1 / stages)) / GIB:.1f} GiB here; plan it "
                    f"on {stages} times the devices): --config.mesh.stage={stages}, train.microbatches a multiple "
                    f"of {stages}")
    if config.model.remat_policy != "full":
        ways.append("rematerialise every layer: --config.model.remat_policy=full")
    if config.train.batch_size // config.train.microbatches > 1:
        ways.append("smaller microbatches: raise --config.train.microbatches (same batch, less activation memory)")
    if not ways:
        ways.append("shorten data.seq_len: the activations of one sequence do not fit")
    return ways


def _mesh_sizes(partitioner: Partitioner) -> dict[str, int]:
    """The mesh's axis sizes, {'data': 2, 'model': 4}; the stage axis (first) only when there is a pipeline."""
    return {k: v for k, v in partitioner.mesh.shape.items() if k != STAGE_AXIS or v > 1}


def _mesh_text(mesh: dict[str, int]) -> str:
    """'data=2 x model=4', or 'stage=2 x data=2 x model=2'."""
    return " x ".join(f"{k}={v}" for k, v in mesh.items())


def format_plan(plan: Plan, config) -> str:
    """The table `--mode=plan` prints."""
    def gib(n):
        return "n/a" if n is None else f"{n / GIB:8.3f} GiB"

    mesh = _mesh_text(plan.mesh)
    devices = math.prod(plan.mesh.values())
    batch, micro, seq = config.train.batch_size, config.train.microbatches, config.data.seq_len
    if plan.num_frozen:
        count = (f"{plan.num_params + plan.num_frozen:,} parameters ({plan.num_params:,} trained, "
                 f"{plan.num_frozen:,} frozen in {plan.frozen_dtype})")
        params_rows = [f"  {f'frozen params ({plan.frozen_dtype})':<34}{gib(plan.frozen):>14}"
                       f"{gib(plan.frozen_expected):>14}",
                       f"  {'trained params':<34}{gib(plan.params):>14}{gib(plan.params_expected):>14}"]
    else:
        count = f"{plan.num_params:,} parameters"
        params_rows = [f"  {'params':<34}{gib(plan.params):>14}{gib(plan.params_expected):>14}"]
    where = _where(plan.compiled_for, devices)
    lines = [
        f"plan: {count}; mesh {mesh} ({where}), rule set {plan.rule_set}",
        f"      batch {batch}{' pairs x 2' if plan.objective == 'dpo' else ''} x {seq} tokens in {micro} "
        f"microbatch(es) of {batch // micro}; "
        f"remat {config.model.remat_policy}, compute {config.model.dtype}",
        *([] if plan.pipeline is None else [
            f"      pipeline: {plan.pipeline.stages} stages of {config.model.num_layers // plan.pipeline.stages} "
            f"layers, GPipe over {micro} microbatches: {plan.pipeline.iterations} iterations, bubble "
            f"{100 * plan.pipeline.bubble:.0f}%"]),
        f"  {'per device':<34}{'compiled':>14}{'arithmetic':>14}",
        *params_rows,
        *([_reference_row(plan, gib)] if plan.objective == "dpo" else []),
        f"  {'optimizer state (Adam mu, nu)':<34}{gib(plan.opt_state):>14}{gib(plan.opt_state_expected):>14}",
        f"  {'temporaries (grads, activations)':<34}{gib(plan.temporaries):>14}",
        f"  {'peak':<34}{gib(plan.peak):>14}",
    ]
    if plan.objective == "dpo":
        lines += _reference_notes(plan)
    if plan.refused:
        lines.append(f"  fit: does NOT fit: the compiler refused the step ({plan.refused}); peak above at least")
        lines += ["  ways out:"] + [f"    - {way}" for way in ways_out(plan, config)]
    elif plan.device_memory is None:
        lines.append("  fit: unknown device memory; pass --device_memory_gib to check")
    elif plan.fits is None:
        lines.append("  fit: this backend reports no temporaries; cannot tell")
    else:
        margin = (plan.device_memory - plan.peak) / GIB
        verdict = "fits" if plan.fits else "does NOT fit"
        if plan.compiler_checked:
            why = "the TPU compiler compiled it for this HBM; it refuses a program that does not fit"
        else:
            why = f"{'margin' if plan.fits else 'short by'} {abs(margin):.2f} GiB"
        lines.append(f"  fit: {verdict} in {plan.device_memory / GIB:.2f} GiB per device ({why})")
        if not plan.fits:
            lines += ["  ways out:"] + [f"    - {way}" for way in ways_out(plan, config)]
    if plan.work is not None:
        lines += format_work(plan.work)
    if plan.host is not None:
        lines += format_host_memory(plan.host)
    return "\n".join(lines)


# What precomputed reference log-probabilities take: one fp32 value per sequence, two per pair.
PRECOMPUTED_BYTES_PER_PAIR = 8


def _reference_row(plan: Plan, gib) -> str:
    """A DPO plan's row of the reference model's own parameters (0 under LoRA: the frozen base is its)."""
    return f"  {f'DPO reference params ({plan.reference_dtype})':<34}{gib(plan.reference):>14}" \
           f"{gib(plan.reference_expected):>14}"


def _reference_notes(plan: Plan) -> list[str]:
    """How a DPO plan's reference is held, and what the other ways to a reference would take per device."""
    copy = f"{plan.reference_copy_expected / GIB:.3f} GiB per device"
    if plan.num_reference:
        held = (f"a frozen copy of init_from's {plan.num_reference:,} trained parameters in {plan.reference_dtype} "
                "(the row above), exact on any data")
    else:
        held = f"the frozen base with the adapters off, no copy (a frozen copy in {plan.reference_dtype}: {copy})"
    return [f"  DPO reference: {held};",
            f"    reference log-probs computed once instead: 0 GiB per device, {PRECOMPUTED_BYTES_PER_PAIR} bytes a "
            "pair on the host,",
            "    and a forward pass over the data before step 1 (again whenever data or seq_len change)"]


def format_work(work: Work) -> list[str]:
    """The plan's FLOPs and step-time lines on a target."""
    bound, cost = work.bound, work.cost
    counted = work.model_flops + work.recompute_flops
    lines = [
        f"  FLOPs per step per device: compiled {work.compiled_flops:.3e}; the model's count {counted:.3e} "
        f"(6N + attention {work.model_flops:.3e} + remat recompute {work.recompute_flops:.3e}; compiled / "
        f"counted {work.compiled_flops / counted:.2f})",
        f"  step time at least {bound.seconds:.3f} s, bound by {bound.limited_by}: compute {bound.compute_s:.3f} s, "
        f"HBM {bound.memory_s:.3f} s ({cost.bytes_accessed / GIB:.1f} GiB), interconnect {bound.link_s:.3f} s "
        f"({(cost.link_bytes + cost.host_link_bytes) / GIB:.2f} GiB in "
        f"{sum(cost.collectives.values()):,} collectives)",
        f"  so at most {work.tokens_per_s:,.0f} tokens/s over the {work.devices} devices, MFU at most "
        f"{100 * work.mfu:.0f}% (python -m gptj.scaling estimate: the analytic model's prediction)",
    ]
    if cost.uncounted_loops:
        lines.append(f"  ({cost.uncounted_loops} loop(s) of unknown trip count counted once: FLOPs and bytes are low)")
    return lines


def print_plan(config, device_memory_gib: float | None = None, target: str | None = None) -> Plan:
    """Prints (and returns) the per-device memory plan of `config`'s train step; see the module doc."""
    plan = make_plan(config, device_memory_gib, target)
    if jax.process_index() == 0:
        print(format_plan(plan, config), flush=True)
    return plan


# --- host memory of the weights ---------------------------------------------------------------------------------

# What the runtime and the streaming buffers (a few 16 MiB chunks, slabs and blocks: gptj.core.streaming) add to the
# weights a path holds, whatever the model: the largest such excess benchmarks/weights_memory.py measured on
# 0.5B-2.7B shapes (README, "Host memory": slim and quantize, which read and write params directories in one
# process, 0.53 GiB), rounded up.
STREAMING_OVERHEAD = int(0.55 * GIB)
_WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}


@dataclasses.dataclass(frozen=True)
class HostMemory:
    """Peak host bytes, per process, of each path that reads or writes a model's weights (see `host_memory`)."""

    num_params: int
    convert: int  # from_hf, from_mtj, slim, quantize
    to_hf: int
    load_accelerator: int  # init_from, sample, serve, eval onto GPU/TPU devices
    load_cpu: dict[str, int]  # the same on a CPU, whose devices are host memory: by weight dtype


def host_memory(model) -> HostMemory:
    """The host memory each weights path needs for `model` (a GPTJConfig): the formula the measurements confirm.

    Every path streams (gptj.core.streaming): a converter holds a few chunks plus
    the largest thing it must hold whole (mtj: one layer of one matrix,
    merged from its shards in fp32, beside its parts; quantize: the scales
    of one matrix, far less; to_hf: the head's HF tensor, whose rows are
    gptj's columns); a load holds a slab of this
    process's shards, so on accelerators it needs no more than the overhead,
    and on a CPU the weights themselves in their dtype.
    """
    n = count_params(nn.meta.unbox(abstract_params(model)))
    layer_matrix = model.d_model * model.mlp_dim * 4  # fc_in of one layer, fp32: the largest merged layer
    head = model.d_model * model.vocab_size * 4  # the head's HF tensor (fp32 export)
    return HostMemory(
        num_params=n, convert=STREAMING_OVERHEAD + 2 * layer_matrix, to_hf=STREAMING_OVERHEAD + head + layer_matrix,
        load_accelerator=STREAMING_OVERHEAD,
        load_cpu={name: n * size + STREAMING_OVERHEAD for name, size in _WEIGHT_BYTES.items()})


def format_host_memory(host: HostMemory) -> list[str]:
    """The plan's host-memory lines: what each weights path needs on the host, per process."""
    def gib(n):
        return f"{n / GIB:.1f}"

    cpu = " / ".join(gib(host.load_cpu[k]) for k in _WEIGHT_BYTES)
    return [
        f"  host memory per process, weights streamed ({host.num_params:,} parameters):",
        f"  {'  convert from_hf, from_mtj, slim, quantize':<44}{gib(host.convert):>10} GiB",
        f"  {'  convert to_hf (fp32)':<44}{gib(host.to_hf):>10} GiB",
        f"  {'  load onto GPUs/TPUs':<44}{gib(host.load_accelerator):>10} GiB   (init_from, sample, serve, eval)",
        f"  {'  load on a CPU':<44}{cpu:>10} GiB   (fp32 / bf16 / int8 weights: the CPU is the device)",
    ]


# -- --plan=serve: inference ----------------------------------------------------------------------

# The weight formats a serving plan compares (bits; 0: the compute dtype), with the converter's default groups.

SERVE_BITS = (0, 8, 4)


@dataclasses.dataclass(frozen=True)
class ServeRow:
    """Per-device bytes of serving one weight format: weights and KV cache from their shardings, the rest compiled."""

    weights_format: str  # "bfloat16", "int8 per channel", "int4 in groups of 128"
    weights: int
    kv_cache: int
    temporaries: int | None  # the larger of the prefill's and the decode step's
    peak: int | None  # the larger program's arguments + outputs not written in place + temporaries, + prefix store
    refused: str = ""  # the target compiler's out-of-memory refusal of either program
    prefill_bound: "targets.StepBound | None" = None  # on a target: the least time of the prefill
    decode_bound: "targets.StepBound | None" = None  # ... and of one decode step
    adapters: int = 0  # the adapter pool (replicated)
    prefix_cache: int = 0  # the prefix cache's block store


@dataclasses.dataclass(frozen=True)
class ServePlan:
    """What one device holds to serve `batch` rows of `context` tokens, per weight format."""

    num_params: int
    mesh: dict[str, int]
    rule_set: str
    batch: int
    context: int
    dtype: str
    rows: tuple[ServeRow, ...]
    device_memory: int | None
    adapter_slots: int = 0
    adapter_rank: int = 0
    prefix_blocks: int = 0
    prefix_block_size: int = 0

    compiled_for: str = ""  # as Plan.compiled_for
    compiler_checked: bool = False  # as Plan.compiler_checked

    def fits(self, row: ServeRow) -> bool | None:
        """Whether `row`'s peak fits `device_memory` (None when either is unknown; False when refused). The
        compiler's own verdict stands unless a prefix store sits beside its programs."""
        if row.refused:
            return False
        if self.compiler_checked and not row.prefix_cache:
            return True
        if row.peak is None or self.device_memory is None:
            return None
        return row.peak <= self.device_memory


def serve_model_config(config) -> GPTJConfig:
    """The model a serving plan is for: the shape of `init_from`'s weights if given, else config.model, unquantized."""
    settings = RunSettings.from_config(config)
    model = settings.model
    if settings.init_from:
        model = with_runtime(model, open_weights(settings.init_from, model.vocab_pad_multiple))
    return model.replace(quant_bits=0, quant_group_size=0, quant_targets=(), remat_policy="none")


def _serve_row(model: GPTJConfig, partitioner: Partitioner, batch: int, context: int,
               target: targets.Target | None = None, adapter_slots: int = 0, adapter_rank: int = 0,
               prefix_blocks: int = 0, block_size: int = 1) -> ServeRow:
    """Compiles a whole-context prefill and a decode step of `model` on abstract inputs; see ServeRow.

    With an adapter pool of `adapter_slots` x `adapter_rank`, the programs run every row through an adapter;
    `prefix_blocks` blocks of `block_size` tokens are the prefix cache's store, held beside them."""
    boxed = nn.meta.unbox(abstract_params(model))
    shardings = param_shardings(model, partitioner)
    cache = jax.eval_shape(lambda: init_cache(model, batch, context))
    cache_specs = jax.tree_util.tree_map(lambda axes: PartitionSpec(*axes), cache_logical_axes(cache),
                                         is_leaf=lambda x: isinstance(x, tuple))
    cache_shardings = partitioner.shardings_for(cache_specs, cache, optimizer_subtree=None)
    dtype = resolve_dtype(model.dtype)
    pool = pool_tree({t: tuple(jax.ShapeDtypeStruct(shape, dtype) for shape in pair)
                      for t, pair in pool_shapes(model, adapter_slots, adapter_rank).items()}) if adapter_slots else {}
    replicated = partitioner.sharding(())
    adapters = per_device_bytes(pool, jax.tree_util.tree_map(lambda _: replicated, pool))
    store = {name: jax.ShapeDtypeStruct((model.num_layers, prefix_blocks, model.num_heads, block_size,
                                         model.head_dim), dtype) for name in ("key", "value")}
    store_sharding = partitioner.sharding(("layers", None, "act_heads", None, "head_dim"))
    prefix_cache = per_device_bytes(store, {name: store_sharding for name in store}) if prefix_blocks else 0
    decoder = GPTJ(model, decode=True)

    def step(params, pool, cache, tokens):  # the next token's logits only, as a server samples them
        variables = {"params": params, ADAPTER_POOL: pool} if pool else {"params": params}
        ids = jnp.arange(tokens.shape[0], dtype=jnp.int32) % max(adapter_slots, 1)  # a mix of adapters
        hidden, variables = decoder.apply({**variables, "cache": cache}, tokens, return_hidden=True,
                                          mutable=["cache"], adapter_ids=ids if pool else None)
        logits = output_logits(hidden[:, -1], params["lm_head_kernel"], params["lm_head_bias"], model)
        return logits, variables["cache"]

    program = partitioner.jit(step, in_shardings=(shardings, replicated, cache_shardings,
                                                  partitioner.batch_sharding(2)), donate_argnums=(2,))
    temporaries = peak = None
    options = _cpu_options(partitioner) if target is None else targets.compiler_options(target)
    bounds = []
    for length in (context, 1):  # the prefill of a whole context, then one decode step
        tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
        try:
            with targets.chatter_held() if target else contextlib.nullcontext():
                compiled = program.lower(boxed, pool, cache, tokens).compile(options)
        except jax.errors.JaxRuntimeError as e:  # a TPU compiler refuses a program that does not fit its HBM
            refused = targets.refusal(e) if target is not None else None
            if not refused:
                raise
            return ServeRow(quantize.describe(model) or model.dtype, per_device_bytes(boxed, shardings),
                            per_device_bytes(cache, cache_shardings), targets.refused_temporaries(refused), None,
                            refused=refused, adapters=adapters, prefix_cache=prefix_cache)
        if target is not None:
            bounds.append(targets.step_time_bound(targets.program_cost(compiled, partitioner.mesh, target.accelerator),
                                                  target.accelerator))
        analysis = compiled.memory_analysis()
        if analysis is None:
            continue
        temp = int(analysis.temp_size_in_bytes)
        high = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
                   + temp)
        temporaries, peak = max(temporaries or 0, temp), max(peak or 0, high)
    return ServeRow(quantize.describe(model) or model.dtype, per_device_bytes(boxed, shardings),
                    per_device_bytes(cache, cache_shardings), temporaries,
                    None if peak is None else peak + prefix_cache,
                    prefill_bound=bounds[0] if bounds else None, decode_bound=bounds[1] if bounds else None,
                    adapters=adapters, prefix_cache=prefix_cache)


def make_serve_plan(config, batch: int, context: int, device_memory_gib: float | None = None,
                    target: str | None = None, weight_bits: tuple[int, ...] = SERVE_BITS) -> ServePlan:
    """Per-device memory of serving `config`'s model to `batch` rows of `context` tokens, per weight format.

    The weights are held in the compute dtype (`model.dtype`: inference keeps
    no fp32 master copy) or quantized as `python -m gptj.convert quantize`
    writes them by default (int8 per channel, int4 in groups of
    `quantize.default_group_size`; every matrix); the KV cache, the adapter
    pool and the prefix store are in the compute dtype. `target`: compiled by that hardware's compiler, as
    `make_plan`. `weight_bits`: the formats to plan (0: the compute dtype, 8, 4), all three by default.
    """
    if batch <= 0 or context <= 0:
        raise ConfigError(f"--batch_size and --context_len must be positive, got {batch} and {context}")
    model = serve_model_config(config)
    if context > model.max_len:
        raise ConfigError(f"--context_len={context} exceeds the model's max_len={model.max_len}")
    mesh_settings = RunSettings.from_config(config).mesh
    parsed = _target(target, mesh_settings)
    device_memory = _device_memory(device_memory_gib, parsed)
    partitioner = _partitioner_for(mesh_settings, parsed)
    if batch % partitioner.data_parallel_size:
        raise ConfigError(f"--batch_size={batch} must be divisible by the data-parallel size "
                         f"({partitioner.data_parallel_size}, from mesh.data and rule set {config.mesh.rules!r})")
    served = model.replace(param_dtype=model.dtype)
    serve = RunSettings.from_config(config).serve
    try:
        slots, rank = adapter_pool_size(serve)
    except (AdapterError, ValueError) as e:
        raise ConfigError(f"serve.adapters: {e}") from None
    block_size = serve.prefix_block_size
    blocks = store_blocks(serve.prefix_cache_gib, prefix_block_bytes(served, block_size), context // block_size)
    rows = []
    for bits in weight_bits:
        if bits:
            served_format = served.replace(quant_bits=bits, quant_group_size=quantize.default_group_size(served, bits),
                                           quant_targets=quantize.TARGETS)
        else:
            served_format = served
        rows.append(_serve_row(served_format, partitioner, batch, context, parsed, slots, rank, blocks, block_size))
    return ServePlan(num_params=count_params(nn.meta.unbox(abstract_params(served))),
                     mesh=_mesh_sizes(partitioner), rule_set=partitioner.rule_set.name, batch=batch,
                     context=context, dtype=model.dtype, rows=tuple(rows), device_memory=device_memory,
                     compiled_for=_compiled_for(parsed), compiler_checked=_compiler_checked(parsed, device_memory),
                     adapter_slots=slots, adapter_rank=rank, prefix_blocks=blocks, prefix_block_size=block_size)


def format_serve_plan(plan: ServePlan) -> str:
    """The table `--mode=plan --plan=serve` prints."""
    def gib(n):
        return "n/a" if n is None else f"{n / GIB:.3f} GiB"

    mesh = _mesh_text(plan.mesh)
    devices = math.prod(plan.mesh.values())
    memory = "" if plan.device_memory is None else f"fits {plan.device_memory / GIB:.2f} GiB"
    where = _where(plan.compiled_for, devices)
    lines = [
        f"serve plan: {plan.num_params:,} parameters; mesh {mesh} ({where}), rule set {plan.rule_set}",
        f"      batch {plan.batch} x {plan.context} tokens of context; prefill of the whole context and a decode "
        f"step, compute {plan.dtype}",
        f"      adapters: {plan.adapter_slots} slots of rank {plan.adapter_rank} on every target"
        if plan.adapter_slots else "      adapters: none (config.serve.adapters, max_adapters)",
        f"      prefix cache: {plan.prefix_blocks} blocks of {plan.prefix_block_size} tokens"
        if plan.prefix_blocks else "      prefix cache: off (config.serve.prefix_cache_gib)",
        f"  {'per device':<24}{'weights':>13}{'KV cache':>13}{'adapters':>13}{'prefix cache':>13}"
        f"{'temporaries':>13}{'peak':>13}  {memory}",
    ]
    for row in plan.rows:
        fits = plan.fits(row)
        verdict = "" if fits is None else ("yes" if fits else "NO")
        lines.append(f"  {row.weights_format:<24}{gib(row.weights):>13}{gib(row.kv_cache):>13}{gib(row.adapters):>13}"
                     f"{gib(row.prefix_cache):>13}{gib(row.temporaries):>13}{gib(row.peak):>13}  {verdict}")
        if row.refused:
            lines.append(f"    the compiler refused it: {row.refused}")
    bounded = [row for row in plan.rows if row.decode_bound is not None]
    if bounded:
        lines.append("  least time per program (each resource at its peak), so the most tokens/s per device group:")
    for row in bounded:
        prefill, decode = row.prefill_bound, row.decode_bound
        lines.append(f"  {row.weights_format:<24}prefill {1e3 * prefill.seconds:8.2f} ms ({prefill.limited_by}), "
                     f"decode step {1e3 * decode.seconds:6.2f} ms ({decode.limited_by}): at most "
                     f"{plan.batch / decode.seconds:,.0f} tokens/s decoded")
    if plan.device_memory is None:
        lines.append("  fit: unknown device memory; pass --device_memory_gib to check")
    lines.append("  quantize: python -m gptj.convert quantize --workdir=W --out=DIR --bits=8 (or --bits=4)")
    return "\n".join(lines)


def print_serve_plan(config, batch: int, context: int, device_memory_gib: float | None = None,
                     target: str | None = None) -> ServePlan:
    """Prints (and returns) the per-device memory plan of serving `config`'s model; see the module doc."""
    plan = make_serve_plan(config, batch, context, device_memory_gib, target)
    if jax.process_index() == 0:
        print(format_serve_plan(plan), flush=True)
    return plan
