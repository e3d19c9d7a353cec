"""Durable files, manifest and verification."""

from __future__ import annotations

import errno
import os

import pytest

from megalm.checkpoint.files import complete_directory, verify_directory, write_durably


def test_manifest_detects_corruption_missing_and_truncation(tmp_path):
    root = tmp_path / "ck"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"a" * 1000)
    (root / "sub" / "b.bin").write_bytes(b"b" * 10)
    complete_directory(str(root), [], {"step": 1})
    assert {f["path"] for f in verify_directory(str(root))["files"]} == {"a.bin", "sub/b.bin"}
    data = bytearray((root / "a.bin").read_bytes())
    data[500] ^= 1
    (root / "a.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch in a.bin"):
        verify_directory(str(root))
    verify_directory(str(root), full=False)  # same size: only the full check catches a bit flip
    (root / "sub" / "b.bin").write_bytes(b"b" * 9)
    with pytest.raises(ValueError, match="size mismatch in sub/b.bin"):
        verify_directory(str(root), full=False)
    (root / "sub" / "b.bin").unlink()
    with pytest.raises(ValueError, match="missing file sub/b.bin"):
        verify_directory(str(root), full=False)
    (root / "manifest.json").write_text((root / "manifest.json").read_text().replace('"step": 1', '"step": 2'))
    with pytest.raises(ValueError, match="does not match its completion marker"):
        verify_directory(str(root), full=False)
    (root / "COMPLETE").unlink()
    with pytest.raises(ValueError, match="no completion marker"):
        verify_directory(str(root), full=False)


def test_write_durably_reports_the_os_error_not_the_serializers(tmp_path, monkeypatch):
    """torch.save turns a failed write into a vague RuntimeError; the caller must still see
    ENOSPC (the manager's disk-full handling keys on it)."""
    import torch

    path = tmp_path / "x.pt"
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Full(real_open(p, mode, *a, **k))
                        if str(p) == str(path) else real_open(p, mode, *a, **k))
    with pytest.raises(OSError) as info:
        write_durably(str(path), lambda f: torch.save({"w": torch.ones(1000)}, f))
    assert info.value.errno == errno.ENOSPC
