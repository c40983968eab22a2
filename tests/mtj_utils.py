"""Writes tiny checkpoints exactly as mesh-transformer-jax does, and runs its forward pass in numpy.

Independent of gptj.weights.formats.mtj on purpose: the checkpoint is built as the reference's train
state (a haiku params dict with a leading shard axis, plus `step` and, for full checkpoints,
the optax 0.0.9 chain state), flattened with jax.tree_util (sorted dict keys), cut into 16
chunks with the reference's `split` and saved with `np.savez(*chunk)` per shard. The numpy
forward pass computes logits from the per-shard arrays the way the reference's xmapped
layers do (one-hot embedding per shard plus bias, per-shard heads, psum), so it checks the
reader's mapping rather than restating it.
"""

import collections
import json
import os

import jax
import ml_dtypes
import numpy as np

PIECES = 16
P = "causal_transformer_shard/~/"

# The reference's optax chain state: scale, clip, adam(count, mu, nu), weight decay, scale, schedule(count).
Empty = collections.namedtuple("Empty", [])
ScaleByAdamState = collections.namedtuple("ScaleByAdamState", ["count", "mu", "nu"])
ScaleByScheduleState = collections.namedtuple("ScaleByScheduleState", ["count"])

TINY = {"layers": 2, "d_model": 64, "n_heads": 8, "n_vocab": 128, "norm": "layernorm", "pe": "rotary",
        "pe_rotary_dims": 4, "seq": 32, "cores_per_replica": 8}


def random_shards(cfg, seed=0):
    """Per-shard haiku params {module: {leaf: [S, ...]}} with every tensor random (biases, LN included)."""
    rng = np.random.RandomState(seed)
    s, d, v, layers = cfg["cores_per_replica"], cfg["d_model"], cfg["n_vocab"], cfg["layers"]
    ff = 4 * d

    def w(*shape, scale=0.2):
        return (scale * rng.normal(size=(s,) + shape)).astype(np.float32)

    def replicated(x):  # LayerNorm params: one value copied on every shard
        return np.broadcast_to(x, (s,) + x.shape).astype(np.float32).copy()

    params = {
        P + "embedding_shard/~/linear": {"w": w(v // s, d, scale=1.0), "b": w(d, scale=0.1)},
        P + "projection_shard/~/replicated_layer_norm": {"scale": replicated(1 + 0.2 * rng.normal(size=d)),
                                                          "offset": replicated(0.2 * rng.normal(size=d))},
        P + "projection_shard/~/linear": {"w": w(d, v // s), "b": w(v // s)},
    }
    for i in range(layers):
        m = f"{P}layer_{i}/~/"
        params.update({
            m + "linear": {"w": w(d, d // s)}, m + "linear_1": {"w": w(d, d // s)}, m + "linear_2": {"w": w(d, d // s)},
            m + "linear_3": {"w": w(d // s, d)},
            m + "linear_4": {"w": w(d, ff // s), "b": w(ff // s)},
            m + "linear_5": {"w": w(ff // s, d, scale=0.1), "b": w(d, scale=0.1)},
            m + "replicated_layer_norm": {"scale": replicated(1 + 0.2 * rng.normal(size=d)),
                                          "offset": replicated(0.2 * rng.normal(size=d))},
        })
    return params


def _split(a, n):
    """mesh_transformer.checkpoint.split: n consecutive chunks, the first len % n one longer."""
    k, m = divmod(len(a), n)
    return [a[i * k + min(i, m):(i + 1) * k + min(i + 1, m)] for i in range(n)]


def write_checkpoint(model_dir, params, cfg, step, with_opt, bf16, checkpoints=None, config_name="tiny.json"):
    """Writes model_dir/{meta.json, <config_name>, step_<step>/shard_i/0..15.npz} as the reference does."""
    shards = cfg["cores_per_replica"]
    if bf16:  # slim_model.py: params cast to bf16 (np.savez then stores them as the void dtype |V2)
        params = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16), params)
    state = {"params": params, "step": np.full((shards,), step, np.int32)}
    if with_opt:
        zeros = jax.tree_util.tree_map(lambda x: np.full(x.shape, 0.01, np.float32), params)
        count = np.full((shards,), step, np.int32)
        state["opt_state"] = (Empty(), Empty(), ScaleByAdamState(count, zeros, zeros), Empty(), Empty(),
                              ScaleByScheduleState(count))
    leaves = jax.tree_util.tree_leaves(state)
    step_dir = os.path.join(model_dir, f"step_{step}")
    for shard in range(shards):
        os.makedirs(os.path.join(step_dir, f"shard_{shard}"), exist_ok=True)
        for piece, chunk in enumerate(_split([leaf[shard] for leaf in leaves], PIECES)):
            np.savez(os.path.join(step_dir, f"shard_{shard}", f"{piece}.npz"), *chunk)
    with open(os.path.join(model_dir, "meta.json"), "w") as f:
        json.dump({"step": step, "checkpoints": checkpoints or [step], "aux": {str(step): {}}}, f)
    if config_name:
        with open(os.path.join(model_dir, config_name), "w") as f:
            json.dump(cfg, f)
    return step_dir


def _layer_norm(x, scale, offset):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return scale * (x - mean) / np.sqrt(var + 1e-5) + offset


def _rotary(x, dims):
    """The reference's apply_rotary_pos_emb on x [T, heads, head_dim] (first `dims` dims, pairs interleaved)."""
    rot, rest = x[..., :dims], x[..., dims:]
    inv_freq = 1.0 / (10000 ** (np.arange(0, dims, 2) / dims))
    angles = np.arange(x.shape[0])[:, None] * inv_freq
    sin = np.repeat(np.sin(angles), 2, axis=-1)[:, None, :]
    cos = np.repeat(np.cos(angles), 2, axis=-1)[:, None, :]
    rotated = np.stack([-rot[..., 1::2], rot[..., ::2]], axis=-1).reshape(rot.shape)
    return np.concatenate([rot * cos + rotated * sin, rest], axis=-1)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(params, cfg, tokens):
    """Logits [T, n_vocab] of one sequence, computed shard by shard as the reference does (float64)."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    s, d, heads = cfg["cores_per_replica"], cfg["d_model"], cfg["n_heads"]
    v_per, hps, dh = cfg["n_vocab"] // s, heads // s, d // heads
    t = len(tokens)
    emb = p[P + "embedding_shard/~/linear"]
    # jax.nn.one_hot of the shard-local id: all zeros for tokens of other shards.
    x = sum((tokens[:, None] - i * v_per == np.arange(v_per)[None]) @ emb["w"][i] + emb["b"][i] for i in range(s))
    causal = np.tril(np.ones((t, t)))
    for layer in range(cfg["layers"]):
        m = f"{P}layer_{layer}/~/"
        ln = p[m + "replicated_layer_norm"]
        h = _layer_norm(x, ln["scale"][0], ln["offset"][0])
        out = 0
        for i in range(s):
            q, v, k = (h @ p[m + name]["w"][i] for name in ("linear", "linear_1", "linear_2"))
            q, v, k = (a.reshape(t, hps, dh) for a in (q, v, k))
            q, k = _rotary(q, cfg["pe_rotary_dims"]), _rotary(k, cfg["pe_rotary_dims"])
            logits = np.einsum("thd,Thd->htT", q, k) / np.sqrt(dh) - 1e10 * (1 - causal)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            attn = np.einsum("htT,Thd->thd", weights, v).reshape(t, hps * dh) @ p[m + "linear_3"]["w"][i]
            ff = _gelu(h @ p[m + "linear_4"]["w"][i] + p[m + "linear_4"]["b"][i])
            out = out + attn + ff @ p[m + "linear_5"]["w"][i] + p[m + "linear_5"]["b"][i]
        x = x + out
    ln = p[P + "projection_shard/~/replicated_layer_norm"]
    h = _layer_norm(x, ln["scale"][0], ln["offset"][0])
    proj = p[P + "projection_shard/~/linear"]
    return np.concatenate([h @ proj["w"][i] + proj["b"][i] for i in range(s)], axis=-1)
