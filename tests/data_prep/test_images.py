"""`megalm prep` for images: round trips (digits, .npz, a class-folder tree), one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.images import load_digits_images
from megalm.cli import main as cli
from megalm.diffusion.data import load_image_manifest, read_split
from megalm.errors import UserError
from megalm.fsio import sha256_file


def _both_splits(out) -> tuple[torch.Tensor, torch.Tensor]:
    m = load_image_manifest(str(out))
    parts = [read_split(m, s, verify=True) for s in ("train", "valid")]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _as_set(pixels: torch.Tensor, labels: torch.Tensor) -> list[tuple[bytes, int]]:
    return sorted((pixels[i].numpy().tobytes(), int(labels[i])) for i in range(len(labels)))


def test_digits_round_trip(tmp_path):
    assert cli(["prep", "builtin:digits", "-o", str(tmp_path / "d"), "--shard-size-mb", "0.02"]) == 0
    m = load_image_manifest(str(tmp_path / "d"))
    assert (m.height, m.width, m.channels, m.num_classes) == (8, 8, 1, 10)
    assert len(m.splits["train"].shards) > 1  # small shards: several files per split
    ref = load_digits_images()
    pixels, labels = _both_splits(tmp_path / "d")
    assert len(labels) == 1797 and pixels.shape[1:] == (1, 8, 8)
    ref_px = torch.from_numpy(ref.pixels).permute(0, 3, 1, 2)
    assert _as_set(pixels, labels) == _as_set(ref_px, torch.from_numpy(ref.labels))
    assert int(pixels.max()) == 255  # 0..16 scaled to the full byte range
    manifest = json.loads((tmp_path / "d/manifest.json").read_text())
    for shard in manifest["splits"]["valid"]["shards"]:
        assert sha256_file(tmp_path / "d" / shard["file"]) == shard["sha256"]
    # Deterministic: the same command gives byte-identical shards.
    assert cli(["prep", "builtin:digits", "-o", str(tmp_path / "e"), "--shard-size-mb", "0.02"]) == 0
    assert json.loads((tmp_path / "e/manifest.json").read_text())["splits"] == manifest["splits"]


def test_verify_finds_a_damaged_shard(tmp_path, capsys):
    out = tmp_path / "d"
    assert cli(["prep", "builtin:digits", "-o", str(out)]) == 0
    assert cli(["prep", "--verify", str(out)]) == 0
    shard = out / json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]
    blob = bytearray(shard.read_bytes())
    blob[-100] ^= 1
    shard.write_bytes(bytes(blob))
    assert cli(["prep", "--verify", str(out)]) == 1
    assert f"{shard}: sha256 does not match the manifest" in capsys.readouterr().out


def test_npz_and_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 6, 6, 3), dtype=np.uint8)
    labels = np.arange(12) % 3
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    assert cli(["prep", str(tmp_path / "a.npz"), "-o", str(tmp_path / "n"), "--valid-fraction", "0.3"]) == 0
    px, lab = _both_splits(tmp_path / "n")
    assert _as_set(px, lab) == _as_set(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels))
    for i, (img, y) in enumerate(zip(images, labels)):
        (tmp_path / "tree" / f"class{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "tree" / f"class{y}" / f"{i}.png")
    assert cli(["prep", "--images", str(tmp_path / "tree"), "-o", str(tmp_path / "f")]) == 0
    px2, lab2 = _both_splits(tmp_path / "f")
    assert _as_set(px2, lab2) == _as_set(px, lab)
    assert load_image_manifest(str(tmp_path / "f")).classes == ("class0", "class1", "class2")


def test_corrupt_image_is_one_clear_line(tmp_path):
    (tmp_path / "tree/cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "tree/cat/ok.png")
    bad = tmp_path / "tree/cat/broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    proc = subprocess.run([sys.executable, "-m", "megalm.cli", "prep", "--images", str(tmp_path / "tree"), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: cannot decode image"), proc.stderr
    assert not (tmp_path / "out/manifest.json").exists()


def test_bad_npz_and_refused_overwrite_name_the_problem(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(UserError, match=r"f.npz: images: expected uint8"):
        cli_raise(["prep", str(tmp_path / "f.npz"), "-o", str(tmp_path / "o")])
    assert cli(["prep", "builtin:digits", "-o", str(tmp_path / "d")]) == 0
    with pytest.raises(UserError, match="--overwrite"):
        cli_raise(["prep", "builtin:digits", "-o", str(tmp_path / "d")])


def cli_raise(argv: list[str]) -> int:
    from data_prep.cli import main

    return main(argv[1:])


def test_unwritable_output_is_one_line_and_leftovers_are_cleared(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=r"--output .*file/d: cannot create or write.*expected a writable directory"):
        cli_raise(["prep", "builtin:digits", "-o", str(tmp_path / "file" / "d")])
    out = tmp_path / "d"
    out.mkdir()
    from megalm.fsio import TMP_PREFIX

    (out / f"{TMP_PREFIX}train-00000.arrow").write_bytes(b"half a shard")  # an interrupted run's write
    assert cli(["prep", "builtin:digits", "-o", str(out)]) == 0
    assert not list(out.glob(f"{TMP_PREFIX}*"))
