"""`megalm export CHECKPOINT --format hf|gguf|diffusers --out DIR`: a checkpoint (any layout:
ZeRO 0-3, pipeline stages; a step folder, checkpoint root or run directory) for serving.

  hf         Hugging Face folder: LlamaForCausalLM / GPT2LMHeadModel, sharded safetensors + index,
             tokenizer (AutoTokenizer), generation config, model card   (megalm/export/hf.py)
  gguf       OUT/model.gguf for llama.cpp, tokenizer inside              (megalm/export/gguf.py)
  diffusers  a DiT checkpoint as diffusers' DiTTransformer2DModel        (megalm/export/diffusers.py)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys

from megalm.cliparse import Parser
from megalm.errors import UserError
from megalm.export.outdir import check_destination

FORMATS = ("hf", "gguf", "diffusers")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str, flag: str) -> int:
    match = _SIZE.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"{flag}: expected a size like 2GB or 500MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def _parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="megalm export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint")
    p.add_argument("--format", required=True, help="hf, gguf or diffusers")
    p.add_argument("--out", required=True, help="output folder (written whole or not at all)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the run's training precision)")
    p.add_argument("--max-shard-size", default="2GiB", help="hf: largest safetensors file (default 2GiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.format not in FORMATS:
        raise UserError(f"--format: unknown format {args.format!r}; expected one of {', '.join(FORMATS)}")
    if args.dtype is not None and args.dtype not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--dtype: expected fp32, bf16 or fp16, got {args.dtype!r}")
    check_destination(args.out, args.overwrite)  # before minutes of reading, not after
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading a checkpoint is CPU work
    with contextlib.redirect_stdout(sys.stderr):  # library chatter stays off stdout
        if args.format == "hf":
            # each format loads only its own writer and that writer's optional dependencies
            from megalm.export.hf import export_hf

            info = export_hf(args.checkpoint, args.out, args.dtype, parse_size(args.max_shard_size, "--max-shard-size"),
                             overwrite=args.overwrite)
            summary = f"{info['arch']}, {info['dtype']}, {info['tensors']} tensors in {info['shards']} shard(s)"
        elif args.format == "gguf":
            # gguf is an optional dependency (the export extra)
            from megalm.export.gguf import export_gguf

            info = export_gguf(args.checkpoint, args.out, args.dtype, overwrite=args.overwrite)
            summary = f"{info['arch']}, {info['dtype']}, {info['tensors']} tensors"
        else:
            try:
                # needs safetensors (the optional export extra)
                from megalm.export.diffusers import export_dit
            except ImportError as exc:
                raise UserError(f"--format diffusers: not available in this installation ({exc})") from None
            export_dit(args.checkpoint, args.out)
            summary = "diffusers DiTTransformer2DModel"
    print(f"exported {os.path.abspath(args.out)} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
