"""The fused, chunked output head + cross-entropy equals the full-logits path; so does chunked scoring.

References: `losses.next_token_loss` over `model.output_logits` (today's
path: every [tokens, vocab] logit, autodiff through it) and, for scoring, a
log-softmax over all logits. fp32 throughout, compared at <= 1e-5 relative.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from trainer_utils import synthetic_batch, tiny_config, to_numpy

from gptj import recipe
from gptj.core import losses
from gptj.core.partitioning import Partitioner, make_mesh
from gptj.model import quantized as quantize
from gptj.model.transformer import GPTJ, GPTJConfig, output_logits, score_targets
from gptj.settings import validate

# A padded vocabulary (120 real ids of 128), so chunks must mask padded ids themselves.
from gptj.errors import ConfigError
HEAD = GPTJConfig(vocab_size=120, vocab_pad_multiple=64, num_layers=1, d_model=16, num_heads=2, rotary_dim=4,
                  max_len=32)
ROWS, LENGTH = 3, 13


def _head_inputs(seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    vocab = HEAD.padded_vocab_size
    hidden = jax.random.normal(keys[0], (ROWS, LENGTH, HEAD.d_model))
    kernel = jax.random.normal(keys[1], (HEAD.d_model, vocab)) * 0.5
    bias = jax.random.normal(keys[2], (vocab,))
    targets = jax.random.randint(keys[3], (ROWS, LENGTH), 0, HEAD.vocab_size)
    # Every other target is the argmax, so accuracy and greedy flags are neither all true nor all false.
    argmax = jnp.argmax(output_logits(hidden, kernel, bias, HEAD), axis=-1)
    targets = jnp.where(jnp.arange(LENGTH) % 2 == 0, argmax, targets).astype(jnp.int32)
    mask = (jax.random.uniform(keys[4], (ROWS, LENGTH)) > 0.3).astype(jnp.float32)
    return hidden, kernel, bias, targets, mask


def _logits_fn(hidden, kernel, bias, first_id):
    return output_logits(hidden, kernel, bias, HEAD, first_id)


def _relative(got, want):
    return float(np.max(np.abs(np.asarray(got) - np.asarray(want))) / max(float(np.max(np.abs(want))), 1e-30))


@pytest.mark.parametrize("chunk_tokens,vocab_chunk", [(7, 0), (7, 40), (1000, 64)],
                         ids=["token-chunks", "token-and-vocab-chunks", "vocab-chunks"])
def test_fused_loss_and_gradients_equal_the_full_logits(chunk_tokens, vocab_chunk):
    """Sums and d/d(hidden, kernel, bias), with and without z-loss and a loss mask (one compiled program).

    7 tokens over 3 rows is 2 positions per chunk (13 = 7 chunks, the last
    padded); a vocabulary chunk of 40 becomes 32 (the largest divisor of 128).
    """
    hidden, kernel, bias, targets, mask = _head_inputs()
    variants = [(z, masked) for z in (0.0, 1e-2) for masked in (False, True)]

    @jax.jit
    def run(hidden, kernel, bias):
        out = []
        for z_loss, masked in variants:
            batch = {"targets": targets, "loss_mask": mask} if masked else {"targets": targets}

            def full(h, k, b):
                return losses.next_token_loss(output_logits(h, k, b, HEAD), batch, z_loss)

            def fused(h, k, b):
                return losses.fused_next_token_loss(h, k, b, batch, _logits_fn, chunk_tokens=chunk_tokens,
                                                    vocab_chunk=vocab_chunk, z_loss=z_loss)

            for fn in (full, fused):
                out.append((fn(hidden, kernel, bias),
                            jax.grad(lambda *a: fn(*a)["loss_sum"], argnums=(0, 1, 2))(hidden, kernel, bias)))
        return out

    results = run(hidden, kernel, bias)
    for i, (z_loss, masked) in enumerate(variants):
        (want, want_grads), (got, got_grads) = results[2 * i], results[2 * i + 1]
        where = f"z_loss={z_loss}, masked={masked}"
        assert set(got) == set(want) == {"loss_sum", "nll_sum", "z_loss_sum", "weight", "correct"}
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=f"{name}, {where}")
        for name, g, w in zip(("hidden", "kernel", "bias"), got_grads, want_grads):
            assert _relative(g, w) <= 1e-5, f"d {name}, {where}: {_relative(g, w)}"
    assert 0 < float(results[0][0]["correct"]) < float(results[0][0]["weight"])  # accuracy is exercised


# (data, model, rule set, microbatches, train.loss_chunk_vocab): every rule set, both mesh shapes, explicit
# vocabulary chunks over an unsharded (dp) and a sharded (zero3) vocabulary, and auto.
MESHES = {
    "single": (1, 1, "megatron", 1, 40),
    "megatron-2x4-microbatched": (2, 4, "megatron", 2, -1),
    "zero3-4x2": (4, 2, "zero3", 1, 40),
    "zero1-4x2": (4, 2, "zero1", 1, -1),
    "dp-2x4": (2, 4, "dp", 1, 40),
}
Z_LOSS = 1e-3


def _run_config(mesh: str):
    _, _, _, microbatches, vocab_chunk = MESHES[mesh]
    # 24 tokens per chunk over 8 (or 4 per microbatch) rows of 16: several token chunks, the last padded.
    config = tiny_config(microbatches=microbatches, z_loss=Z_LOSS, loss_chunk_tokens=24, loss_chunk_vocab=vocab_chunk)
    config.model.num_layers = 1  # the head is what differs; one layer compiles faster
    # A non-zero learning rate at the first step, and eps=1: Adam's first update is lr g / (|g| + eps), which
    # with a tiny eps is lr sign(g) and amplifies the rounding of near-zero gradient entries; with eps=1 it is
    # about lr g, so updated params compare at the gradients' tolerance.
    config.optimizer.update(dict(warmup_steps=0, eps=1.0))
    return config


@functools.lru_cache(maxsize=None)
def _fused_trainer(mesh: str):
    """The fused-head Trainer `build_trainer` makes for MESHES[mesh] (its steps compile when first used)."""
    data, model, rules = MESHES[mesh][:3]
    config = _run_config(mesh)
    partitioner = Partitioner(make_mesh(data, model, devices=jax.devices()[:data * model]), rules)
    return recipe.build_trainer(config, GPTJConfig.from_dict(config.model.to_dict()), partitioner)


@functools.lru_cache(maxsize=None)
def _reference():
    """Today's path on one device, compiled once: (initial params, (params, batch) -> (sums, gradient of
    loss_sum) through the model's full logits and `next_token_loss` with accuracy, (gradient, params) -> the
    optimizer's first update)."""
    config = _run_config("single")
    model = GPTJ(GPTJConfig.from_dict(config.model.to_dict()))
    optimizer = _fused_trainer("single").optimizer
    params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))))()

    def sums_and_grads(params, batch):
        def loss(p):
            sums = losses.next_token_loss(model.apply({"params": p}, batch["inputs"]), batch, Z_LOSS)
            return sums["loss_sum"], sums

        (_, sums), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return sums, grads

    def first_update(grads, params):
        updates, opt_state = optimizer.update(grads, optimizer.init(params), params)
        return optax.apply_updates(params, updates), opt_state

    return to_numpy(params["params"]), jax.jit(sums_and_grads), jax.jit(first_update)


def _masked_batch(index: int):
    batch = synthetic_batch(index)
    batch["loss_mask"][:, ::4] = 0.0  # a quarter of the targets do not count
    return batch


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_train_step_equals_the_full_logits_path(mesh):
    """One fused-head Trainer step on the mesh against the full-logits gradient on one device + the same optimizer.

    Compared: loss metrics, the gradient norm, the gradients (Adam's first
    moment is 0.1 x the clipped gradient) and the updated params.
    """
    trainer = _fused_trainer(mesh)
    assert trainer.model.head_inputs
    params, sums_and_grads, first_update = _reference()
    batch = _masked_batch(0)
    new_state, metrics = trainer.train_step(trainer.state_from_params(params), batch)
    new_state, metrics = to_numpy(new_state), jax.device_get(metrics)

    sums, grads = sums_and_grads(params, batch)
    grads = jax.tree_util.tree_map(lambda g: g / sums["weight"], grads)
    ref_params, ref_opt_state = first_update(grads, params)
    want = losses.summarize(sums)
    for name in ("loss", "nll", "z_loss"):
        np.testing.assert_allclose(metrics[name], want[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(grads), rtol=1e-5)
    mu, ref_mu = _adam_first_moment(new_state["opt_state"]), _adam_first_moment(ref_opt_state)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(mu), jax.tree_util.tree_leaves(ref_mu)):
        assert _relative(got, want) <= 1e-5, f"gradient of {jax.tree_util.keystr(path)}: {_relative(got, want)}"
    for got, want in zip(jax.tree_util.tree_leaves(new_state["params"]), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _adam_first_moment(opt_state):
    """Adam's `mu` in the optimizer chain's state (after one step: (1 - b1) x the clipped gradient)."""
    return next(s.mu for s in opt_state if hasattr(s, "mu"))


def test_evaluate_counts_accuracy_like_the_full_logits_path():
    params, sums_and_grads, _ = _reference()
    batch = _masked_batch(7)
    got = _fused_trainer("single").evaluate(params, [batch])
    want = losses.summarize(sums_and_grads(params, batch)[0])
    assert set(want) < set(got) and "accuracy" in want
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_train_step_temporaries_shrink_by_more_than_the_full_logits():
    """Acceptance: vocab 50400, seq 1024, batch 8 (one small layer): AOT-compiled, nothing allocated."""
    reports = {}
    for chunk in (0, 2048):
        config = tiny_config(loss_chunk_tokens=chunk, batch_size=8)
        config.model.update(dict(vocab_size=50400, vocab_pad_multiple=1, num_layers=1, d_model=64, num_heads=4,
                                 rotary_dim=8, max_len=1024))
        config.data.seq_len = 1024
        partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
        trainer = recipe.build_trainer(config, GPTJConfig.from_dict(config.model.to_dict()), partitioner)
        reports[chunk] = trainer.compile()
    full_logits_bytes = 8 * 1024 * 50400 * 4
    saved = reports[0].temporaries - reports[2048].temporaries
    assert saved >= full_logits_bytes, (reports[0], reports[2048])


@pytest.mark.parametrize("bits,group_size", [(8, 0), (4, 8)], ids=["int8-per-channel", "int4-groups"])
def test_fused_loss_of_a_quantized_head_equals_the_dequantized_one(bits, group_size):
    """A quantized head (values + scales, both ending in the vocabulary) is sliced per vocabulary chunk alike."""
    hidden, kernel, bias, targets, mask = _head_inputs(seed=3)
    values, scale = quantize.quantize_matrix(np.asarray(kernel), bits, group_size, (0, 1), np.float32)
    packed = {quantize.VALUES: jnp.asarray(values), quantize.SCALE: jnp.asarray(scale)}
    batch = {"targets": targets, "loss_mask": mask}
    want = losses.next_token_loss(output_logits(hidden, quantize.dequantize(packed, (0, 1), jnp.float32), bias, HEAD),
                                  batch)
    got = jax.jit(lambda k: losses.fused_next_token_loss(hidden, k, bias, batch, _logits_fn, chunk_tokens=7,
                                                         vocab_chunk=32))(packed)
    for name in ("loss_sum", "correct", "weight"):
        assert _relative(got[name], want[name]) < 1e-5, name


def test_score_targets_equals_a_log_softmax_over_all_logits():
    hidden, kernel, bias, targets, _ = _head_inputs(1)
    log_probs = np.asarray(jax.nn.log_softmax(output_logits(hidden, kernel, bias, HEAD), axis=-1))
    targets = np.asarray(targets)
    top_k = 3

    @jax.jit
    def run(hidden, kernel, bias, targets):
        return score_targets(hidden, kernel, bias, targets, HEAD, top_k=top_k, chunk_tokens=5)

    got = run(hidden, kernel, bias, targets)
    want_lp = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(got.logprobs, want_lp, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.greedy, log_probs.argmax(-1) == targets)
    order = np.argsort(-log_probs, axis=-1, kind="stable")[..., :top_k]
    np.testing.assert_array_equal(got.top_ids, order)
    np.testing.assert_allclose(got.top_logprobs, np.take_along_axis(log_probs, order, axis=-1), rtol=1e-5, atol=1e-6)
    assert got.greedy.any() and not got.greedy.all()
    no_top = jax.jit(lambda *a: score_targets(*a, HEAD, chunk_tokens=5))(hidden, kernel, bias, targets)
    assert no_top.top_ids.shape == (ROWS, LENGTH, 0)
    np.testing.assert_allclose(no_top.logprobs, got.logprobs, rtol=1e-6)


def test_bad_chunk_settings_fail_on_one_line():
    config = tiny_config(loss_chunk_tokens=-1, loss_chunk_vocab=-2)
    with pytest.raises(ConfigError) as error:
        validate(config, "train", check_tasks=False)
    message = str(error.value)
    assert "train.loss_chunk_tokens must be >= 0" in message and "train.loss_chunk_vocab must be -1" in message
    assert "\n" not in message
    partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
    with pytest.raises(ConfigError, match="train.loss_chunk_tokens must be >= 0"):
        recipe.build_trainer(config, GPTJConfig.from_dict(config.model.to_dict()), partitioner)
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        losses.fused_next_token_loss(*_head_inputs()[:3], {"targets": _head_inputs()[3]}, _logits_fn, chunk_tokens=0)
