"""Weight conversion tools: `python -m gptj.convert <command> ...`.

    python -m gptj.convert to_hf    --workdir=runs/tiny --out=hf_dir [--dtype=float32] [--max_shard_size=5GB]
    python -m gptj.convert from_hf  --hf_dir=hf_dir --out=params_dir [--vocab_pad_multiple=1]
    python -m gptj.convert from_mtj --mtj_dir=step_383500 --out=params_dir [--mtj_config=6B_roto_256.json]
    python -m gptj.convert slim     --workdir=runs/tiny --out=slim_dir [--dtype=bfloat16]
    python -m gptj.convert to_peft  --workdir=runs/lora --out=peft_dir
    python -m gptj.convert quantize --workdir=runs/tiny --out=int8_dir [--bits=8|4] [--group_size=128]

`--workdir` takes a training workdir (its latest checkpoint), one of its checkpoint step
directories (`runs/tiny/checkpoints/160`) or a params directory; the weights are checked
against their checksums before anything is written. A LoRA or `train.trainable` workdir is
read over its base weights with the adapters merged in (to_hf, slim); `to_peft` writes its
adapters alone as a HuggingFace PEFT adapter directory. `quantize` writes int8 or int4 weights with
bf16 scales for sampling, serving and evaluation (`gptj.convert.quantize`); a quantized directory
is not converted further (convert the weights it was made from). Bad input (a missing, damaged or
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
    from gptj.weights.formats import hf
    from gptj.weights.source import open_weights

    weights = open_weights(args.workdir, base=args.base)
    _refuse_quantized(weights, "to_hf")
    hf.write_hf(weights.arrays(), weights.config, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    merged = " (base + trained parameters, adapters merged)" if weights.adapted is not None else ""
    return f"wrote HF GPTJForCausalLM ({args.dtype}) to {args.out}{merged}"


def _to_peft(args) -> str:
    from gptj.core.param_tree import param_paths
    from gptj.errors import WeightsError
    from gptj.model.lora import split_adapters
    from gptj.weights.formats import peft
    from gptj.weights.source import open_weights
    from gptj.weights.spec import parse_init_from

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
    from gptj.weights.params_dir import save_params
    from gptj.weights.source import open_weights

    weights = open_weights(f"hf:{args.hf_dir}", args.vocab_pad_multiple)
    config = weights.config
    save_params(args.out, weights.arrays(), config)
    return f"wrote params directory {args.out} ({config.num_layers} layers, d_model {config.d_model})"


def _from_mtj(args) -> str:
    from gptj.weights.formats import mtj
    from gptj.weights.params_dir import save_params

    params, config = mtj.open_mtj(args.mtj_dir, config=args.mtj_config, vocab_pad_multiple=args.vocab_pad_multiple)
    save_params(args.out, params, config)
    return f"wrote params directory {args.out} ({config.num_layers} layers, d_model {config.d_model})"


def _slim(args) -> str:
    from gptj.convert import slim
    from gptj.weights.params_dir import abstract_params_like
    from gptj.weights.source import open_weights

    weights = open_weights(args.workdir, base=args.base)
    _refuse_quantized(weights, "slim")
    config = slim.slim(weights, args.out, dtype=args.dtype)
    size = slim.params_bytes(abstract_params_like(config, dtype=config.param_dtype))
    return f"wrote {args.dtype} params directory {args.out} ({size / 2**30:.2f} GiB of weights)"


def _quantize(args) -> str:
    from gptj.convert import slim
    from gptj.convert.quantize import write_quantized
    from gptj.model import quantized as quantize
    from gptj.weights.params_dir import abstract_params_like

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    config = write_quantized(args.workdir, args.out, args.bits, args.group_size, targets, base=args.base)
    size = slim.params_bytes(abstract_params_like(config))
    return (f"wrote {quantize.describe(config)} params directory {args.out} ({', '.join(config.quant_targets)}; "
            f"{size / 2**30:.2f} GiB of weights)")


def _refuse_quantized(weights, command: str) -> None:
    """A quantized directory is an end point: converting it would carry its rounding into the output."""
    from gptj.errors import WeightsError
    from gptj.model import quantized as quantize

    if weights.config.quant_bits:
        raise WeightsError(f"{weights.path} holds {quantize.describe(weights.config)}-quantized weights; {command} "
                           "needs the full-precision weights they were made from")


def _size(text: str) -> int:
    """argparse type of --max_shard_size: bytes, or a usage error."""
    from gptj.weights.formats.hf_files import parse_size

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

    quant = commands.add_parser("quantize", help="weights -> int8 / int4 params directory for inference")
    quant.add_argument("--workdir", required=True,
                       help="training workdir, checkpoint step or params directory (or hf:PATH, mtj:PATH)")
    quant.add_argument("--out", required=True, help="new params directory")
    quant.add_argument("--bits", type=int, default=8, help="8 (int8) or 4 (int4)")
    quant.add_argument("--group_size", type=int, default=None,
                       help="inputs per scale (0: one scale per output channel); default 0 for int8, and for int4 "
                            "128 (or its largest divisor a small model's input dimensions allow)")
    quant.add_argument("--targets", default=",".join(_quant_targets()),
                       help="comma list of the matrices to quantize (default all; drop wte to keep the "
                            "embedding in bf16)")
    quant.add_argument("--base", default=None, help=_BASE_HELP)
    quant.set_defaults(run=_quantize)
    return parser


def _quant_targets() -> tuple[str, ...]:
    from gptj.model.quantized import TARGETS

    return TARGETS


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from gptj.core.storage import quiet_storage_noise
    from gptj.errors import CheckpointDamagedError, GptjError, WeightsError

    if args.verbosity < 1:
        quiet_storage_noise()
    try:
        try:
            print(args.run(args))
        except CheckpointDamagedError as e:  # damage found while streaming: name the intact step to use instead
            from gptj.weights.params_dir import intact_alternative

            raise WeightsError(f"{e}; {intact_alternative(args.workdir, e.path)}" if getattr(args, "workdir", None)
                               else str(e)) from e
    except (GptjError, ValueError, OSError) as e:  # ours; a bad value a library refused; refused files
        if args.verbosity >= 1:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from gptj.core import runtime

    runtime.start_process()  # as main.py does
    sys.exit(main())
