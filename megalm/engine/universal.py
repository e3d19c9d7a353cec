"""Loading a checkpoint on a different data-parallel size: automatic universal conversion.

ZeRO-1/2/3 (and DeepSpeed's bf16 optimizer) shard the optimizer state into one file per DP rank;
DeepSpeed refuses to load those on another DP size. DeepSpeed's `ds_to_universal` turns them into
per-parameter files any DP size can load (with `checkpoint.load_universal`). We run it on rank 0,
into `<checkpoint dir>/.universal/<tag>` (written under a .tmp- name, manifest + marker like a
checkpoint, then renamed), and reuse that cache on later loads. ZeRO-0 keeps the whole optimizer
state in one file, loadable on any DP size, so it never needs conversion.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

from megalm.checkpoint.files import MARKER, complete_directory, fsync_dir, read_manifest, remove_tree, verify_directory
from megalm.checkpoint.layout import CACHE
from megalm.engine.layout import check
from megalm.engine.muon_universal import prepare_source

UNIVERSAL_INFO_KEY = "universal_checkpoint_info"  # ds_to_universal asserts it is in client state
UNIVERSAL_INFO = {"universal_checkpoint_version": 0.2}


def _convert(source: str, out: str) -> None:
    """DeepSpeed's converter, in this process (no second interpreter to start), its chatter
    captured and shown only if it fails. One worker: no process pool inside a training rank."""
    # DeepSpeed takes seconds to import: only the code paths that use it pay for it
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=source, output_folder=out, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            ds_to_universal.main(args)
    except Exception as exc:
        tail = " | ".join(chatter.getvalue().strip().splitlines()[-3:])
        raise RuntimeError(f"universal conversion of {source} failed: {type(exc).__name__}: {exc} ({tail})") from exc


def _marker_of(path: str) -> str:
    with open(os.path.join(path, MARKER)) as f:
        return f.read().strip()


def ensure_universal(ckpt_dir: str, tag: str) -> str:
    """Return the directory to pass to load_checkpoint (with `tag`) for the universal form of
    `ckpt_dir/tag`, converting it first unless a valid cached conversion of it exists."""
    source = os.path.join(ckpt_dir, tag)
    source_marker = _marker_of(source)
    cache = os.path.join(ckpt_dir, CACHE)
    final = os.path.join(cache, tag)
    if os.path.isdir(final):
        try:
            if read_manifest(final).get("source_marker") == source_marker:
                verify_directory(final, full=True)
                check(final)  # DeepSpeed's universal loader unpickles with weights_only=False
                return cache
        except ValueError:
            pass
        remove_tree(final)  # stale (source re-saved) or damaged: convert again
    check(source)  # ds_to_universal unpickles with weights_only=False
    os.makedirs(cache, exist_ok=True)
    work = os.path.join(cache, f".tmp-{tag}")
    remove_tree(work)
    os.makedirs(work)
    # ds_to_universal also writes `latest_universal` next to its output: keep that inside `work`.
    out = os.path.join(work, tag)
    print(f"converting checkpoint {source} to a universal checkpoint (data- or tensor-parallel size changed)", file=sys.stderr,
          flush=True)
    _convert(prepare_source(source, work), out)  # Muon's momentum rides as Adam's exp_avg
    complete_directory(out, [], {"source_tag": tag, "source_marker": source_marker})
    os.rename(out, final)
    fsync_dir(cache)
    remove_tree(work)
    return cache
