import os

import pytest

from megalm.fsio import TMP_PREFIX, atomic_write, sha256_file


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    atomic_write(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_failed_write_keeps_the_old_content_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("step_00000100")

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "step_00000200")
    assert target.read_text() == "step_00000100"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_sha256_file(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_read_checked_returns_bytes_or_refuses_in_one_line(tmp_path):
    import hashlib

    import pytest

    from megalm.errors import UserError
    from megalm.fsio import read_checked

    f = tmp_path / "tokenizer.model"
    f.write_bytes(b"model")
    good = hashlib.sha256(b"model").hexdigest()
    assert read_checked(f, good, "m.json: tokenizer.sha256") == b"model"
    with pytest.raises(UserError, match=r"^m.json: tokenizer.sha256: .*tokenizer.model hashes to [0-9a-f]{64}, not 0+$"):
        read_checked(f, "0" * 64, "m.json: tokenizer.sha256")
    with pytest.raises(UserError, match=r"^m.json: tokenizer.sha256: cannot read .*missing"):
        read_checked(tmp_path / "missing", good, "m.json: tokenizer.sha256")
