"""The device mesh, the rule sets that map logical axis names onto it, and sharded state.

The mesh has three axes, `stage` x `data` x `model` (stage outermost, model
innermost). A rule set is an ordered table of `(logical_name, mesh_axis_or_None)`;
the first row naming a logical axis wins. Changing the rule set changes the
parallelism; model code never mentions `stage`, `data` or `model`.

| rule set      | params over          | optimizer state over | batch over   | residual stream over |
|---------------|----------------------|----------------------|--------------|----------------------|
| `megatron`    | stage x model        | stage x model        | stage x data | (replicated)         |
| `megatron_sp` | stage x model        | stage x model        | stage x data | model, by sequence   |
| `zero3`       | stage x data x model | stage x data x model | stage x data | (replicated)         |
| `zero1`       | stage x model        | stage x data x model | stage x data | (replicated)         |
| `dp`          | (replicated)         | (replicated)         | data x model | (replicated)         |

`stage` is the pipeline axis: a stacked parameter's `layers` dimension is split
over it (each stage holds a contiguous block of layers) and `gptj.core.pipeline`
runs microbatches through the stages. Its size is 1 unless asked for, and an
axis of size 1 is left out of every PartitionSpec, so a run without a pipeline
lays everything out, and names it, exactly as a 2D `data` x `model` mesh would.
`dp` has no use for it (it splits no parameter), so a stage axis under `dp` is
an error.

Every logical name used by a parameter must appear in the table (mapping to
None is fine); a name no row resolves is an error naming the parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptj.core.streaming import LazyArray, finish_reading
from gptj.errors import PartitioningError

STAGE_AXIS = "stage"
MESH_AXES = (STAGE_AXIS, "data", "model")

Rules = tuple[tuple[str, Any], ...]

# Activations: batch over data (and over the pipeline's stages outside the
# pipelined layers: embedding, head and loss), tensor-parallel dims over model,
# the residual stream replicated over model (Megatron's layout). `layers`, the
# leading axis of the stacked block parameters, is split over the stages;
# `act_stage` is the stage dimension of the pipeline's own buffers.
_TENSOR_PARALLEL_ACTIVATIONS: Rules = (
    ("act_batch", (STAGE_AXIS, "data")),
    ("act_length", None),
    ("act_residual_length", None),
    ("act_kv_length", None),
    ("act_embed", None),
    ("act_heads", "model"),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
    ("head_dim", None),
    ("layers", STAGE_AXIS),
    ("act_stage", STAGE_AXIS),
    ("lora_rank", None),  # LoRA adapters' rank: small, never split
)

# Megatron's sequence parallelism: between the tensor-parallel regions (attention
# and MLP), the residual stream, its LayerNorms and what is saved of them for the
# backward pass are split over model along the sequence instead of replicated.
# Entering a region all-gathers the sequence; leaving it reduce-scatters, where
# megatron all-reduces: the same bytes on the wire, 1/model of the activations.
_SEQUENCE_PARALLEL_ACTIVATIONS: Rules = (("act_residual_length", "model"),) + _TENSOR_PARALLEL_ACTIVATIONS

_MEGATRON_PARAMS: Rules = (
    ("vocab", "model"),
    ("embed", None),
    ("heads", "model"),
    ("mlp", "model"),
)

# ZeRO-3 / 2D FSDP: the megatron split plus each weight's embed dimension over data.
_ZERO3_PARAMS: Rules = (
    ("vocab", "model"),
    ("embed", "data"),
    ("heads", "model"),
    ("mlp", "model"),
)

_DATA_PARALLEL: Rules = (
    ("act_batch", ("data", "model")),
    ("act_length", None),
    ("act_residual_length", None),
    ("act_kv_length", None),
    ("act_embed", None),
    ("act_heads", None),
    ("act_mlp", None),
    ("act_vocab", None),
    ("head_dim", None),
    ("layers", None),
    ("act_stage", None),
    ("lora_rank", None),
    ("vocab", None),
    ("embed", None),
    ("heads", None),
    ("mlp", None),
)


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """A named mapping from logical axis names to mesh axes.

    `rules` covers parameters and activations; `opt_state_rules`, when set,
    replaces it for the optimizer state (ZeRO-1 shards only the optimizer).
    """

    name: str
    description: str
    rules: Rules
    opt_state_rules: Rules | None = None

    @property
    def optimizer_rules(self) -> Rules:
        return self.opt_state_rules or self.rules

    @property
    def pipelines(self) -> bool:
        """Whether the rule set splits the stacked layers over the `stage` axis (so a pipeline can use it)."""
        return dict(reversed(self.rules)).get("layers") == STAGE_AXIS


RULE_SETS: dict[str, RuleSet] = {
    "megatron": RuleSet("megatron", "tensor parallel over model, data parallel over data",
                        _MEGATRON_PARAMS + _TENSOR_PARALLEL_ACTIVATIONS),
    "megatron_sp": RuleSet("megatron_sp", "megatron with the residual stream split over model by sequence",
                           _MEGATRON_PARAMS + _SEQUENCE_PARALLEL_ACTIVATIONS),
    "zero3": RuleSet("zero3", "megatron plus params and optimizer state split over data (2D FSDP)",
                     _ZERO3_PARAMS + _TENSOR_PARALLEL_ACTIVATIONS),
    "zero1": RuleSet("zero1", "megatron params; optimizer state also split over data",
                     _MEGATRON_PARAMS + _TENSOR_PARALLEL_ACTIVATIONS,
                     opt_state_rules=_ZERO3_PARAMS + _TENSOR_PARALLEL_ACTIVATIONS),
    "dp": RuleSet("dp", "pure data parallel over both mesh axes; everything replicated", _DATA_PARALLEL),
}


def get_rule_set(name: str | RuleSet) -> RuleSet:
    """Looks up a rule set by name (`megatron`, `megatron_sp`, `zero3`, `zero1`, `dp`)."""
    if isinstance(name, RuleSet):
        return name
    if name not in RULE_SETS:
        raise PartitioningError(f"unknown rule set {name!r}; choose one of {sorted(RULE_SETS)}")
    return RULE_SETS[name]


def resolve_mesh_shape(data: int, model: int, num_devices: int, stage: int = 1) -> tuple[int, int]:
    """Resolves a (data, model) request where one entry may be -1 ("the rest of the devices").

    `stage` devices (the pipeline axis, always given) take their share first:
    data x model must use num_devices / stage.
    """
    if stage < 1:
        raise PartitioningError(f"mesh: stage must be a positive size, got {stage}")
    if data == -1 and model == -1:
        raise PartitioningError("mesh: only one of data and model may be -1")
    for name, size in (("data", data), ("model", model)):
        if size == 0 or size < -1:
            raise PartitioningError(f"mesh: {name} must be a positive size or -1, got {size}")
    staged = f"stage={stage} x " if stage > 1 else ""
    known = stage * (data if data != -1 else 1) * (model if model != -1 else 1)
    if num_devices % known:
        raise PartitioningError(f"mesh: {staged}data={data} x model={model} does not divide the {num_devices} "
                                "available devices")
    if data == -1:
        data = num_devices // known
    if model == -1:
        model = num_devices // known
    if stage * data * model != num_devices:
        raise PartitioningError(
            f"mesh: {staged}data={data} x model={model} = {stage * data * model} devices, but {num_devices} are "
            "available; use -1 for one axis to take the rest")
    return data, model


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None, stage: int = 1) -> Mesh:
    """A (`stage`, `data`, `model`) mesh over all (or the given) devices, across every host.

    The model axis is the fast-varying one, so a model-parallel group sits on
    neighbouring devices of one host whenever model <= local device count; the
    stage axis is the slowest, so on several TPU slices the stages are split
    over the slices first: a pipeline sends only one microbatch's activations
    from stage to stage, which suits the data-centre network between slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, model = resolve_mesh_shape(data, model, len(devices), stage)
    shape = (stage, data, model)
    if devices[0].platform in ("tpu", "gpu", "cuda", "rocm") and len(devices) == jax.device_count():
        grid = _accelerator_grid(shape, devices)
    else:
        grid = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _accelerator_grid(shape: tuple[int, int, int], devices: list) -> np.ndarray:
    """Devices arranged as `shape` by the physical topology (`mesh_utils`), slices outermost when several.

    Several TPU slices (devices with distinct `slice_index`) are joined by the
    data-centre network: they divide the stage axis (else the data axis) and
    each slice holds the rest of the mesh on its own interconnect.
    """
    from jax.experimental import mesh_utils

    slices = len({getattr(d, "slice_index", 0) for d in devices})
    dcn = None
    if slices > 1:
        stage, data, _ = shape
        if stage % slices == 0:
            dcn = (slices, 1, 1)
        elif data % slices == 0:
            dcn = (1, slices, 1)
        else:
            raise PartitioningError(f"mesh: {slices} TPU slices divide neither stage={stage} nor data={data}; the "
                                    "axes that cross slices must be a multiple of the slice count")
    try:
        if dcn is not None:
            ici = tuple(n // k for n, k in zip(shape, dcn))
            return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(devices).reshape(shape)


# Mesh axes a spec leaves out where the mesh lacks them or has them at size 1.
_OPTIONAL_AXES = (STAGE_AXIS,)


def _axis_names(mesh_axes) -> tuple[str, ...]:
    """A rule's mesh axes (None, a name, or a tuple of names) as a tuple of names."""
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _axes_value(names: tuple[str, ...]):
    """The PartitionSpec entry for a tuple of mesh axis names: None, one name, or the tuple."""
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


class Partitioner:
    """Owns the mesh and the rule set; turns logical axes into shardings and jits under them.

    Usage:
        partitioner = Partitioner(make_mesh(data=2, model=4), "megatron")
        abstract, specs, shardings = partitioner.abstract_state(init_fn, rng)
        state = partitioner.jit(init_fn, out_shardings=shardings)(rng)
    """

    def __init__(self, mesh: Mesh, rule_set: str | RuleSet = "megatron", compiler_options: dict | None = None):
        """`compiler_options`: XLA options (DebugOptions fields, as in XLA_FLAGS without the dashes) for every
        program `jit` builds, over what XLA_FLAGS sets: e.g. {"xla_backend_optimization_level": 1}."""
        self.mesh = mesh
        self.rule_set = get_rule_set(rule_set)
        self.compiler_options = dict(compiler_options) if compiler_options else None
        if self.stages > 1 and not self.rule_set.pipelines:
            raise PartitioningError(
                f"mesh: rule set {self.rule_set.name!r} splits no layers over the stage axis, so it cannot use "
                f"stage={self.stages}; pipeline with megatron, megatron_sp, zero3 or zero1, or set mesh.stage=1")
        # The rules as this mesh resolves them: what traced code's logical constraints see.
        self.rules: Rules = tuple((name, self._present(axes)) for name, axes in self.rule_set.rules)

    @classmethod
    def from_config(cls, mesh_config, fold_stages: bool = False) -> "Partitioner":
        """The mesh and rule set a run's `mesh` settings name (stage, data, model, rules), over every device.

        `fold_stages`: the stage devices join the data axis instead (inference, which has no pipeline).
        """
        stage, data = mesh_config.stage, mesh_config.data
        if fold_stages and stage > 1:
            stage, data = 1, (data * stage if data != -1 else -1)
        return cls(make_mesh(data, mesh_config.model, stage=stage), mesh_config.rules)

    @property
    def stages(self) -> int:
        """The size of the mesh's pipeline axis (1: no pipeline)."""
        return self.axis_size(STAGE_AXIS)

    @property
    def platform(self) -> str:
        """The backend of the mesh's devices as jax.default_backend() names it ('cpu', 'gpu', 'tpu'): what the
        programs are built for, which differs from this process's backend when a plan compiles for a target."""
        platform = self.mesh.devices.flat[0].platform
        return "gpu" if platform in ("cuda", "rocm") else platform

    def axis_size(self, mesh_axes) -> int:
        """Devices over which `mesh_axes` (a mesh axis name, a tuple of them, or None) split a dimension."""
        return math.prod(self.mesh.shape.get(a, 1) for a in _axis_names(mesh_axes))

    def _present(self, mesh_axes):
        """`mesh_axes` without the optional axes this mesh lacks or has at size 1 (see the module docstring)."""
        names = tuple(a for a in _axis_names(mesh_axes)
                      if a in self.mesh.shape and not (a in _OPTIONAL_AXES and self.mesh.shape[a] == 1))
        return _axes_value(names)

    # -- logical names -> shardings ------------------------------------------------

    def mesh_spec(self, logical: PartitionSpec | Sequence[str | None], rules: Rules | None = None, *, where: str = "",
                  shape: Sequence[int] | None = None) -> PartitionSpec:
        """Resolves one logical spec to a mesh PartitionSpec, checking names and divisibility.

        A mesh axis shards at most one dimension: the first that names it; a
        later dimension naming it (alone or in a tuple) goes without it.
        """
        table = dict(reversed(rules or self.rules))  # reversed: the first row of a name wins
        used: set[str] = set()
        resolved = []
        for dim, name in enumerate(logical):
            if name is None:
                resolved.append(None)
                continue
            if name not in table:
                raise PartitioningError(
                    f"{where or 'array'}: logical axis {name!r} is not resolved by rule set "
                    f"{self.rule_set.name!r} (known axes: {sorted(table)})")
            axis = self._present(tuple(a for a in _axis_names(table[name]) if a not in used))
            if shape is not None and axis is not None and shape[dim] % self.axis_size(axis):
                raise PartitioningError(
                    f"{where or 'array'}: dimension {dim} ({name}={shape[dim]}) is not divisible by mesh axis "
                    f"{axis!r} of size {self.axis_size(axis)} under rule set {self.rule_set.name!r}")
            used |= set(_axis_names(axis))
            resolved.append(axis)
        return PartitionSpec(*resolved)

    def shardings_for(self, logical_specs, abstract=None, *, optimizer_subtree: str | None = "opt_state"):
        """NamedShardings for a tree of logical PartitionSpecs.

        Leaves under a key named `optimizer_subtree` use the rule set's optimizer
        rules (which differ for zero1). `abstract`, a tree of arrays or
        ShapeDtypeStructs of the same structure, enables divisibility checks.
        """
        def one(path, spec, leaf=None):
            keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
            rules = self.rule_set.optimizer_rules if optimizer_subtree in keys else self.rules
            spec = self.mesh_spec(spec, rules, where=_path_str(path), shape=None if leaf is None else leaf.shape)
            return NamedSharding(self.mesh, spec)

        if abstract is None:
            return jax.tree_util.tree_map_with_path(one, logical_specs, is_leaf=_is_spec)
        return jax.tree_util.tree_map_with_path(one, logical_specs, abstract, is_leaf=_is_spec)

    def abstract_state(self, init_fn: Callable[..., Any], *args, optimizer_subtree: str | None = "opt_state"):
        """Abstract state, logical specs and mesh shardings of whatever `init_fn(*args)` builds.

        `init_fn` returns a pytree whose parameters are boxed with logical axis
        names (flax's `nn.Partitioned`, as `with_logical_partitioning` creates).
        Nothing is allocated: the shapes come from `jax.eval_shape`.
        Returns `(abstract, logical_specs, shardings)`, the first unboxed.
        """
        boxed = jax.eval_shape(init_fn, *args)
        logical_specs = nn.get_partition_spec(boxed)
        abstract = nn.meta.unbox(boxed)
        shardings = self.shardings_for(logical_specs, abstract, optimizer_subtree=optimizer_subtree)
        return abstract, logical_specs, shardings

    def sharding(self, logical: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        """The NamedSharding of one array with the given logical axes (e.g. a batch)."""
        return NamedSharding(self.mesh, self.mesh_spec(logical, shape=shape))

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """Sharding of an input batch [batch, ...]: batch split as the rule set splits activations."""
        return self.sharding(("act_batch",) + (None,) * (ndim - 1))

    @property
    def data_parallel_size(self) -> int:
        """How many ways the rule set splits the batch."""
        return self.axis_size(dict(reversed(self.rules)).get("act_batch"))

    # -- running under the mesh -----------------------------------------------------

    @contextlib.contextmanager
    def activate(self):
        """Mesh and logical-axis rules active, so `with_logical_constraint` resolves inside traced code."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def jit(self, fn: Callable, *, in_shardings=None, out_shardings=None, static_argnums=(), donate_argnums=()):
        """jax.jit of `fn` with the given shardings, traced and run under this mesh and rule set."""
        @functools.wraps(fn)  # profiles, compile logs and HLO dumps name the program after `fn`
        def traced(*args, **kwargs):
            with nn.logical_axis_rules(self.rules):
                return fn(*args, **kwargs)

        kwargs = dict(static_argnums=static_argnums, donate_argnums=donate_argnums,
                      compiler_options=self.compiler_options)
        if in_shardings is not None:
            kwargs["in_shardings"] = in_shardings
        if out_shardings is not None:
            kwargs["out_shardings"] = out_shardings
        jitted = jax.jit(traced, **kwargs)
        partitioner = self

        class _Partitioned:
            """The jitted callable; `.lower(...)` is exposed for ahead-of-time compilation."""

            def __call__(self, *args, **kw):
                with partitioner.activate():
                    return jitted(*args, **kw)

            def lower(self, *args, **kw):
                with partitioner.activate():
                    return jitted.lower(*args, **kw)

        return _Partitioned()


def place(tree, shardings, dtype=None):
    """Lays a tree of arrays out on the mesh: each leaf onto the matching sharding, cast to `dtype` if given.

    Host leaves (numpy, or LazyArrays read from disk: `gptj.core.streaming`) are
    read box by box: each process reads only the boxes its own devices hold,
    each distinct box once, cast to `dtype` as it is read (numpy leaves must be
    held in full by every process). A leaf whose per-device shards are large
    is filled in place a slab of rows at a time (a layer of a stacked leaf),
    so that the host holds about one layer of this process's shards at once,
    never a whole leaf. The LazyArrays' sources are then checked
    (`streaming.finish_reading`: a collective where they are checked). Leaves
    that are already jax arrays are moved device to device (never through the
    host). `tree` and `shardings` may also be a single array and sharding.
    `dtype` applies to floating-point leaves: integer leaves (token ids, the
    values of quantized weights) keep their own.
    """
    def one(x, sharding):
        if isinstance(x, jax.Array):
            x = x.astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x
            return x if x.sharding == sharding else jax.device_put(x, sharding)
        x = LazyArray.of(x)
        return _place_lazy(x.astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x,
                           sharding)

    error = None
    try:
        placed = jax.tree_util.tree_map(one, tree, shardings)
    except Exception as e:  # noqa: BLE001 - a checked source shares it with the other processes first
        error = e
    finish_reading(tree, error)
    return placed


# Per-device shards larger than this are placed a slab of rows (leading-axis slices) at a time, each slab
# at most this large or one row (one layer of a stacked leaf).
_SLAB_BYTES = 16 << 20


def _place_lazy(x: LazyArray, sharding) -> jax.Array:
    """A LazyArray laid out by `sharding`, read box by box (see `place`).

    A large one whose leading axis the layout does not split (every shard
    holds all its rows) is filled in place a slab of rows at a time: the host
    holds one slab of this process's shards, not the leaf.
    """
    shard_bytes = math.prod(sharding.shard_shape(x.shape)) * x.dtype.itemsize
    if shard_bytes <= _SLAB_BYTES or x.ndim == 0 or sharding.shard_shape(x.shape)[0] != x.shape[0]:
        return _from_boxes(x, sharding).block_until_ready()
    rows = max(1, _SLAB_BYTES // (shard_bytes // x.shape[0]))
    out = _zeros(sharding, x.shape, x.dtype)()
    set_rows = _rows_setter(sharding)
    for start in range(0, x.shape[0], rows):
        # Each slab lands before the next is read: asynchronous dispatch would otherwise keep them all in flight.
        out = set_rows(out, _from_boxes(x.rows(start, min(start + rows, x.shape[0])), sharding), start)
        out.block_until_ready()
    return out


@functools.lru_cache(maxsize=None)
def _zeros(sharding, shape: tuple[int, ...], dtype):
    """A compiled function that allocates zeros of `shape` laid out by `sharding` (filled in place by slabs)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _rows_setter(sharding):
    """A compiled function (whole, slab, start) -> whole with rows start.. replaced by slab, in place (donated)."""
    return jax.jit(lambda whole, slab, start: jax.lax.dynamic_update_slice_in_dim(whole, slab, start, axis=0),
                   donate_argnums=0, out_shardings=sharding)


def _from_boxes(x: LazyArray, sharding) -> jax.Array:
    """A LazyArray laid out by `sharding`: each distinct box this process's devices hold is read once.

    A box counts for its source's checks (`primary`) in the process of the
    first device, over all processes, that holds it: each element is counted
    exactly once however the layout replicates it.
    """
    def key(index) -> tuple[tuple[int, int], ...]:
        return tuple(s.indices(n)[:2] for s, n in zip(index, x.shape))

    first_holder: dict[Any, Any] = {}
    for device, index in sharding.devices_indices_map(x.shape).items():
        first_holder.setdefault(key(index), device)
    blocks: dict[Any, np.ndarray] = {}
    shards = []
    for device, index in sharding.addressable_devices_indices_map(x.shape).items():
        k = key(index)
        if k not in blocks:
            box = tuple(slice(start, stop) for start, stop in k)
            blocks[k] = x.read(box, primary=first_holder[k].process_index == jax.process_index())
        shards.append(jax.device_put(blocks[k], device))
    return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)


def without_axis(rules: Rules, axis: str) -> Rules:
    """`rules` with `axis` taken out of every row (inside a pipeline stage, whose own dimension holds `stage`)."""
    return tuple((name, _axes_value(tuple(a for a in _axis_names(axes) if a != axis))) for name, axes in rules)


def logical_spec(logical: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """The PartitionSpec of logical axis names under `rules` (first row of a name wins; None stays None).

    No checks and no conflict resolution: for arrays whose names map to distinct mesh axes.
    """
    table = dict(reversed(rules))
    return PartitionSpec(*(None if name is None else table.get(name) for name in logical))


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds for a tree of arrays laid out by `shardings` (int4: two values to a byte)."""
    total = 0
    for leaf, sharding in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)):
        shard_shape = sharding.shard_shape(leaf.shape)
        dtype = np.dtype(leaf.dtype)
        bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else 8 * dtype.itemsize
        total += -(-int(np.prod(shard_shape, dtype=np.int64)) * bits // 8)
    return total
