"""A generic trainer: sharded state from its abstract shape, jitted steps, and the training loop.

The Trainer knows nothing of GPT-J. It is given a Flax module, a loss
function over the module's outputs, an optax optimizer, a `Partitioner` and
the shape of a batch, and it

- derives the train state's shardings from `jax.eval_shape` of the init (the
  parameters carry logical axis names; the optimizer state inherits them), then
  runs the init jitted with those `out_shardings`, so no host ever holds an
  unsharded model;
- jits the train step (gradient accumulation over microbatches with
  `lax.scan`, the optimizer update, a non-finite guard) and the eval step with
  explicit in/out shardings, donating the old state;
- on a mesh with a pipeline axis (`Partitioner.stages` > 1), leaves the
  microbatches to the module: it is given the whole batch and must run it
  through its stages as `microbatches` microbatches (`gptj.core.pipeline`),
  so the gradient is taken once per step, over the whole pipeline;
- compiles the train step ahead of time and logs per-device memory (params,
  optimizer state, XLA temporaries) before step 1;
- runs the loop, calling hooks (checkpointing, validation, metrics,
  profiling; see `gptj.core.hooks`) and stopping cleanly on SIGTERM/SIGINT.

The state is a dict `{"step": int32[], "params": ..., "opt_state": ...}`:
fp32 master weights and optimizer state whatever the module computes in.

Freezing: given `trainable` (a regular expression over parameter paths such
as `blocks/mlp/fc_in_kernel`, or a predicate over them), the state's
`params` hold only the matching parameters, so the optimizer state,
gradients, weight decay and checkpoints cover only them. The rest are frozen:
a separate tree (`frozen_shardings`, optionally stored in `frozen_dtype`,
e.g. bfloat16 with no fp32 master copy) that the caller provides once with
`set_frozen`; every step reads it, never donates or changes it, and the
module sees the union of the two trees.

A reference model: given `reference_model`, the loss compares the trained
model with a frozen one on the same batch (preference tuning's reference
policy, distillation's teacher): every step also runs the reference, in
evaluation mode and without gradient, and the loss sees both outputs as
`WithReference(outputs, reference)`. The reference runs on the frozen
parameters joined to its own: those of its parameters that the Trainer does
not freeze (`abstract_reference`), given once with `set_reference` and kept,
like the frozen ones, in `reference_dtype`, never donated or changed. A
reference that is the trained model without its trained parts (a LoRA model
without its adapters, over the frozen base) thus needs no parameters of its
own: no second copy of the weights; one that differs in what trains (a full
fine-tune's starting point) holds a copy of just that.

`gptj.core.driver.train_in_workdir` runs a Trainer in a workdir (resume, hooks,
preemption); `gptj.train` binds GPT-J to both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from gptj.core.param_tree import merge_params, param_paths, path_matcher, select_params
from gptj.core.partitioning import Partitioner, per_device_bytes, place
from gptj.errors import NonFiniteLossError, TrainableError

# (module outputs, batch) -> dict of sums; must contain "loss_sum" (minimised) and "weight".
LossFn = Callable[[Any, Mapping[str, jax.Array]], dict]

ON_NONFINITE = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of the compiled train step (what one device must hold)."""

    params: int  # the trained parameters (all of them unless some are frozen)
    opt_state: int
    temporaries: int | None
    arguments: int | None
    outputs: int | None
    aliased: int | None  # output bytes written in place of donated arguments
    code: int | None
    frozen: int = 0  # frozen parameters (an argument of every step, never updated)
    reference: int = 0  # the reference model's own parameters (beyond the frozen ones; never updated)

    @property
    def peak(self) -> int | None:
        """What one device holds at the step's high point: arguments, outputs not written in place, temporaries."""
        if None in (self.arguments, self.outputs, self.aliased, self.temporaries):
            return None
        return self.arguments + self.outputs - self.aliased + self.temporaries

    def __str__(self) -> str:
        def gib(n):
            if n is None:
                return "n/a"
            return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.3f} MiB"

        frozen = f"frozen params {gib(self.frozen)}, trainable " if self.frozen else ""
        frozen = f"reference params {gib(self.reference)}, {frozen}" if self.reference else frozen
        return (f"per-device memory of the train step: {frozen}params {gib(self.params)}, optimizer state "
                f"{gib(self.opt_state)}, temporaries {gib(self.temporaries)}, peak {gib(self.peak)} (arguments "
                f"{gib(self.arguments)}, outputs {gib(self.outputs)}, code {gib(self.code)})")


class WithReference(NamedTuple):
    """What the loss of a Trainer with a reference model is given as its outputs: both models' on the batch."""

    outputs: Any    # the trained model's
    reference: Any  # the frozen reference's (no gradient flows into them)


class Hook:
    """Something the training loop runs; see gptj.core.hooks for checkpoint/eval/metrics/profile hooks.

    `on_step` is called after every step with device-side metrics; it must not
    block on them unless `needs_sync(step)` said so (the loop then made sure
    the step's loss is finite before calling it).
    """

    def on_start(self, step: int, state) -> None:
        """Before the first step of this run (step is where training resumes)."""

    def needs_sync(self, step: int) -> bool:
        """True if `on_step(step, ...)` persists state, so a non-finite step must be caught first."""
        return False

    def on_step(self, step: int, state, metrics: Mapping[str, jax.Array]) -> None:
        """After step `step` (1-based count of updates) has been dispatched."""

    def on_end(self, step: int, state, status: str) -> None:
        """When the loop ends with `status` 'completed' or 'preempted' (not after an error)."""


class _StopRequest:
    """SIGTERM/SIGINT set a flag the loop polls between steps; a second signal gets the old behaviour."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = {}

    def _handle(self, signum, frame):
        logging.warning("received %s: finishing the current step, then saving and exiting "
                        "(send it again to abort)", signal.Signals(signum).name)
        self._flag.set()
        self._restore()

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            self._restore()

    def requested(self) -> bool:
        """Whether any process was asked to stop (all processes agree, so they stop at the same step)."""
        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def _tree_add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _with_shardings(abstract, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _nothing_to_give(abstract, whose: str, setter: str) -> dict:
    """{} for parameter values the steps read when `abstract` holds none; else a TrainableError naming them
    ("{whose} a, b") and the `setter` that gives them."""
    if abstract:
        raise TrainableError(f"{whose} {', '.join(param_paths(abstract))}: give their values with {setter}() "
                             "before training or evaluating")
    return {}


def _placed(values, abstract, what: str):
    """`values` laid out and cast as `abstract` (ShapeDtypeStructs with shardings) says; a TrainableError
    ("{what}: missing ..., unexpected ...") when they are not the same parameters."""
    expected, given = param_paths(abstract), param_paths(values)
    if expected != given:
        missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        raise TrainableError(f"{what}: missing {missing}, unexpected {unexpected}")
    return jax.tree_util.tree_map(lambda x, a: place(x, a.sharding, a.dtype), values, abstract)


class Trainer:
    """Trains a Flax module's parameters; see the module docstring.

    The model contract: the module is called with the batch entries
    `model_inputs` names, in that order, as positional arguments:
    `model.apply({'params': p}, *[batch[k] for k in model_inputs])`. A model
    that draws randomness (dropout) names its RNG streams in `rng_streams`;
    it is then also given `deterministic=False` and `rngs={stream: key}` when
    training (keys derived from `seed`, the step and the microbatch, so a
    resumed run draws the same masks) and `deterministic=True` when evaluating.

    Args:
      model: a Flax module (see the contract above).
      loss_fn: `(outputs, batch) -> dict of sums` with `loss_sum` and `weight`;
        the gradient is d(sum of loss_sum)/dp divided by the sum of weights.
      optimizer: an optax transformation (initialised on flax-boxed params, so
        masks must accept boxed trees).
      partitioner: mesh and rule set.
      batch_spec: global shape/dtype of one batch, e.g. {'inputs': ShapeDtypeStruct((B, L), int32), ...}.
      microbatches: gradient accumulation steps per update; B must divide by it. On a mesh with
        stages, the module's pipeline microbatches instead (it must be built for this many).
      summarize: sums -> metrics dict (default: loss = loss_sum / weight).
      lr_schedule: step -> learning rate, reported as the `lr` metric.
      on_nonfinite: 'stop' (raise NonFiniteLossError) or 'skip' (drop the update, keep going).
      model_inputs: the batch entries the module is called on, in order.
      rng_streams: the module's RNG stream names (e.g. ('dropout',)); empty for a deterministic model.
      seed: the root of the training RNG streams.
      eval_loss_fn: the loss for `evaluate` (default: loss_fn), e.g. one that also counts accuracy.
      trainable: which parameters train: a regular expression that must match a parameter's whole
        path ("blocks/mlp/.*|ln_f/.*"), or a predicate over paths; None trains all. The others are
        frozen (see the module docstring); a pattern that matches nothing is a TrainableError.
      frozen_dtype: the dtype frozen parameters are kept in (None: the module's parameter dtype).
      reference_model: a frozen module run on each batch beside `model` (called as `model` is when
        evaluating); the loss is then given `WithReference(outputs, reference_outputs)`. Its parameters
        are the frozen ones plus its own (see the module docstring and `set_reference`).
      reference_dtype: the dtype the reference's own parameters are kept in (None: as it declares them).
      microbatch_grad_dtype: with several microbatches, the dtype each one's gradient is taken in for the
        parameters `microbatch_grad_params` names (a regular expression over paths, or a predicate), before
        it is added to the fp32 sum. A module that casts those weights to a narrower compute dtype before
        every use gets the same gradient values in fewer bytes (see `_grads_and_sums`). None: off.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                 partitioner: Partitioner, batch_spec: Mapping[str, jax.ShapeDtypeStruct], *,
                 microbatches: int = 1, summarize: Callable[[dict], dict] | None = None,
                 lr_schedule: Callable[[jax.Array], jax.Array] | None = None, on_nonfinite: str = "stop",
                 model_inputs: Sequence[str] = ("inputs",), rng_streams: Sequence[str] = (), seed: int = 0,
                 eval_loss_fn: LossFn | None = None, trainable: str | Callable[[str], bool] | None = None,
                 frozen_dtype: Any = None, microbatch_grad_dtype: Any = None,
                 microbatch_grad_params: str | Callable[[str], bool] | None = None,
                 reference_model: nn.Module | None = None, reference_dtype: Any = None):
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        batch_size = next(iter(batch_spec.values())).shape[0]
        if microbatches < 1 or batch_size % microbatches:
            raise ValueError(f"batch size {batch_size} is not divisible by microbatches={microbatches}")
        self.model = model
        self.loss_fn = loss_fn
        self.eval_loss_fn = eval_loss_fn or loss_fn
        self.optimizer = optimizer
        self.partitioner = partitioner
        self.batch_spec = dict(batch_spec)
        self.microbatches = microbatches
        self.summarize = summarize or (lambda s: {"loss": s["loss_sum"] / jnp.maximum(s["weight"], 1.0)})
        self.lr_schedule = lr_schedule
        self.on_nonfinite = on_nonfinite
        missing = [k for k in model_inputs if k not in batch_spec]
        if missing:
            raise ValueError(f"model_inputs {missing} are not in the batch (it has {sorted(batch_spec)})")
        self.model_inputs = tuple(model_inputs)
        self.rng_streams = tuple(rng_streams)
        self.seed = int(seed)
        self.batch_shardings = {k: partitioner.batch_sharding(v.ndim) for k, v in self.batch_spec.items()}
        self.trainable = trainable
        self._is_trainable = path_matcher(trainable)
        self.frozen_dtype = frozen_dtype
        self.microbatch_grad_dtype = microbatch_grad_dtype
        self._narrow_grads = path_matcher(microbatch_grad_params)
        self._frozen = None
        self.reference_model = reference_model
        self.reference_dtype = reference_dtype
        self._reference = None
        self._compiled_train = None
        self._jitted_eval = None

    # -- state -----------------------------------------------------------------------

    def _dummy_inputs(self):
        """One-row model inputs of the batch's shape, to initialise a module on."""
        return [jnp.zeros((1,) + tuple(self.batch_spec[k].shape[1:]), self.batch_spec[k].dtype)
                for k in self.model_inputs]

    def _boxed_init(self, rng):
        """(train state, frozen params), flax-boxed (logical axes), as eval_shape and the jitted init see them."""
        rngs = {"params": rng} | {name: rng for name in self.rng_streams}
        params, frozen = select_params(self.model.init(rngs, *self._dummy_inputs())["params"], self._is_trainable)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.optimizer.init(params)}
        return state, frozen

    @functools.cached_property
    def _abstract(self):
        (abstract, frozen), _, (shardings, frozen_shardings) = self.partitioner.abstract_state(
            self._boxed_init, jax.random.PRNGKey(0))
        if not abstract["params"]:
            raise TrainableError(f"trainable={self.trainable!r} matches no parameter; the parameters are: "
                                 + ", ".join(param_paths(frozen)))
        if self.frozen_dtype is not None:
            frozen = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, self.frozen_dtype), frozen)
        return abstract, shardings, frozen, frozen_shardings

    @property
    def state_shardings(self):
        """NamedShardings of the train state (params under the rule set, opt_state under its optimizer rules)."""
        return self._abstract[1]

    @property
    def abstract_state(self):
        """The train state as ShapeDtypeStructs carrying their shardings (restore and AOT targets)."""
        abstract, shardings = self._abstract[:2]
        return _with_shardings(abstract, shardings)

    @property
    def frozen_shardings(self):
        """NamedShardings of the frozen parameters (the rule set's, as if they trained); {} when none are frozen."""
        return self._abstract[3]

    @property
    def abstract_frozen(self):
        """The frozen parameters as ShapeDtypeStructs (in `frozen_dtype`) carrying their shardings."""
        return _with_shardings(self._abstract[2], self._abstract[3])

    @property
    def freezes(self) -> bool:
        """Whether any parameter is frozen."""
        return bool(self._abstract[2])

    @property
    def frozen(self):
        """The frozen parameters the steps read (set with `set_frozen`)."""
        if self._frozen is None:
            self._frozen = _nothing_to_give(self._abstract[2], "this Trainer freezes", "set_frozen")
        return self._frozen

    def set_frozen(self, frozen) -> None:
        """Gives the frozen parameters' values (a tree matching `abstract_frozen`), laid out and cast as it says."""
        self._frozen = _placed(frozen, self.abstract_frozen, "frozen parameters do not fit the model")

    @functools.cached_property
    def _abstract_reference(self):
        """(abstract, shardings) of the reference's own parameters: its parameters less the frozen ones."""
        if self.reference_model is None:
            return {}, {}
        abstract, _, shardings = self.partitioner.abstract_state(
            lambda rng: self.reference_model.init(rng, *self._dummy_inputs())["params"], jax.random.PRNGKey(0),
            optimizer_subtree=None)
        frozen = dict(zip(param_paths(self._abstract[2]), jax.tree_util.tree_leaves(self._abstract[2])))
        for path, leaf in zip(param_paths(abstract), jax.tree_util.tree_leaves(abstract)):
            if path in frozen and frozen[path].shape != leaf.shape:
                raise TrainableError(f"the reference model's {path} has shape {leaf.shape}, the frozen "
                                     f"parameter {frozen[path].shape}")
        is_own = lambda path: path not in frozen  # noqa: E731
        own, own_shardings = select_params(abstract, is_own)[0], select_params(shardings, is_own)[0]
        if self.reference_dtype is not None:
            own = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, self.reference_dtype), own)
        return own, own_shardings

    @property
    def reference_shardings(self):
        """NamedShardings of the reference's own parameters; {} when it has none (or there is no reference)."""
        return self._abstract_reference[1]

    @property
    def abstract_reference(self):
        """The reference's own parameters (those not frozen) as ShapeDtypeStructs carrying their shardings."""
        return _with_shardings(*self._abstract_reference)

    @property
    def reference(self):
        """The reference's own parameters the steps read (set with `set_reference`)."""
        if self._reference is None:
            self._reference = _nothing_to_give(self._abstract_reference[0],
                                               "this Trainer's reference model has its own parameters", "set_reference")
        return self._reference

    def set_reference(self, reference) -> None:
        """Gives the reference's own parameters (a tree matching `abstract_reference`), laid out and cast as it says."""
        self._reference = _placed(reference, self.abstract_reference,
                                  "reference parameters do not fit the reference model")

    @property
    def abstract_batch(self):
        """The batch as ShapeDtypeStructs carrying their shardings."""
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k])
                for k, v in self.batch_spec.items()}

    def init_state(self, seed: int):
        """A freshly initialised train state, created already sharded (frozen parameters are not made)."""
        init = self.partitioner.jit(lambda rng: nn.meta.unbox(self._boxed_init(rng)[0]),
                                    out_shardings=self.state_shardings)
        return init(jax.random.PRNGKey(seed))

    def init_params(self, seed: int):
        """Freshly initialised trainable parameters (as `init_state` makes them), without optimizer state."""
        init = self.partitioner.jit(lambda rng: nn.meta.unbox(self._boxed_init(rng)[0]["params"]),
                                    out_shardings=self.state_shardings["params"])
        return init(jax.random.PRNGKey(seed))

    def state_from_params(self, params, step: int = 0):
        """A train state around existing (sharded) params with a fresh optimizer state at `step`.

        `params` are the trainable parameters; a whole parameter tree is also
        accepted, and its frozen leaves are left out.
        """
        shardings = self.state_shardings
        if self.freezes:
            params = select_params(params, self._is_trainable)[0]

        def build(p):
            return {"step": jnp.asarray(step, jnp.int32), "params": p, "opt_state": self.optimizer.init(p)}

        params = jax.device_put(params, shardings["params"])
        return self.partitioner.jit(build, in_shardings=(shardings["params"],), out_shardings=shardings)(params)

    # -- steps -------------------------------------------------------------------------

    def _split_microbatches(self, x):
        """[B, ...] -> [M, B/M, ...] where microbatch m takes rows m, m+M, ...

        Strided rows keep every microbatch spread over all data-parallel
        devices (contiguous blocks would put a whole microbatch on a few).
        """
        m = self.microbatches
        x = x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)
        spec = self.partitioner.mesh_spec(("act_batch",) + (None,) * (x.ndim - 2))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.partitioner.mesh, PartitionSpec(None, *spec)))

    def _apply(self, params, frozen, batch, rng=None):
        """The module's outputs on a batch: training mode (with RNG streams) when `rng` is given."""
        params = merge_params(params, frozen) if frozen else params
        inputs = [batch[k] for k in self.model_inputs]
        if not self.rng_streams:
            return self.model.apply({"params": params}, *inputs)
        if rng is None:
            return self.model.apply({"params": params}, *inputs, deterministic=True)
        rngs = {name: jax.random.fold_in(rng, i) for i, name in enumerate(self.rng_streams)}
        return self.model.apply({"params": params}, *inputs, rngs=rngs, deterministic=False)

    def _outputs(self, params, frozen, reference, batch, rng=None):
        """The module's outputs (training mode when `rng` is given), with the reference's, if any."""
        outputs = self._apply(params, frozen, batch, rng)
        if self.reference_model is None:
            return outputs
        inputs = [batch[k] for k in self.model_inputs]
        evaluation = {"deterministic": True} if self.rng_streams else {}
        reference_outputs = self.reference_model.apply({"params": merge_params(frozen, reference)}, *inputs,
                                                       **evaluation)
        return WithReference(outputs, jax.lax.stop_gradient(reference_outputs))

    def _grads_and_sums(self, params, frozen, reference, batch, step):
        step_rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)

        def objective(p, mb, index):  # differentiated in the trainable params only
            sums = self.loss_fn(self._outputs(p, frozen, reference, mb, jax.random.fold_in(step_rng, index)), mb)
            return sums["loss_sum"], sums

        grad_fn = jax.grad(objective, has_aux=True)
        if self.microbatches == 1 or self.partitioner.stages > 1:  # with stages, the module's pipeline microbatches
            return grad_fn(params, batch, 0)
        microbatches = jax.tree_util.tree_map(self._split_microbatches, batch)
        param_shardings = self.state_shardings["params"]
        # Each microbatch's gradient is added to an fp32 sum, so the loop holds the sum and one
        # microbatch's gradient. Taken with respect to the weights in the compute dtype (cast
        # once, before the loop), that gradient is half the bytes: for GPT-J-6B on a v3-8 core
        # (1 x 8 megatron, 16 microbatches) the TPU compiler's temporaries fall from 15.8 GiB
        # (refused) to 8.0 GiB. The values are the same: a module that casts a weight before
        # every use differentiates through that cast, whose gradient is the compute-dtype
        # gradient widened to fp32, which is what the sum adds here.
        step_params = params
        narrow, rest = select_params(params, self._narrow_grads)
        if self.microbatch_grad_dtype is not None and narrow:
            narrow = jax.tree_util.tree_map(lambda p: p.astype(self.microbatch_grad_dtype), narrow)
            step_params = merge_params(narrow, rest) if rest else narrow

        def body(carry, indexed):
            index, mb = indexed
            grads, sums = grad_fn(step_params, mb, index)
            grads = jax.tree_util.tree_map(lambda total, g: total + g.astype(total.dtype), carry[0], grads)
            grads = jax.lax.with_sharding_constraint(grads, param_shardings)
            return (grads, _tree_add(carry[1], sums)), None

        first = jax.tree_util.tree_map(lambda x: x[0], microbatches)
        sums_shape = jax.eval_shape(lambda: grad_fn(step_params, first, 0)[1])
        zeros = (jax.tree_util.tree_map(jnp.zeros_like, params),
                 jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
        (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(self.microbatches), microbatches))
        return grads, sums

    def _train_step(self, state, batch, frozen, reference):
        params = state["params"]
        grads, sums = self._grads_and_sums(params, frozen, reference, batch, state["step"])
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / weight.astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        # A non-finite step leaves params and optimizer state as they were, so the
        # state stays good whether the run then stops or skips on. The update runs
        # inside lax.cond rather than being masked leaf by leaf afterwards: XLA then
        # writes the donated buffers in place instead of holding a second copy of
        # params and optimizer state (about 1.3 GiB per device for GPT-J-6B on 8).
        finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)

        def update():
            updates, new_opt_state = self.optimizer.update(grads, state["opt_state"], params)
            return optax.apply_updates(params, updates), new_opt_state

        kept_params, kept_opt_state = jax.lax.cond(finite, update, lambda: (params, state["opt_state"]))
        new_state = {"step": state["step"] + 1, "params": kept_params, "opt_state": kept_opt_state}
        metrics = dict(self.summarize(sums), grad_norm=grad_norm, finite=finite)
        if self.lr_schedule is not None:
            metrics["lr"] = self.lr_schedule(state["step"])
        return new_state, metrics

    @functools.cached_property
    def jitted_train_step(self):
        """`(state, batch, frozen, reference) -> (state, metrics)`, jitted with the shardings; the state (only)
        is donated."""
        return self.partitioner.jit(
            self._train_step, in_shardings=(self.state_shardings, self.batch_shardings, self.frozen_shardings,
                                            self.reference_shardings),
            out_shardings=(self.state_shardings, None), donate_argnums=(0,))

    def compile(self, compiler_options: Mapping[str, Any] | None = None) -> MemoryReport:
        """Compiles the train step ahead of time and logs what one device holds; returns that report.

        `compiler_options`: XLA options for this compilation (e.g. passes to disable), as jax's
        `Lowered.compile` takes them.
        """
        lowered = self.jitted_train_step.lower(self.abstract_state, self.abstract_batch, self.abstract_frozen,
                                               self.abstract_reference)
        self._compiled_train = lowered.compile(compiler_options)
        abstract, shardings, frozen, frozen_shardings = self._abstract
        analysis = None
        try:
            analysis = self._compiled_train.memory_analysis()
        except (NotImplementedError, RuntimeError):  # not every backend reports it
            pass

        def field(name):
            return None if analysis is None else int(getattr(analysis, name))

        report = MemoryReport(
            params=per_device_bytes(abstract["params"], shardings["params"]),
            opt_state=per_device_bytes(abstract["opt_state"], shardings["opt_state"]),
            temporaries=field("temp_size_in_bytes"), arguments=field("argument_size_in_bytes"),
            outputs=field("output_size_in_bytes"), aliased=field("alias_size_in_bytes"),
            code=field("generated_code_size_in_bytes"), frozen=per_device_bytes(frozen, frozen_shardings),
            reference=per_device_bytes(*self._abstract_reference))
        logging.info("%s", report)
        return report

    @property
    def compiled_train_step(self):
        """The train step `compile()` compiled (jax's Compiled: its program text, cost and memory), or None."""
        return self._compiled_train

    def train_step(self, state, batch):
        """One update (compiling first if `compile()` was not called)."""
        if self._compiled_train is None:
            self.compile()
        batch = jax.device_put(batch, self.batch_shardings)  # a no-op when the loader laid it out already
        return self._compiled_train(state, batch, self.frozen, self.reference)

    def _eval_step(self, params, batch, frozen, reference):
        return self.eval_loss_fn(self._outputs(params, frozen, reference, batch), batch)

    def evaluate(self, params, batches: Iterable[Mapping[str, jax.Array]], max_batches: int = 0) -> dict[str, float]:
        """Summarised metrics over `batches` (at most `max_batches` of them when > 0).

        Also returns `batches` (how many were read) and `weight` (the summed
        loss weight, e.g. the number of target tokens that counted). `params`
        are the trainable ones (the state's); the frozen ones and the reference's are the Trainer's.
        """
        frozen, reference = self.frozen, self.reference
        if self._jitted_eval is None:
            self._jitted_eval = self.partitioner.jit(
                self._eval_step, in_shardings=(self.state_shardings["params"], self.batch_shardings,
                                               self.frozen_shardings, self.reference_shardings))
        totals: dict[str, float] = {}
        seen = 0
        for batch in batches:
            if max_batches and seen >= max_batches:
                break
            sums = jax.device_get(self._jitted_eval(params, jax.device_put(batch, self.batch_shardings), frozen,
                                                    reference))
            for key, value in sums.items():  # summed on the host in float64: no drift over many batches
                totals[key] = totals.get(key, 0.0) + float(value)
            seen += 1
        if not totals:
            return {}
        summary = self.summarize({k: np.float32(v) for k, v in totals.items()})
        return {k: float(v) for k, v in summary.items()} | {"batches": seen, "weight": totals["weight"]}

    # -- loop --------------------------------------------------------------------------

    def _check_finite(self, step: int, metrics) -> None:
        if metrics is None or bool(metrics["finite"]):
            return
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step} (loss {float(metrics['loss'])}, grad norm "
                f"{float(metrics['grad_norm'])}); stopping without saving, the last checkpoint is untouched. "
                "Set train.on_nonfinite=skip to drop such updates instead.")
        logging.warning("non-finite loss or gradient at step %d: update skipped", step)

    def fit(self, state, train_iter: Iterator[Mapping[str, jax.Array]], total_steps: int,
            hooks: Sequence[Hook] = ()) -> tuple[Any, str]:
        """Trains from `state` until step `total_steps` or a stop signal; returns (state, status).

        status is 'completed' or 'preempted' (SIGTERM/SIGINT: the current step
        finishes and the hooks' `on_end` runs, e.g. a final checkpoint).
        Raises NonFiniteLossError with on_nonfinite='stop'.
        """
        if self._compiled_train is None:
            self.compile()
        step = int(jax.device_get(state["step"]))
        status = "completed"
        with _StopRequest().installed() as stop:
            for hook in hooks:
                hook.on_start(step, state)
            pending = None  # the previous step's metrics, checked one step late to keep dispatch ahead
            while step < total_steps:
                state, metrics = self.train_step(state, next(train_iter))
                step += 1
                self._check_finite(step - 1, pending)
                pending = metrics
                if any(h.needs_sync(step) for h in hooks):
                    self._check_finite(step, pending)
                    pending = None
                for hook in hooks:
                    hook.on_step(step, state, metrics)
                if stop.requested():
                    status = "preempted"
                    break
            self._check_finite(step, pending)
            for hook in hooks:
                hook.on_end(step, state, status)
        return state, status
