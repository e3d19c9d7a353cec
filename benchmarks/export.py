#!/usr/bin/env python
"""`megalm export --format hf` speed and peak memory against model size, beside a load-everything baseline.

  python benchmarks/export.py [--out benchmarks/results/export.json] [--keep DIR]

Two megalm checkpoints of random weights (fp32, ZeRO-0 layout, the run's precision recorded as
bf16 as on a GPU run, so the export writes bf16 by default): GPT-2 124M (gpt2-124m preset ->
GPT2LMHeadModel) and a 1.16B Llama-style model (2.3 GB of bf16: two 2 GiB default shards). Each measurement runs
in a fresh process:
  - megalm: `export_hf` at its defaults (checksum verification, streaming, 2 GiB shards);
  - load_all (baseline, same run): the whole model consolidated in memory
    (megalm.models.load.load_model, verified the same way), cast, then
    `safetensors.torch.save_file` of the full HF state dict — what conversion scripts do.
Reported per model: output GB, seconds, GB/s (output bytes / wall time), peak RSS
(VmHWM) and RSS after imports, the largest tensor (fp32, as read) and largest written shard, and
`peak_rss_over_largest_tensor_plus_shard_ratio` = (peak RSS - RSS after imports) /
(largest tensor + largest shard): near 1 means memory is what the streaming design promises.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODELS = {
    "gpt2-124m": {"preset": "gpt2-124m"},
    "llama-1.2b": {"inline": dict(vocab_size=32000, dim=2048, n_layers=20, n_heads=16, n_kv_heads=16, mlp="swiglu",
                                   mlp_hidden=5632, norm="rmsnorm", positions="rope", max_seq_len=2048)},
}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def make_checkpoint(name: str, out: str, tok_blob: bytes) -> None:
    import hashlib

    import torch

    from megalm.export.import_hf import write_checkpoint
    from megalm.models.config import LLMConfig
    from megalm.models.llm import LLM
    from megalm.models.presets import load_preset

    spec = MODELS[name]
    cfg = load_preset(spec["preset"]) if "preset" in spec else LLMConfig(**spec["inline"])
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LLM(cfg)
    module = {k: torch.randn(v.shape) * 0.02 for k, v in model.state_dict().items()}
    tok_path = os.path.join(os.path.dirname(out), "tokenizer.model")
    data = {"tokenizer_path": tok_path, "tokenizer_sha256": hashlib.sha256(tok_blob).hexdigest(),
            "tokenizer_model": tok_blob, "vocab_size": cfg.vocab_size, "eos_id": 2, "model_config": cfg.to_dict()}
    write_checkpoint(out, module, data, {"benchmark": name}, precision="bf16")


def run_child(mode: str, checkpoint: str, out: str) -> dict:
    """In a fresh process: (rss after imports, peak rss, seconds, stats)."""
    import torch  # noqa: F401  (imports are part of the baseline RSS, not of the export)

    from megalm.models.load import load_model
    from megalm.export.arch import architecture, to_hf
    from megalm.export.hf import export_hf

    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401  (tokenizers, loaded by the export)

    base = _status_kib("VmRSS")
    start = time.perf_counter()
    if mode == "megalm":
        stats = export_hf(checkpoint, out)
    else:
        import torch

        model, meta = load_model(checkpoint)
        arch = architecture(model.config, checkpoint)
        state = dict(to_hf(((k, v.to(torch.bfloat16)) for k, v in model.state_dict().items()), model.config, arch))
        os.makedirs(out)
        safetensors.torch.save_file(state, os.path.join(out, "model.safetensors"))
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        stats = {"bytes": nbytes, "largest_shard_bytes": nbytes, "shards": 1,
                 "largest_tensor_bytes": max(t.numel() * t.element_size() for t in state.values())}
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries a parent's peak into ru_maxrss across fork + exec.
    peak = _status_kib("VmHWM")
    return {"rss_after_imports_kib": base, "peak_rss_kib": peak, "seconds": seconds, **stats}


def measure(mode: str, checkpoint: str, out: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, __file__, "--child", mode, checkpoint, out], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} export failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tokenizer_blob() -> bytes:
    import sentencepiece as spm

    from tests.distributed.corpus import _paragraphs

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_paragraphs(2000)), model_writer=model, vocab_size=4000,
                                   model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2,
                                   num_threads=2)
    return model.getvalue()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--keep", default=None, help="scratch folder (default: a temporary one, deleted)")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    p.add_argument("--make", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make:
        with open(args.make[2], "rb") as f:
            make_checkpoint(args.make[0], args.make[1], f.read())
        return
    if args.child:
        print(json.dumps(run_child(*args.child)))
        return
    scratch = args.keep or tempfile.mkdtemp(prefix="megalm-export-bench-")
    results = {}
    try:
        blob = tokenizer_blob()
        for name in MODELS:
            ck = os.path.join(scratch, name)
            if not os.path.exists(ck):  # in a child: this process stays small while measuring
                tok = os.path.join(scratch, "tokenizer.model")
                with open(tok, "wb") as f:
                    f.write(blob)
                env = dict(os.environ, PYTHONPATH=REPO)
                subprocess.run([sys.executable, __file__, "--make", name, ck, tok], env=env, check=True)
            row = {}
            for mode in ("megalm", "load_all"):
                out = os.path.join(scratch, f"{name}-{mode}")
                shutil.rmtree(out, ignore_errors=True)
                r = measure(mode, ck, out)
                shutil.rmtree(out, ignore_errors=True)
                gib = 1 << 30
                largest_read = r["largest_tensor_bytes"] * 2  # read as fp32, written as bf16
                row[mode] = {"output_gb": r["bytes"] / 1e9, "seconds": round(r["seconds"], 2),
                             "gb_per_s": round(r["bytes"] / 1e9 / r["seconds"], 3),
                             "peak_rss_gib": round(r["peak_rss_kib"] / (1 << 20), 3),
                             "rss_after_imports_gib": round(r["rss_after_imports_kib"] / (1 << 20), 3),
                             "largest_tensor_fp32_gib": round(largest_read / gib, 3),
                             "largest_shard_gib": round(r["largest_shard_bytes"] / gib, 3), "shards": r["shards"]}
                grown = (r["peak_rss_kib"] - r["rss_after_imports_kib"]) * 1024
                row[mode]["peak_rss_over_largest_tensor_plus_shard_ratio"] = round(
                    grown / (largest_read + r["largest_shard_bytes"]), 3)
            row["peak_rss_load_all_over_megalm_ratio"] = round(row["load_all"]["peak_rss_gib"] / row["megalm"]["peak_rss_gib"], 3)
            row["speedup_vs_load_all"] = round(row["load_all"]["seconds"] / row["megalm"]["seconds"], 3)
            results[name] = row
            print(json.dumps({name: row}), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    report = {"benchmark": "export", "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "format": "hf", "dtype": "bf16 (default)",
              "models": results}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
