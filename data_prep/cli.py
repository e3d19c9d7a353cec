"""`megalm prep`: command-line entry (see `megalm prep --help`)."""

from __future__ import annotations

import sys

from megalm.cliparse import Parser
from megalm.errors import UserError

from .config import PrepConfig
from .images import main as images_main
from .images import wants_images
from .manifest import verify
from .pipeline import run
from .sft import main as sft_main
from .sft import wants_sft
from .tokenizer import TokenizerSpec


def _parser() -> Parser:
    p = Parser(prog="megalm prep", description=(
        "Tokenize corpora into Arrow shards + manifest.json (docs/interfaces.md). Inputs: "
        ".jsonl[.gz|.zst], .parquet, .txt (one document per file), directories, globs, "
        "builtin:python-docs. Re-running the same command resumes an interrupted run."))
    p.add_argument("inputs", nargs="*", help="files, directories, globs, builtin:python-docs")
    p.add_argument("-o", "--output", help="output folder")
    p.add_argument("--verify", metavar="DIR", help="re-check every shard of DIR and exit")
    p.add_argument("--text-key", default="text", help="JSON key / Parquet column (default text)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", metavar="MODEL", help="existing sentencepiece .model to use")
    g.add_argument("--tokenizer-type", default="bpe", choices=["bpe", "unigram"])
    g.add_argument("--vocab-size", type=int, default=32000)
    g.add_argument("--byte-fallback", action="store_true")
    g.add_argument("--special-tokens", default="", help="comma-separated user-defined symbols")
    g.add_argument("--strict-vocab", action="store_true",
                   help="fail if the corpus is too small for --vocab-size (default: warn)")
    g.add_argument("--tokenizer-sample-mb", type=float, default=10.0,
                   help="text sampled (by document hash) for training (default 10)")
    o = p.add_argument_group("output")
    o.add_argument("--workers", type=int, default=1, help="processes on this node")
    o.add_argument("--valid-fraction", type=float, default=0.005)
    o.add_argument("--shard-size-mb", type=float, default=16.0,
                   help="target shard size (estimated at ~4 characters per token)")
    o.add_argument("--dedup", action="store_true", help="drop exact duplicates (first kept)")
    o.add_argument("--min-chars", type=int, default=1)
    o.add_argument("--min-tokens", type=int, default=0)
    o.add_argument("--skip-bad", action="store_true",
                   help="skip malformed / non-UTF-8 JSONL lines (counted) instead of failing")
    o.add_argument("--max-document-mb", type=float, default=64.0,
                   help="refuse a larger document (JSON line, .txt file, Parquet value); "
                        "bounds memory (default 64)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's output in --output")
    return p


def main(argv: list[str]) -> int:
    if wants_sft(argv):  # instruction data with a loss mask: data_prep/sft.py

        return sft_main(argv)

    if wants_images(argv):  # images (diffusion) have their own options: data_prep/images.py

        return images_main(argv)
    args = _parser().parse_args(argv)
    if args.verify:
        problems = verify(args.verify)
        for line in problems:
            print(line)
        if problems:
            print(f"{args.verify}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        print(f"{args.verify}: ok")
        return 0
    if not args.output:
        raise UserError("megalm prep: --output is required (or --verify DIR)")
    specials = tuple(t for t in args.special_tokens.split(",") if t)
    cfg = PrepConfig(
        inputs=tuple(args.inputs), output=args.output, text_key=args.text_key,
        tokenizer=args.tokenizer,
        tokenizer_spec=TokenizerSpec(args.tokenizer_type, args.vocab_size, args.byte_fallback,
                                     specials),
        tokenizer_sample_mb=args.tokenizer_sample_mb, workers=args.workers,
        valid_fraction=args.valid_fraction, shard_size_mb=args.shard_size_mb, dedup=args.dedup,
        min_chars=args.min_chars, min_tokens=args.min_tokens, skip_bad=args.skip_bad,
        overwrite=args.overwrite, max_document_mb=args.max_document_mb,
        strict_vocab=args.strict_vocab)

    run(cfg)
    return 0
