"""`python main.py --mode=plan`: what one device must hold to train the config, before renting the devices.

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
parameter count x bytes per value / the number of devices each is split over.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from gptj.model import count_params
from gptj import train_lm
from gptj.partitioning import Partitioner, PartitioningError

GIB = 2**30
# Adam keeps two fp32 moments per parameter (mu and nu).
ADAM_MOMENT_BYTES = 8


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one compiled train step, and the arithmetic beside them."""

    num_params: int
    mesh: dict[str, int]
    rule_set: str
    params: int
    opt_state: int
    temporaries: int | None
    peak: int | None
    params_expected: int
    opt_state_expected: int
    device_memory: int | None

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits `device_memory` (None when either is unknown)."""
        if self.peak is None or self.device_memory is None:
            return None
        return self.peak <= self.device_memory


def _split_ways(partitioner, rules) -> int:
    """Over how many devices a weight matrix is divided under `rules` (its embed x heads/mlp dims)."""
    table = dict(reversed(rules))
    axes = set()
    for name in ("embed", "mlp"):
        axis = table.get(name)
        axes |= {axis} if isinstance(axis, str) else set(axis or ())
    return math.prod(partitioner.mesh.shape[a] for a in axes)


def _device_memory(device_memory_gib: float | None) -> int | None:
    if device_memory_gib is not None:
        if device_memory_gib <= 0:
            raise ValueError(f"--device_memory_gib must be positive, got {device_memory_gib}")
        return int(device_memory_gib * GIB)
    stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
    return stats.get("bytes_limit")


def make_plan(config, device_memory_gib: float | None = None) -> Plan:
    """Compiles `config`'s train step on abstract inputs and measures what one device holds."""
    device_memory = _device_memory(device_memory_gib)
    try:
        partitioner = Partitioner.from_config(config.mesh)
    except PartitioningError as e:
        if jax.devices()[0].platform != "cpu":
            raise
        raise PartitioningError(f"{e} (to plan for more devices on a CPU machine, fake them: "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=N)") from e
    trainer = train_lm.build_trainer_for_plan(config, partitioner)
    report = trainer.compile()
    abstract = trainer.abstract_state
    n = count_params(abstract["params"])
    weight_bytes = np.dtype(jax.tree_util.tree_leaves(abstract["params"])[0].dtype).itemsize
    rule_set = partitioner.rule_set
    return Plan(
        num_params=n, mesh=dict(partitioner.mesh.shape), rule_set=rule_set.name, params=report.params,
        opt_state=report.opt_state, temporaries=report.temporaries, peak=report.peak,
        params_expected=n * weight_bytes // _split_ways(partitioner, rule_set.rules),
        opt_state_expected=n * ADAM_MOMENT_BYTES // _split_ways(partitioner, rule_set.optimizer_rules),
        device_memory=device_memory)


def format_plan(plan: Plan, config) -> str:
    """The table `--mode=plan` prints."""
    def gib(n):
        return "n/a" if n is None else f"{n / GIB:8.3f} GiB"

    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
    devices = math.prod(plan.mesh.values())
    batch, micro, seq = int(config.train.batch_size), int(config.train.microbatches), int(config.data.seq_len)
    lines = [
        f"plan: {plan.num_params:,} parameters; mesh {mesh} ({devices} {jax.devices()[0].platform} devices), "
        f"rule set {plan.rule_set}",
        f"      batch {batch} x {seq} tokens in {micro} microbatch(es) of {batch // micro}; "
        f"remat {config.model.remat_policy}, compute {config.model.dtype}",
        f"  {'per device':<34}{'compiled':>14}{'arithmetic':>14}",
        f"  {'params':<34}{gib(plan.params):>14}{gib(plan.params_expected):>14}",
        f"  {'optimizer state (Adam mu, nu)':<34}{gib(plan.opt_state):>14}{gib(plan.opt_state_expected):>14}",
        f"  {'temporaries (grads, activations)':<34}{gib(plan.temporaries):>14}",
        f"  {'peak':<34}{gib(plan.peak):>14}",
    ]
    if plan.device_memory is None:
        lines.append("  fit: unknown device memory; pass --device_memory_gib to check")
    elif plan.fits is None:
        lines.append("  fit: this backend reports no temporaries; cannot tell")
    else:
        margin = (plan.device_memory - plan.peak) / GIB
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  fit: {verdict} in {plan.device_memory / GIB:.2f} GiB per device "
                     f"({'margin' if plan.fits else 'short by'} {abs(margin):.2f} GiB)")
    return "\n".join(lines)


def print_plan(config, device_memory_gib: float | None = None) -> Plan:
    """Prints (and returns) the per-device memory plan of `config`'s train step; see the module doc."""
    plan = make_plan(config, device_memory_gib)
    if jax.process_index() == 0:
        print(format_plan(plan, config), flush=True)
    return plan
