"""`megalm sample CHECKPOINT --prompt TEXT [...]`: generate from any checkpoint, in one process.

CHECKPOINT is a published checkpoint directory (`.../step_00000100`), a checkpoint root or a run
directory (the newest valid checkpoint is used). Reading is megalm.models.load's job through
megalm.engine.layout (verified, consolidated from any layout, never running code from the files). A diffusion (DiT)
checkpoint, given without --prompt, samples an image grid instead (megalm/diffusion/sample.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

from data_prep.chat import ChatTemplate
from megalm.cliparse import Parser
from megalm.diffusion.sample import is_diffusion
from megalm.diffusion.sample import main as diffusion_main
from megalm.diffusion.sample import parser as diffusion_parser
from megalm.engine.layout import read_client_state
from megalm.errors import UserError
from megalm.models.load import load_model, load_tokenizer


def _parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="megalm sample", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true",
                   help="an SFT checkpoint: wrap --prompt as a user turn in the run's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _diffusion_checkpoint(argv: list[str]) -> tuple[str, dict] | None:
    """(tag dir, client state) when argv names a DiT checkpoint without --prompt, else None.

    The checkpoint is found by the DiT sampler's own parser, so its options may stand anywhere."""
    if any(a in ("-h", "--help") or a == "--prompt" or a.startswith("--prompt=") for a in argv):
        return None

    try:
        checkpoint = diffusion_parser().parse_known_intermixed_args(argv)[0].checkpoint
    except UserError:
        return None
    if not os.path.isdir(checkpoint):
        return None
    tag_dir, meta = read_client_state(checkpoint)
    return (tag_dir, meta) if is_diffusion(meta) else None


def main(argv: list[str]) -> int:
    dit = _diffusion_checkpoint(argv)
    if dit is not None:  # a DiT checkpoint: an image grid

        return diffusion_main(argv, dit[1], dit[0])
    args = _parse(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading a checkpoint is CPU work; skip GPU probing
    with contextlib.redirect_stdout(sys.stderr):  # library chatter must not mix with the sample
        model, meta = load_model(args.checkpoint)
    sp = load_tokenizer(meta)
    prompt = args.prompt
    if args.chat:
        template = meta["data"].get("chat_template")
        if template is None:
            raise UserError(f"--chat: {args.checkpoint} is not an SFT checkpoint (no chat template recorded)")

        prompt = ChatTemplate(**template).prompt([("user", prompt)])
    ids = sp.encode(prompt)
    if not ids:
        raise UserError("--prompt: encodes to no tokens")
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, eos_id=meta["data"]["eos_id"], generator=gen)
    # Decode prompt + continuation together: sentencepiece drops a piece's leading space when it
    # starts the decoded text, which would glue the first new word onto the prompt.
    print(sp.decode(out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
