"""Quantized decoding: gptj int8 / int4 against gptj fp32 / bf16 and HF generate on the same weights, with quality.

    python benchmarks/quantized_decode.py [--quick] [--json PATH] [--prompt_len 32] [--new_tokens 128]

Speed: the CPU bench model of benchmarks/common.py (4 layers, d_model 512,
vocab 50400) with random weights built in torch, converted with
gptj.weights.formats.hf and quantized with gptj.convert.quantize's own functions
(int8 per channel, int4 in groups of 64, every matrix). Each batch size (1
and 8) decodes `new_tokens` greedy tokens after a `prompt_len`-token prompt
with gptj's Sampler in fp32, bf16, int8 and int4, HF `generate` in fp32, and
HF `generate` with torch's dynamic int8 quantization of every Linear (the
CPU int8 a PyTorch user reaches for: int8 weights and, unlike gptj, int8
activations on fbgemm); all six alternate run by run on the same cores
(torch at every core, OMP_WAIT_POLICY=PASSIVE as in decode_vs_hf.py).

Quality: the tiny config's trunk (2 layers, d_model 128) trained briefly on
the demo corpus's bytes with gptj's Trainer, then quantized the same way
(int4 in groups of 32, its head_dim): validation perplexity of each format
and the share of 8 x 32 greedy tokens equal to fp32's.

On a CPU, weight-only quantization saves memory but not necessarily time:
XLA:CPU converts the integers to floating point inside each matmul, and a
decode step of a model this small is bound by per-step overhead and compute
as much as by reading weights. The figure that matters is on a GPU, where
decode reads the weights at memory bandwidth (benchmarks/gpu.sh).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see decode_vs_hf.py

from benchmarks.common import (add_common_args, cpu_description, emit_results, forward_tokens_per_s_limit,  # noqa: E402
                               matmul_peak_flops, result)
from benchmarks.decode_vs_hf import build, interleaved  # noqa: E402

# (name, bits, group size) of each gptj weight format timed; 0 bits: the model's own dtype; None: the
# converter's default group (64 here, the bench model's head_dim; GPT-J-6B's 256 takes 128).
FORMATS = (("fp32", 0, 0), ("bf16", 0, 0), ("int8", 8, None), ("int4", 4, None))
QUALITY_STEPS, QUALITY_SEQ, QUALITY_BATCH = 300, 64, 8


def quantized(params, config, bits: int, group_size: int | None):
    """(params, config) of `bits`-bit weights, as `python -m gptj.convert quantize` writes them."""
    from gptj.convert.quantize import quantize_params, quantized_config
    from gptj.core.streaming import read_all

    config = quantized_config(config, bits, group_size)
    return read_all(quantize_params(params, config)), config


def samplers(fp32):
    """{format name: Sampler} over the weights of the fp32 Sampler `fp32` (bf16: cast; int8, int4: quantized)."""
    from gptj.inference.sampler import Sampler
    from gptj.weights.params_dir import to_numpy

    params, config = to_numpy(fp32.params), fp32.config
    out = {}
    for name, bits, group_size in FORMATS:
        if name == "fp32":
            out[name] = fp32
        elif bits:
            q_params, q_config = quantized(params, config, bits, group_size)
            out[name] = Sampler(q_config.replace(param_dtype="float32"), q_params, eos_id=None)
        else:
            out[name] = Sampler(config.replace(dtype="bfloat16", param_dtype="bfloat16"), params, eos_id=None)
    return out


def hf_dynamic_int8(hf_model):
    """A copy of an HF model with torch's dynamic int8 quantization of every Linear (int8 weights and activations)."""
    import copy

    import torch

    with warnings.catch_warnings():  # torch.ao's notice that quantize_dynamic is moving to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(hf_model), {torch.nn.Linear}, dtype=torch.qint8)


def speed_rows(args, runs: int, peak: float) -> list[dict]:
    import numpy as np
    import torch

    hf_model, fp32, config = build()  # decode_vs_hf's model: random HF weights, converted to gptj
    hf_int8 = hf_dynamic_int8(hf_model)
    gptj = samplers(fp32)
    rng = np.random.default_rng(0)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = rng.integers(0, gptj["fp32"].runner.vocab_limit, (batch, args.prompt_len)).tolist()
        ids = torch.tensor(prompts)

        def hf_run(model):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      eos_token_id=None, pad_token_id=0)[:, args.prompt_len:].tolist()

        def gptj_run(sampler):
            return [g.tokens for g in sampler.generate(prompts, max_new_tokens=args.new_tokens, temperature=0.0)]

        cold, tokens = {}, {}
        for name, sampler in gptj.items():
            start = time.perf_counter()
            tokens[name] = np.array(gptj_run(sampler))
            cold[name] = time.perf_counter() - start
        fns = {name: (lambda s=sampler: gptj_run(s)) for name, sampler in gptj.items()}
        fns.update({"hf": lambda: hf_run(hf_model), "hf_int8": lambda: hf_run(hf_int8)})
        timed = interleaved(fns, runs)
        speed = {name: batch * args.new_tokens / t.median for name, t in timed.items()}
        limit = forward_tokens_per_s_limit(config, args.prompt_len + args.new_tokens // 2, peak)
        shape = f"bench model, batch {batch}, {args.prompt_len}-token prompt, {args.new_tokens} new"

        def agree(name):
            return (f"{100 * np.mean(tokens[name] == tokens['fp32']):.0f}% of tokens equal to gptj fp32's (random "
                    "weights: near-ties everywhere; the quality rows measure a trained model)")

        def versus(name):
            return (f"{speed[name] / speed['fp32']:.2f}x gptj fp32, {speed[name] / speed['bf16']:.2f}x gptj bf16, "
                    f"{speed[name] / speed['hf']:.2f}x HF fp32, {speed[name] / speed['hf_int8']:.2f}x HF "
                    f"dynamic int8; compile {cold[name]:.1f} s")

        for name, peer, peer_name in (("fp32", "hf", "HF generate fp32"), ("bf16", "fp32", "gptj fp32"),
                                      ("int8", "hf_int8", "HF generate, torch dynamic int8"),
                                      ("int4", "fp32", "gptj fp32")):
            note = versus(name) + ("" if name == "fp32" else f"; {agree(name)}")
            rows.append(result(f"greedy decode tokens/s, gptj {name} ({shape})", "tokens/s", speed[name],
                               peer=speed[peer], peer_name=peer_name, limit=limit, spread=timed[name].spread,
                               peer_spread=timed[peer].spread, note=note))
    return rows


def train_quality_model():
    """(run config, partitioner, fp32 params) of the tiny trunk trained on the demo corpus's bytes."""
    import jax

    from gptj import recipe
    from gptj.configs import base, tiny
    from gptj.core.partitioning import Partitioner, make_mesh
    from gptj.data.tasks.demo import demo_byte_batches

    config = base.get_config()
    config.model.update(dict(tiny.get_config().model.to_dict(), vocab_size=256, vocab_pad_multiple=1, max_len=128))
    config.optimizer.update(dict(lr=3e-3, end_lr=3e-4, warmup_steps=20, anneal_steps=QUALITY_STEPS, weight_decay=0.1))
    config.train.batch_size = QUALITY_BATCH
    config.data.seq_len = QUALITY_SEQ
    partitioner = Partitioner(make_mesh(1, 1, devices=jax.devices()[:1]), "megatron")
    trainer = recipe.build_trainer(config, recipe.run_model_config(config), partitioner)
    state = trainer.init_state(0)
    for batch in demo_byte_batches("train", QUALITY_STEPS, QUALITY_BATCH, QUALITY_SEQ, seed=0):
        state, _ = trainer.train_step(state, batch)
    return config, partitioner, state["params"]


def quality_rows() -> list[dict]:
    """Validation perplexity (the Trainer's eval step, as --mode=eval) and greedy agreement of int8 / int4 vs fp32."""
    import numpy as np

    from gptj import recipe
    from gptj.data.tasks.demo import demo_byte_batches
    from gptj.inference.sampler import Sampler
    from gptj.weights import params_dir as params_io

    config, partitioner, trained = train_quality_model()
    model = recipe.run_model_config(config)
    params = params_io.to_numpy(trained)
    validation = demo_byte_batches("validation", 8, QUALITY_BATCH, QUALITY_SEQ)
    prompts = [list(row[:16]) for row in validation[0]["inputs"]]
    perplexity, tokens = {}, {}
    for name, bits, group_size in (("fp32", 0, 0), ("int8", 8, 0), ("int4", 4, 32)):
        p, c = quantized(params, model, bits, group_size) if bits else (params, model)
        c = c.replace(param_dtype="float32")
        perplexity[name] = recipe.build_trainer(config, c, partitioner).evaluate(p, validation)["perplexity"]
        sampler = Sampler(c, p, partitioner, eos_id=None)
        tokens[name] = np.array([g.tokens for g in sampler.generate(prompts, max_new_tokens=32, temperature=0.0)])
    rows = []
    for name, bound in (("int8", "1%"), ("int4", "5%")):
        rows.append(result(
            f"validation perplexity, {name} (tiny trunk trained on demo-corpus bytes, {QUALITY_STEPS} steps)",
            "perplexity", perplexity[name], peer=perplexity["fp32"], peer_name="gptj fp32", higher_is_better=False,
            note=(f"{100 * (perplexity[name] / perplexity['fp32'] - 1):+.2f}% vs fp32 (acceptance: within {bound}); "
                  f"greedy tokens equal to fp32's: {100 * np.mean(tokens[name] == tokens['fp32']):.1f}% of 8 x 32; "
                  f"{'per channel' if name == 'int8' else 'groups of 32'}")))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--runs", type=int, default=0, help="timed runs per figure (default 3 quick, 5 full)")
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.quick else 5)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"CPU: {cpu_description()}; torch {torch.__version__} int8 engine {torch.backends.quantized.engine}",
          flush=True)
    rows = speed_rows(args, runs, matmul_peak_flops())
    rows += quality_rows()
    emit_results(args.json, rows)


if __name__ == "__main__":
    main()
