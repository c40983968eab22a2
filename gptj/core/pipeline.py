"""Pipeline parallelism over the mesh's `stage` axis: a stack of layers run on GPipe's schedule.

A stack of L identical layers keeps its parameters stacked on a leading
`layers` axis, which the rule sets split over `stage` (`gptj.core.partitioning`):
with S stages, stage s holds the L/S consecutive layers s·L/S ... (s+1)·L/S - 1,
and the stored layout is the same whatever S is, so checkpoints do not depend
on it. `run` takes a batch through the stack as M microbatches:

    iteration   0    1    2    3    4          (S = 3 stages, M = 3 microbatches)
    stage 0     m0   m1   m2   .    .
    stage 1     .    m0   m1   m2   .
    stage 2     .    .    m0   m1   m2

Microbatch m enters stage 0 at iteration m and leaves stage S-1 at iteration
m + S - 1: M + S - 1 iterations, each of which runs every stage once (the loop
runs under `shard_map` with `stage` manual, so each device computes its own
stage's layers on its own microbatch, with the weights where they lie, and
`data` x `model` left to the rules). Between two iterations each stage's
output moves to the next stage: one collective-permute of one microbatch's
activations. The S - 1 iterations in which a stage has no
microbatch are the bubble, (S - 1) / (M + S - 1) of the time; a stage in the
bubble computes on zeros and its result is dropped. The backward pass is jax's
derivative of the loop: the same schedule in reverse, the transfers in the
other direction. Autodiff keeps what the layers save (their remat policy) for
every iteration until the backward pass: GPipe holds all M microbatches'
activations of a stage's layers at once, where gradient accumulation holds one.

Where microbatches wait (after MaxText's pipeline): the batch arrives as a
[B, ...] array whose rows are split over `stage` x `data`. It is cut into
microbatches where it lies, so no row moves: stage s holds microbatches
s·M/S ... (s+1)·M/S - 1, and microbatch s·M/S + k takes the k-th run of
B/(M·D) rows from each of stage s's D data-parallel blocks (so every
microbatch is spread over all data-parallel devices). These wait in a stream
of M/S slots per stage. In each iteration stage 0 takes the microbatch at the
head of its slot; that slot of every stage then moves one stage towards stage
0 (a second collective-permute) and the last stage appends its output at the
tail. The stream is a delay line of exactly M iterations, so after the last
iteration it holds the M outputs, each on the stage its input came from (up
to a rotation of the slots), and they leave in the layout the batch arrived in.

Inside a stage, the `stage` mesh axis is the loop's own (manual), so the
layers run under the rules without it (`partitioning.without_axis`): the rule
sets over `data` x `model` apply unchanged within a stage.

The one requirement on M: a multiple of S (at least one microbatch per stage
to start the stream with), and B a multiple of M times the data-parallel size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gptj.core.partitioning import STAGE_AXIS, logical_spec, without_axis
from gptj.errors import PartitioningError

# stage_fn(stage params [L/S, ...], x [B/M, ...], this microbatch's per-microbatch arrays, rng or None) -> x
StageFn = Callable[[Any, jax.Array, tuple, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """GPipe over `stages` pipeline stages with `microbatches` microbatches per batch."""

    stages: int
    microbatches: int

    @property
    def iterations(self) -> int:
        """Loop iterations: each microbatch's turn at stage 0, then S - 1 to drain the pipeline."""
        return self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """The fraction of every stage's time spent without a microbatch: (S - 1) / (M + S - 1)."""
        return (self.stages - 1) / self.iterations

    def problems(self, num_layers: int | None = None, names: tuple[str, str, str] = (
            "stages", "microbatches", "layers")) -> list[str]:
        """What makes this schedule impossible (for a stack of `num_layers` layers), one sentence each.

        `names` are how the caller's user spells stages, microbatches and layers (config keys, say).
        """
        stages, micro, layers = names
        out = []
        if self.stages < 1:
            out.append(f"{stages}={self.stages} must be positive")
            return out
        if self.microbatches < self.stages:
            out.append(f"{micro}={self.microbatches} is fewer than {stages}={self.stages}: a pipeline needs at "
                       "least one microbatch per stage")
        elif self.microbatches % self.stages:
            out.append(f"{micro}={self.microbatches} must be a multiple of {stages}={self.stages}: each stage "
                       "starts with the same number of microbatches")
        if num_layers is not None and num_layers % self.stages:
            out.append(f"{layers}={num_layers} is not divisible by {stages}={self.stages}: every stage runs the "
                       "same number of layers")
        return out


def _mesh_size(names) -> int:
    """Devices over which the current mesh splits along `names` (None, an axis name, or a tuple of them)."""
    shape = jax.sharding.get_abstract_mesh().shape
    names = () if names is None else ((names,) if isinstance(names, str) else tuple(names))
    size = 1
    for name in names:
        size *= shape.get(name, 1)
    return size


def run(stage_fn: StageFn, stacked_params, x: jax.Array, per_microbatch: Sequence[jax.Array | None] = (), *,
        schedule: Schedule, x_axes: Sequence[str | None], rng: jax.Array | None = None) -> jax.Array:
    """The layer stack applied to `x` on GPipe's schedule (see the module docstring).

    Args:
      stage_fn: one stage's layers: `(params, x, per_microbatch, rng) -> x`, where `params` is the
        stage's slice of `stacked_params` (leading axis L/S), `x` one microbatch [B/M, ...],
        `per_microbatch` the slices of the `per_microbatch` arrays for that microbatch (None stays
        None) and `rng` a key for that microbatch and stage (None when `rng` is None).
      stacked_params: a tree of arrays stacked on a leading axis of L layers, split over `stage`.
      x: [B, ...] activations, rows split over stage x data as `x_axes[0]` says.
      per_microbatch: other [B, ...] arrays the layers read row by row (positions, masks).
      schedule: stages S (the mesh's `stage` size) and microbatches M.
      x_axes: the logical axes of `x` (batch first), as the model's constraints name them.
      rng: the root of the stages' random streams (dropout), or None.

    Must run under a mesh and logical-axis rules (`Partitioner.jit` / `activate`).
    Returns the stack's output, laid out as `x`.
    """
    stages, micro = schedule.stages, schedule.microbatches
    mesh_stages = _mesh_size(STAGE_AXIS)
    if mesh_stages != stages:
        raise PartitioningError(f"pipeline: {stages} stages, but the mesh's stage axis has size {mesh_stages}")
    layers = jax.tree_util.tree_leaves(stacked_params)[0].shape[0]
    problems = schedule.problems(layers)
    batch = x.shape[0]
    inner_rules = without_axis(nn.get_logical_axis_rules(), STAGE_AXIS)
    inner = logical_spec(x_axes, inner_rules)  # one microbatch's layout within its stage
    data = _mesh_size(inner[0])
    if batch % (micro * data):
        problems.append(f"batch of {batch} rows is not divisible by {micro} microbatches x {data}-way data "
                        "parallelism")
    if problems:
        raise PartitioningError("pipeline: " + "; ".join(problems))
    per_stage, rows = micro // stages, batch // micro

    def to_stages(a):  # [B, ...] -> [S, M/S, B/M, ...], no row leaving its device
        rest = a.shape[1:]
        a = a.reshape((stages, data, per_stage, rows // data) + rest).swapaxes(1, 2)
        return a.reshape((stages, per_stage, rows) + rest)

    def from_stages(a):  # the inverse of to_stages
        rest = a.shape[3:]
        return a.reshape((stages, per_stage, data, rows // data) + rest).swapaxes(1, 2).reshape((batch,) + rest)

    def constrain(a, spec):
        return jax.lax.with_sharding_constraint(a, PartitionSpec(*spec))

    stream = constrain(to_stages(x), (STAGE_AXIS, None) + tuple(inner))  # [S, M/S, B/M, ...]
    # The per-microbatch arrays: every stage may need any microbatch's, so each stage holds all (they are small).
    extras = tuple(None if a is None else constrain(to_stages(a).reshape((micro, rows) + a.shape[1:]),
                                                    (None, inner[0]) + (None,) * (a.ndim - 1))
                   for a in per_microbatch)
    params = jax.tree_util.tree_map(
        lambda p: constrain(p.reshape((stages, layers // stages) + p.shape[1:]),
                            (STAGE_AXIS,) + (PartitionSpec.UNCONSTRAINED,) * p.ndim), stacked_params)

    def local(params, stream, extras):
        """The whole schedule as one stage sees it: its layers, its slots of the stream, what it passes on.

        Runs under shard_map with `stage` manual (each device holds one stage's share of every array) and
        `data` x `model` left to the rules: the stage's weights are used where they lie, never transposed.
        """
        stage = jax.lax.axis_index(STAGE_AXIS)
        params = jax.tree_util.tree_map(lambda p: p[0], params)
        stream = stream[0]  # [M/S, B/M, ...]
        forward = [(i, (i + 1) % stages) for i in range(stages)]
        backward = [(i, (i - 1) % stages) for i in range(stages)]

        def iteration(carry, i):
            stream, held = carry
            slot = jax.lax.dynamic_index_in_dim(stream, i % per_stage, keepdims=False)
            # Stage 0 takes microbatch i from the head of the stream (zeros once all have entered); the others
            # take what the previous stage passed them.
            first = jnp.where(i < micro, slot, jnp.zeros_like(slot))
            inputs = constrain(jnp.where(stage == 0, first, held), inner)
            microbatch = jnp.clip(i - stage, 0, micro - 1)
            extra = tuple(None if a is None else a[microbatch] for a in extras)
            key = None if rng is None else jax.random.fold_in(jax.random.fold_in(rng, microbatch), stage)
            with nn.logical_axis_rules(inner_rules):
                outputs = constrain(stage_fn(params, inputs, extra, key), inner)
            # One collective-permute each way: the outputs on to the next stage (the first stage receives
            # nothing), and this slot of the stream one stage back, the last stage appending its outputs.
            held = jax.lax.ppermute(outputs, STAGE_AXIS, forward)
            held = jnp.where(stage == 0, jnp.zeros_like(held), held)
            slot = jax.lax.ppermute(slot, STAGE_AXIS, backward)
            slot = jnp.where(stage == stages - 1, outputs, slot)
            stream = jax.lax.dynamic_update_index_in_dim(stream, slot, i % per_stage, axis=0)
            return (constrain(stream, (None,) + tuple(inner)), constrain(held, inner)), None

        held = constrain(jnp.zeros_like(stream[0]), inner)  # zeros_like: varying over the stages, as the carry
        (stream, _), _ = jax.lax.scan(iteration, (stream, held), jnp.arange(schedule.iterations, dtype=jnp.int32))
        # Microbatch s·M/S + k left the pipeline into slot (k + S - 1) mod M/S of stage s: rotate the slots back.
        return jnp.roll(stream, -((stages - 1) % per_stage), axis=0)[None]

    along_stages, everywhere = PartitionSpec(STAGE_AXIS), PartitionSpec()
    stream = jax.shard_map(local, in_specs=(along_stages, along_stages, everywhere), out_specs=along_stages,
                           axis_names={STAGE_AXIS})(params, stream, extras)
    return from_stages(stream)
