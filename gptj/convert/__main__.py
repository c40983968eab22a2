"""Weight conversion tools: `python -m gptj.convert <command> ...`.

    python -m gptj.convert to_hf    --workdir=runs/tiny --out=hf_dir [--dtype=float32] [--max_shard_size=5GB]
    python -m gptj.convert from_hf  --hf_dir=hf_dir --out=params_dir [--vocab_pad_multiple=1]
    python -m gptj.convert from_mtj --mtj_dir=step_383500 --out=params_dir [--mtj_config=6B_roto_256.json]
    python -m gptj.convert slim     --workdir=runs/tiny --out=slim_dir [--dtype=bfloat16]
    python -m gptj.convert to_peft  --workdir=runs/lora --out=peft_dir

`--workdir` takes a training workdir (its latest checkpoint), one of its checkpoint step
directories (`runs/tiny/checkpoints/160`) or a params directory; the weights are checked
against their checksums before anything is written. A LoRA or `train.trainable` workdir is
read over its base weights with the adapters merged in (to_hf, slim); `to_peft` writes its
adapters alone as a HuggingFace PEFT adapter directory. Bad input (a missing, damaged or
foreign checkpoint) and storage faults (no space, permission denied) print one line and exit
with status 2 (`--verbosity=1`, before the command, also prints the trace); an existing output
is never overwritten.

Every command streams the weights: it reads and writes one block (about a layer of one
tensor) at a time, so converting a model takes little more host memory than its largest
tensor, whatever the model's size.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def _to_hf(args) -> str:
    from gptj.convert import hf
    from gptj.weights import open_weights

    weights = open_weights(args.workdir, base=args.base)
    hf.write_hf(weights.arrays(), weights.config, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    merged = " (base + trained parameters, adapters merged)" if weights.adapted is not None else ""
    return f"wrote HF GPTJForCausalLM ({args.dtype}) to {args.out}{merged}"


def _to_peft(args) -> str:
    from gptj.config_validation import parse_init_from
    from gptj.convert import peft
    from gptj.lora import split_adapters
    from gptj.params_io import WeightsError
    from gptj.trainer import param_paths
    from gptj.weights import open_weights

    weights = open_weights(args.workdir)
    adapted = weights.adapted
    if adapted is None or adapted.lora is None:
        raise WeightsError(f"{args.workdir} is not a LoRA workdir (it trained no adapters); to_peft needs a run "
                           "with lora.rank > 0 (to_hf writes any workdir as a HuggingFace model)")
    if os.path.exists(os.path.join(args.out, peft.ADAPTER_CONFIG)):
        raise WeightsError(f"{args.out} already holds a PEFT adapter; choose a new output directory")
    base_params, adapters = split_adapters(adapted.trained_params(weights.config))
    if base_params:
        raise WeightsError(f"{args.workdir} also trained base parameters ({', '.join(param_paths(base_params))}), "
                           "which a PEFT LoRA adapter cannot hold; use to_hf for the merged model")
    kind, base_path = parse_init_from(adapted.base_spec)
    peft.write_peft(adapters, weights.config, adapted.lora, args.out, base_model=base_path if kind == "hf" else "")
    lora = adapted.lora
    return (f"wrote PEFT LoRA adapter (rank {lora.rank}, alpha {lora.alpha:g}, {', '.join(lora.targets)}) to "
            f"{args.out}; its base: {adapted.base_spec}")


def _from_hf(args) -> str:
    from gptj.params_io import save_params
    from gptj.weights import open_weights

    weights = open_weights(f"hf:{args.hf_dir}", args.vocab_pad_multiple)
    config = weights.config
    save_params(args.out, weights.arrays(), config)
    return f"wrote params directory {args.out} ({config.num_layers} layers, d_model {config.d_model})"


def _from_mtj(args) -> str:
    from gptj.convert import mtj
    from gptj.params_io import save_params

    params, config = mtj.open_mtj(args.mtj_dir, config=args.mtj_config, vocab_pad_multiple=args.vocab_pad_multiple)
    save_params(args.out, params, config)
    return f"wrote params directory {args.out} ({config.num_layers} layers, d_model {config.d_model})"


def _slim(args) -> str:
    from gptj.convert import slim
    from gptj.params_io import abstract_params_like

    config = slim.slim(args.workdir, args.out, dtype=args.dtype, base=args.base)
    size = slim.params_bytes(abstract_params_like(config, dtype=config.param_dtype))
    return f"wrote {args.dtype} params directory {args.out} ({size / 2**30:.2f} GiB of weights)"


def _size(text: str) -> int:
    """argparse type of --max_shard_size: bytes, or a usage error."""
    from gptj.convert.hf_files import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_BASE_HELP = ("a LoRA or frozen-parameter workdir's base weights (hf:PATH, mtj:PATH or PATH), if they moved "
              "(default: where the workdir recorded them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gptj.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbosity", type=int, default=0, help="1: print the trace behind an error")
    commands = parser.add_subparsers(dest="command", required=True)

    to_hf = commands.add_parser("to_hf", help="gptj workdir or params directory -> HF GPTJForCausalLM directory")
    to_hf.add_argument("--workdir", required=True, help="training workdir or params directory")
    to_hf.add_argument("--out", required=True, help="new HF directory")
    to_hf.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    to_hf.add_argument("--max_shard_size", default=None, type=_size,
                       help="largest safetensors shard, as HF writes sizes: 5GB (10^9 bytes), 500MB, 2GiB, or bytes "
                            "(default: HF's, 5GB; a larger tensor gets a shard of its own)")
    to_hf.add_argument("--base", default=None, help=_BASE_HELP)
    to_hf.set_defaults(run=_to_hf)

    from_hf = commands.add_parser("from_hf", help="HF GPT-J directory -> gptj params directory")
    from_hf.add_argument("--hf_dir", required=True, help="a save_pretrained directory of GPTJForCausalLM")
    from_hf.add_argument("--out", required=True, help="new params directory")
    from_hf.add_argument("--vocab_pad_multiple", type=int, default=1, help="pad the vocabulary to a multiple of this")
    from_hf.set_defaults(run=_from_hf)

    from_mtj = commands.add_parser("from_mtj", help="mesh-transformer-jax checkpoint -> gptj params directory")
    from_mtj.add_argument("--mtj_dir", required=True, help="step_N directory, or the model directory with meta.json")
    from_mtj.add_argument("--out", required=True, help="new params directory")
    from_mtj.add_argument("--mtj_config", default=None,
                          help="the reference's config JSON (default: one beside the checkpoint, else GPT-J-6B's)")
    from_mtj.add_argument("--vocab_pad_multiple", type=int, default=1, help="pad the vocabulary to a multiple of this")
    from_mtj.set_defaults(run=_from_mtj)

    slim = commands.add_parser("slim", help="params only, in bf16, for inference")
    slim.add_argument("--workdir", required=True, help="training workdir or params directory")
    slim.add_argument("--out", required=True, help="new params directory")
    slim.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    slim.add_argument("--base", default=None, help=_BASE_HELP)
    slim.set_defaults(run=_slim)

    to_peft = commands.add_parser("to_peft", help="LoRA workdir -> HuggingFace PEFT adapter directory")
    to_peft.add_argument("--workdir", required=True, help="a workdir trained with lora.rank > 0")
    to_peft.add_argument("--out", required=True, help="new adapter directory")
    to_peft.set_defaults(run=_to_peft)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from gptj.storage import quiet_storage_noise

    if args.verbosity < 1:
        quiet_storage_noise()
    try:
        print(args.run(args))
    except (ValueError, OSError) as e:  # WeightsError, CheckpointError, bad values; refused files
        if args.verbosity >= 1:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
