"""CheckpointManager with real DeepSpeed engines on CPU (gloo), 1 and 2 real ranks.

The toy trainer lives in test_checkpoint_toy.py; each test runs it as subprocesses and checks
what it recorded: state digests at save vs after load (bit-exact), losses of the continued run,
what is on disk, and what was printed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys

import pytest
import torch

from megalm.train.checkpoint import TAG_RE, CheckpointConfig, CheckpointManager, published_tags  # noqa: E402
from megalm.train.checkpoint_files import verify_directory
from megalm.train.checkpoint_universal import needs_universal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_checkpoint_toy import REPO, defaults, digest, run_toy  # noqa: E402


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
            assert f"rank {fail_at[z][1]}: " in err and "No space left on device" in err, err
        assert published_tags(os.path.join(ck, z)) == ["step_00000002"]
        assert open(os.path.join(ck, z, "latest")).read().strip() == "step_00000002"
    for z in stages:
        assert needs_universal(os.path.join(ck, str(z)), dp_world_size=1) is (z > 0)
        assert needs_universal(os.path.join(ck, str(z)), dp_world_size=2) is False
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
    assert out_b.count("removing unfinished checkpoint data") == 4  # the failed saves' .tmp- dirs


def test_keep_last_corrupt_incomplete_and_leftover_tmp_are_handled(tmp_path):
    ck = tmp_path / "ck"
    # Sync saves every step; the one at step 1 fails (disk full): reported, never published.
    a, _ = run_toy(defaults(zero=2, steps=4, save_every=True, keep_last=2, fail_at={"2": [1, 0]}, dir=str(ck),
                            out=str(tmp_path / "a")))
    assert "No space left on device" in a[0]["save_errors"]["1"]
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
    mgr = CheckpointManager(CheckpointConfig(dir=str(ck)), rank=0, world_size=1)
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
        mgr.select("step_00000004")


def _stress_module():
    spec = importlib.util.spec_from_file_location("stress_checkpoint", os.path.join(REPO, "scripts",
                                                                                     "stress_checkpoint.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sigkill_during_saves_never_leaves_a_loadable_corrupt_checkpoint(tmp_path):
    """Three real training processes SIGKILLed at random moments after publishing (sync, async,
    sync), each resuming where the previous one died, then a last run without a kill: every
    published directory verifies, each run resumes from the newest valid checkpoint, and every loss
    printed equals the uninterrupted run's bit for bit."""
    stress = _stress_module()
    reference = stress.reference_losses(str(tmp_path), horizon=40)
    records = stress.chain(str(tmp_path), 3, random.Random(20261123), reference, horizon=40)
    summary = stress.summarize(records)
    assert summary["ok"], json.dumps(summary, indent=1)
    assert summary["killed"] == 3 and summary["resume_checks"] == 3 and summary["corrupt_published"] == 0
