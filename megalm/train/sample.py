"""`megalm sample CHECKPOINT --prompt TEXT [...]`: generate from any checkpoint, in one process.

CHECKPOINT is a published checkpoint directory (`.../step_00000100`) or a checkpoint root (its
newest valid checkpoint is used). The checkpoint is verified (checksums) before it is read.
Weights are consolidated without a DeepSpeed engine: ZeRO-1/2/3 from the fp32 optimizer
partitions (DeepSpeed's zero_to_fp32 readers), ZeRO-0 from the module file, pipelines from the
per-layer files. The model config and tokenizer come from what the trainer recorded (the tokenizer's bytes
are stored in the checkpoint too, for when the shard directory has moved).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import os
import sys
from typing import Any

import torch

from megalm.errors import UserError

MODEL_STATES = "mp_rank_00_model_states.pt"


def resolve(path: str) -> tuple[str, str]:
    """(checkpoint root, tag) for a tag directory or a root; verifies the chosen checkpoint."""
    from megalm.train.checkpoint import CheckpointConfig, CheckpointManager, published_tags

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such checkpoint directory")
    if published_tags(path):
        root, tag = path, None
    else:
        root, tag = os.path.dirname(path), os.path.basename(path)
    manager = CheckpointManager(CheckpointConfig(dir=root), rank=0, world_size=1, read_only=True)
    chosen = manager.select(tag)
    if chosen is None:
        raise UserError(f"{path}: no complete, verified checkpoint found")
    return root, chosen[0]


def _client_state(tag_dir: str) -> dict[str, Any]:
    files = [os.path.join(tag_dir, MODEL_STATES)] + sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")))
    for f in files:
        if os.path.exists(f):
            state = torch.load(f, map_location="cpu", weights_only=False)
            if "data" in state and "config" in state:
                return state
    raise UserError(f"{tag_dir}: not a megalm training checkpoint (no model states with run metadata)")


def _pipeline_state(model: torch.nn.Module, tag_dir: str) -> dict[str, torch.Tensor]:
    """Map each layer file of a PipelineModule back onto the plain model's parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for idx, layer in enumerate(model.pipeline_layers()):
        path = os.path.join(tag_dir, f"layer_{idx:02d}-model_states.pt")
        if not os.path.exists(path):
            raise UserError(f"{tag_dir}: pipeline checkpoint lacks {os.path.basename(path)}")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        for local, p in layer.named_parameters(remove_duplicate=False):
            if local not in saved:
                raise UserError(f"{path}: missing parameter {local}")
            out[names[id(p)]] = saved[local]
    return out


def load_model(checkpoint: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The plain LLM with the checkpoint's weights (fp32), and the run's recorded metadata."""
    from megalm.models.config import LLMConfig
    from megalm.models.llm import LLM

    root, tag = resolve(checkpoint)
    tag_dir = os.path.join(root, tag)
    meta = _client_state(tag_dir)
    model = LLM(LLMConfig.from_dict(dict(meta["data"]["model_config"]), source=f"{tag_dir}: model_config"))
    parallel = meta["config"]["parallel"]
    if parallel["pipeline_stages"] > 1:
        state = _pipeline_state(model, tag_dir)
    elif parallel["zero_stage"] >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    else:
        state = meta["module"]
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise UserError(f"{tag_dir}: weights do not fit the recorded model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model.float().eval(), meta


def load_tokenizer(meta: dict[str, Any]):
    """The training run's tokenizer: the recorded file if it is still there and unchanged, else
    the model bytes stored in the checkpoint (shard directory moved); sha256-checked either way."""
    import sentencepiece as spm

    data = meta["data"]
    path, want, stored = data["tokenizer_path"], data["tokenizer_sha256"], data.get("tokenizer_model")
    try:
        blob, problem = open(path, "rb").read(), "changed since training (sha256 differs from the checkpoint's)"
    except OSError as exc:
        blob, problem = None, f"unreadable ({exc.strerror})"
    if blob is not None and hashlib.sha256(blob).hexdigest() == want:
        return spm.SentencePieceProcessor(model_proto=blob)
    if stored is None:
        raise UserError(f"{path}: tokenizer recorded in the checkpoint is {problem}, and the checkpoint "
                        f"stores no copy of it")
    if hashlib.sha256(stored).hexdigest() != want:
        raise UserError(f"{path}: tokenizer is {problem}, and the copy stored in the checkpoint fails its "
                        f"sha256 check")
    return spm.SentencePieceProcessor(model_proto=stored)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megalm sample", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and "--prompt" not in argv and os.path.isdir(first):  # DiT checkpoint: images
        from megalm.diffusion.sample import is_diffusion, main as diffusion_main

        root, tag = resolve(first)
        meta = _client_state(os.path.join(root, tag))
        if is_diffusion(meta):
            return diffusion_main(argv, meta, os.path.join(root, tag))
    args = _parse(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading a checkpoint is CPU work; skip GPU probing
    with contextlib.redirect_stdout(sys.stderr):  # library chatter must not mix with the sample
        model, meta = load_model(args.checkpoint)
    sp = load_tokenizer(meta)
    ids = sp.encode(args.prompt)
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
