"""CheckpointManager: publication and crash recovery in-process, and with real DeepSpeed engines
on CPU (gloo), 1 and 2 real ranks: the toy trainer (tests/checkpoint/toy.py) runs as subprocesses
and each test checks what it recorded: state digests at save vs after load (bit-exact), losses of
the continued run, what is on disk, and what was printed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

import pytest
import torch

import megalm.checkpoint.manager as ckpt
from megalm.checkpoint.config import CheckpointConfig
from megalm.checkpoint.files import FileEntry, read_manifest, verify_directory
from megalm.checkpoint.layout import TAG_RE, CheckpointError, published_tags
from megalm.engine.checkpointing import DeepSpeedCheckpointManager
from megalm.engine.layout import conversion_needed
from tests.checkpoint.toy import defaults, digest, run_toy


def _needs_universal(ckdir: str, dp_world_size: int) -> bool:
    return conversion_needed(read_manifest(os.path.join(ckdir, published_tags(ckdir)[-1])), dp_world_size)


def _files(ckdir: str) -> dict[str, str]:
    manifest = verify_directory(ckdir)
    return {f["path"]: f["sha256"] for f in manifest["files"]}


def test_roundtrip_async_and_exact_resume_zero_0_to_3_and_pipeline_on_two_ranks(tmp_path):
    """Per ZeRO stage and for a 2-stage pipeline (ZeRO-1), 2 ranks: async saves at steps 2 and 3
    (with a sync twin of each), then a fresh engine resumes step 3: weights + optimizer state
    bit-identical, same losses and final state as the uninterrupted run. The async writer is held
    until training has moved on."""
    stages = [0, 1, 2, 3, "pp"]
    args = defaults(stages=stages, steps=5, save_at=[2, 3], dir=str(tmp_path / "ck"), twin_dir=str(tmp_path / "twin"),
                    out=str(tmp_path / "out"), reload=True, block_writer=True, **{"async": True})
    recs, _ = run_toy(args, nproc=2, timeout=600)
    for z in map(str, stages):
        for rank, rec in enumerate(recs):
            first, again = rec[z], rec[f"{z}/reload"]
            where = f"zero {z} rank {rank}"
            # async: save() returned while the writer was held, training went on, nothing was published
            assert first["published_while_held"]["2"] is False, where
            assert first["steps_while_held"][0] == 3, where
            assert again["loaded_step"] == 3, where
            assert again["client_state"] == {"step": 3, "note": ""}, where
            assert again["after_load"] == first["at_save"]["3"], f"{where}: state differs after load"
            assert again["losses"] == {k: v for k, v in first["losses"].items() if int(k) > 3}, where
            assert again["final_state"] == first["final_state"], where
        ck, twin = tmp_path / "ck" / z, tmp_path / "twin" / z
        assert published_tags(str(ck)) == ["step_00000002", "step_00000003"]
        assert (ck / "latest").read_text().strip() == "step_00000003"
        for tag in ("step_00000002", "step_00000003"):
            assert _files(str(ck / tag)) == _files(str(twin / tag)), f"zero {z}: async and sync files differ"
        manifest = verify_directory(str(ck / "step_00000003"))
        expect = (1, 1, 2) if z == "pp" else (int(z), 2, 1)
        assert (manifest["zero_stage"], manifest["dp_world_size"], manifest["pipeline_stages"]) == expect
        if z == "pp":
            assert any(f["path"].startswith("layer_") for f in manifest["files"])


def test_dp_size_change_2_to_1_to_2_via_automatic_universal_conversion(tmp_path):
    """ZeRO 0-3: saved on 2 ranks, resumed on 1 (weights exact, Adam state carried: losses match the
    2-rank run), saved again, resumed on 2. Conversion happens without any user step."""
    stages = [0, 1, 2, 3]
    ck = str(tmp_path / "ck")
    # Async saves. A disk "fills up" during the background write of step 3 on rank 1 (rank 0 under
    # ZeRO-0, where rank 1 writes no file): nothing is published, both ranks get the error from
    # wait(), training goes on.
    fail_at = {"0": [3, 0], "1": [3, 1], "2": [3, 1], "3": [3, 1]}
    a, _ = run_toy(defaults(stages=stages, steps=4, save_at=[2, 3], fail_at=fail_at, dir=ck, out=str(tmp_path / "a"),
                            **{"async": True}), nproc=2, timeout=600)
    for z in map(str, stages):
        for rank in (0, 1):
            err = a[rank][z]["save_errors"]["3"]
            # A full disk with no older checkpoint to prune: one line naming the volume, the
            # failing rank and file, and that the previous checkpoint is intact.
            assert "disk full on " in err and f"first failure: rank {fail_at[z][1]}, " in err, err
            assert "step_00000002 is intact" in err and "checkpoint.keep_last" in err, err
        assert published_tags(os.path.join(ck, z)) == ["step_00000002"]
        assert open(os.path.join(ck, z, "latest")).read().strip() == "step_00000002"
    for z in stages:
        assert _needs_universal(os.path.join(ck, str(z)), dp_world_size=1) is (z > 0)
        assert _needs_universal(os.path.join(ck, str(z)), dp_world_size=2) is False
    b, out_b = run_toy(defaults(stages=stages, steps=4, save_at=[4], resume=True, dir=ck, out=str(tmp_path / "b")),
                       nproc=1, timeout=600)
    c, _ = run_toy(defaults(stages=stages, steps=4, resume=True, dir=ck, out=str(tmp_path / "c")), nproc=2,
                   timeout=600)
    for z in map(str, stages):
        assert b[0][z]["loaded_step"] == 2
        assert b[0][z]["weights_after_load"] == a[0][z]["weights_at_save"]["2"], f"zero {z}: 2->1 weights"
        for step in ("3", "4"):
            got, want = float.fromhex(b[0][z]["losses"][step]), float.fromhex(a[0][z]["losses"][step])
            assert got == pytest.approx(want, rel=1e-5), f"zero {z} step {step}: optimizer state not carried"
        for rank in (0, 1):
            assert c[rank][z]["loaded_step"] == 4
            assert c[rank][z]["weights_after_load"] == b[0][z]["weights_at_save"]["4"], f"zero {z}: 1->2 weights"
        for tag in ("step_00000002", "step_00000004"):
            cache = os.path.join(ck, z, ".universal", tag)
            assert os.path.isdir(cache) is (z != "0"), f"zero {z}: universal cache {tag}"
            if z != "0":
                verify_directory(cache)
    assert out_b.count("to a universal checkpoint") == 3
    assert out_b.count("removing unfinished checkpoint data") == 0  # a disk-full save removes its own


def test_keep_last_corrupt_incomplete_and_leftover_tmp_are_handled(tmp_path):
    ck = tmp_path / "ck"
    # Sync saves every step; the one at step 1 fails (disk full): reported, never published.
    a, _ = run_toy(defaults(zero=2, steps=4, save_every=True, keep_last=2, fail_at={"2": [1, 0]}, dir=str(ck),
                            out=str(tmp_path / "a")))
    assert "disk full on " in a[0]["save_errors"]["1"]
    assert published_tags(str(ck)) == ["step_00000003", "step_00000004"]
    assert (ck / "latest").read_text().strip() == "step_00000004"
    # DeepSpeed copies its consolidation scripts on every ZeRO save; they belong to each checkpoint
    # (in its manifest, published with it), never loose in the root.
    stray = [n for n in os.listdir(ck) if not (TAG_RE.match(n) or n == "latest" or n.startswith("."))]
    assert not stray, stray
    for tag in published_tags(str(ck)):
        assert {"zero_to_fp32.py", "zero_to_torch.py"} <= set(_files(str(ck / tag))), tag
    # ... and the copy inside a checkpoint still consolidates it offline, to the weights saved.
    # (Its CLI's default --max_shard_size needs huggingface_hub, not a megalm dependency: call the
    # copied file's converter with max_shard_size=None, the unsharded path.)
    spec = importlib.util.spec_from_file_location("copied_zero_to_fp32", ck / "step_00000003" / "zero_to_fp32.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fp32 = tmp_path / "fp32"
    script.convert_zero_checkpoint_to_fp32_state_dict(str(ck), str(fp32), max_shard_size=None, tag="step_00000003")
    consolidated = torch.load(fp32 / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert digest(consolidated) == a[0]["weights_at_save"]["3"]
    # Damage the newest: one flipped byte in the middle of the optimizer shard (size unchanged).
    victim = ck / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    # A newer directory under a final name but never completed, and a crash leftover.
    (ck / "step_00000005").mkdir()
    (ck / "step_00000005" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (ck / ".tmp-step_00000006").mkdir()
    (ck / ".tmp-step_00000006" / "junk.pt").write_bytes(b"x" * 100)
    mgr = DeepSpeedCheckpointManager(CheckpointConfig(dir=str(ck)), rank=0, world_size=1)
    assert mgr.list_valid() == ["step_00000003", "step_00000004"]  # cheap check: sizes still match

    b, out = run_toy(defaults(zero=2, steps=6, resume=True, dir=str(ck), out=str(tmp_path / "b")))
    warnings = [line for line in out.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert len(warnings) == 2, out[-3000:]
    assert "step_00000005: no completion marker" in warnings[0]
    assert "step_00000004: checksum mismatch in zero_pp_rank_0_mp_rank_00_optim_states.pt" in warnings[1]
    assert b[0]["loaded_step"] == 3
    assert b[0]["after_load"] == a[0]["at_save"]["3"]
    assert b[0]["losses"]["4"] == a[0]["losses"]["4"]
    assert not (ck / ".tmp-step_00000006").exists()
    with pytest.raises(Exception, match="step_00000004: not loadable"):
        mgr.reader.select("step_00000004")


def _stage(ckdir, tag: str, payload: bytes):
    """A written-but-unpublished checkpoint `.tmp-<tag>` holding one file; returns (root, entries)."""
    root = ckdir / f".tmp-{tag}"
    root.mkdir()
    (root / "w.bin").write_bytes(payload)
    return str(root), [FileEntry("w.bin", len(payload), hashlib.sha256(payload).hexdigest())]


class _Crash(BaseException):
    pass


@pytest.mark.parametrize("crash_at", ["before_rename_in", "after_rename_in", "none"])
def test_resave_of_a_step_never_loses_it(tmp_path, monkeypatch, crash_at):
    """keep_last=1, step 5 saved again (a resumed run): a crash at any point of the replacement
    leaves the old or the new step_5 after the next start, never none."""
    tag = "step_00000005"
    mgr = DeepSpeedCheckpointManager(CheckpointConfig(dir=str(tmp_path), keep_last=1), rank=0, world_size=1)
    mgr.start()
    mgr._publish(tag, *_stage(tmp_path, tag, b"old"), {"step": 5})
    root, entries = _stage(tmp_path, tag, b"new")
    real_rename = os.rename
    if crash_at == "before_rename_in":  # the old one is set aside, the new one not yet in place
        def rename(src, dst):
            if src == root:
                raise _Crash()
            return real_rename(src, dst)
        monkeypatch.setattr(os, "rename", rename)
    elif crash_at == "after_rename_in":  # the new one is in place, the old one not yet deleted
        def latest(*a):
            raise _Crash()
        monkeypatch.setattr(ckpt, "atomic_write", latest)
    if crash_at == "none":
        mgr._publish(tag, root, entries, {"step": 5})
    else:
        with pytest.raises(_Crash):
            mgr._publish(tag, root, entries, {"step": 5})
        assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-old-step_00000005-")]
    monkeypatch.undo()
    mgr.close()  # the crashed process is gone: the kernel drops its lock
    again = DeepSpeedCheckpointManager(CheckpointConfig(dir=str(tmp_path), keep_last=1), rank=0, world_size=1)
    again.start()
    assert again.list_valid() == [tag]
    want = b"old" if crash_at == "before_rename_in" else b"new"
    assert (tmp_path / tag / "w.bin").read_bytes() == want
    assert again.reader.select()[0] == tag  # fully verified
    assert sorted(os.listdir(tmp_path)) == [".lock", "latest", tag]  # nothing set aside is left over


def test_read_only_manager_never_cleans_or_writes(tmp_path):
    # Resuming from another run's folder (or sampling a live run) must not delete that run's
    # in-progress save, which is what a `.tmp-*` directory may be.
    live = tmp_path / ".tmp-step_00000007"
    live.mkdir()
    (live / "part.pt").write_bytes(b"in progress")
    reader = DeepSpeedCheckpointManager(CheckpointConfig(dir=str(tmp_path)), rank=0, world_size=1, read_only=True)
    reader.start()
    assert (live / "part.pt").read_bytes() == b"in progress"
    with pytest.raises(CheckpointError):
        reader.save(None, 8, {})
    owner = DeepSpeedCheckpointManager(CheckpointConfig(dir=str(tmp_path)), rank=0, world_size=1)
    owner.start()
    assert not live.exists()
