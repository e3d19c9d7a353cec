"""Bad manifests and damaged shards are refused with a message naming the file and the key."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from megalm.config import validate_tree
from megalm.data import DataConfig, Sources, build_loader, load_manifest, open_split
from megalm.errors import UserError
from tests.data.shards import random_docs, write_shard_dir


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    rng = np.random.default_rng(1)
    return write_shard_dir(
        str(tmp_path_factory.mktemp("good")),
        {"train": random_docs(60, rng, 3000, 1, 50), "valid": random_docs(10, rng, 3000, 1, 50)},
        vocab_size=3000,
        shard_docs=25,
    )


@pytest.fixture
def copy_dir(good_dir, tmp_path):
    d = str(tmp_path / "copy")
    shutil.copytree(good_dir, d)
    return d


def _edit_manifest(d: str, edit) -> str:
    path = os.path.join(d, "manifest.json")
    with open(path) as f:
        obj = json.load(f)
    edit(obj)
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def test_good_manifest_opens(good_dir):
    m = load_manifest(good_dir)
    assert m.tokenizer.vocab_size == 3000 and m.tokenizer.eos_id == 2 and m.dtype == "uint16"
    assert set(m.splits) == {"train", "valid"}
    docs = open_split(m, "train", verify=True)
    assert docs.documents == m.splits["train"].documents
    assert docs.tokens == m.splits["train"].tokens


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda o: o.pop("format"), "format"),
        (lambda o: o.__setitem__("format", "other"), "format"),
        (lambda o: o.__setitem__("format_version", 2), "format_version"),
        (lambda o: o["tokenizer"].pop("eos_id"), "tokenizer.eos_id"),
        (lambda o: o["tokenizer"].__setitem__("vocab_size", "8000"), "tokenizer.vocab_size"),
        (lambda o: o["tokenizer"].__setitem__("eos_id", 3000), "tokenizer.eos_id"),
        (lambda o: o.__setitem__("dtype", "int8"), "dtype"),
        (lambda o: o["tokenizer"].__setitem__("vocab_size", 70000), "dtype"),
        (lambda o: o["splits"]["train"].pop("shards"), "splits.train.shards"),
        (lambda o: o["splits"]["train"]["shards"][1].pop("sha256"), "splits.train.shards[1].sha256"),
        (lambda o: o["splits"]["train"]["shards"][0].__setitem__("file", "../x.arrow"), "splits.train.shards[0].file"),
        (lambda o: o["splits"]["train"].__setitem__("documents", 61), "splits.train.documents"),
        (lambda o: o["splits"]["valid"].__setitem__("tokens", -1), "splits.valid.tokens"),
    ],
)
def test_bad_manifest_names_file_and_key(copy_dir, edit, key):
    path = _edit_manifest(copy_dir, edit)
    with pytest.raises(UserError) as exc:
        load_manifest(copy_dir)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: {key}:"), msg
    assert "\n" not in msg


def test_missing_and_unparsable_manifest(copy_dir, tmp_path):
    with pytest.raises(UserError, match="no_such_dir"):
        load_manifest(str(tmp_path / "no_such_dir"))
    path = os.path.join(copy_dir, "manifest.json")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match=f"{path}: not valid JSON"):
        load_manifest(copy_dir)
    os.remove(path)
    with pytest.raises(UserError, match=f"{path}: missing"):
        load_manifest(copy_dir)


def test_unknown_split_lists_the_known_ones(good_dir):
    with pytest.raises(UserError, match=r"splits\.test: no such split \(has: train, valid\)"):
        open_split(load_manifest(good_dir), "test")


def test_truncated_shard_named(copy_dir):
    shard = os.path.join(copy_dir, "train-00001.arrow")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(UserError, match=rf"{shard}: file is {size - 100} bytes, manifest says {size}"):
        build_loader(DataConfig(paths=[copy_dir], seq_len=8), global_batch=2, micro_batch=1)


def test_missing_shard_named(copy_dir):
    shard = os.path.join(copy_dir, "train-00002.arrow")
    os.remove(shard)
    with pytest.raises(UserError, match=rf"{shard}: shard listed in the manifest is missing"):
        open_split(load_manifest(copy_dir), "train")


def test_garbage_shard_named(copy_dir):
    shard = os.path.join(copy_dir, "train-00000.arrow")
    size = os.path.getsize(shard)
    with open(shard, "wb") as f:
        f.write(b"\x07" * size)
    with pytest.raises(UserError, match=rf"{shard}: not a readable Arrow IPC file"):
        open_split(load_manifest(copy_dir), "train")


def test_flipped_token_bytes_caught_by_verify_only(copy_dir):
    shard = os.path.join(copy_dir, "train-00001.arrow")
    with pa.memory_map(shard) as mm:
        values = pa.ipc.open_file(mm).get_batch(0).column(0).values.to_numpy()[:8].tobytes()
    with open(shard, "rb") as f:
        raw = bytearray(f.read())
    at = raw.index(values)  # a token of the data itself, not Arrow metadata
    raw[at] ^= 0x01
    with open(shard, "wb") as f:
        f.write(raw)
    m = load_manifest(copy_dir)
    open_split(m, "train")  # start-up does not read token data: not detected (by design)
    with pytest.raises(UserError, match=rf"{shard}: sha256 is [0-9a-f]{{64}}, manifest says"):
        open_split(m, "train", verify=True)


def test_rows_and_tokens_checked_against_arrow(copy_dir):
    def edit(o):
        sh = o["splits"]["train"]["shards"]
        sh[0]["rows"] += 1
        sh[1]["rows"] -= 1  # split total unchanged: only the per-shard check can see it

    _edit_manifest(copy_dir, edit)
    shard = os.path.join(copy_dir, "train-00000.arrow")
    with pytest.raises(UserError, match=rf"{shard}: has 25 rows, manifest says 26"):
        open_split(load_manifest(copy_dir), "train")

    def edit_tokens(o):
        sh = o["splits"]["train"]["shards"]
        sh[0]["rows"] -= 1
        sh[1]["rows"] += 1
        sh[2]["tokens"] += 5
        o["splits"]["train"]["tokens"] += 5

    _edit_manifest(copy_dir, edit_tokens)
    shard = os.path.join(copy_dir, "train-00002.arrow")
    with pytest.raises(UserError, match=rf"{shard}: has \d+ tokens, manifest says \d+"):
        open_split(load_manifest(copy_dir), "train")


def test_blended_tokenizers_must_match(good_dir, tmp_path):
    rng = np.random.default_rng(2)
    other = write_shard_dir(
        str(tmp_path / "other"), {"train": random_docs(30, rng, 3000, 1, 50)}, vocab_size=3000, tokenizer_bytes=b"another model"
    )
    with pytest.raises(UserError) as exc:
        Sources(DataConfig(paths=[good_dir, other], seq_len=8), "train")
    msg = str(exc.value)
    assert os.path.join(other, "manifest.json") in msg and os.path.join(good_dir, "manifest.json") in msg
    assert "share one tokenizer" in msg


def test_tokenizer_file_checked(copy_dir):
    tok = os.path.join(copy_dir, "tokenizer.model")
    with open(tok, "ab") as f:
        f.write(b"changed")
    Sources(DataConfig(paths=[copy_dir], seq_len=8), "train")  # existence only without verify
    with pytest.raises(UserError, match="tokenizer.sha256"):
        Sources(DataConfig(paths=[copy_dir], seq_len=8, verify=True), "train")
    os.remove(tok)
    with pytest.raises(UserError, match=r"tokenizer\.path: .* does not exist"):
        Sources(DataConfig(paths=[copy_dir], seq_len=8), "train")


def test_out_of_vocab_tokens_caught_by_verify(tmp_path):
    docs = [np.array([5, 6, 2999]), np.array([7, 3000, 8])]
    d = write_shard_dir(str(tmp_path / "oov"), {"train": docs}, vocab_size=65535)
    _edit_manifest(d, lambda o: o["tokenizer"].__setitem__("vocab_size", 3000))
    open_split(load_manifest(d), "train")
    with pytest.raises(UserError, match=r"train-00000\.arrow: record batch 0 holds token id 3000 >= vocab_size 3000"):
        open_split(load_manifest(d), "train", verify=True)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"paths": []}, "data.paths"),
        ({"weights": [1.0, 2.0]}, "data.weights"),
        ({"weights": [0.0]}, r"data.weights\[0\]"),
        ({"seq_len": 0}, "data.seq_len"),
        ({"seed": -1}, "data.seed"),
        ({"split": ""}, "data.split"),
    ],
)
def test_config_errors_name_key(good_dir, kwargs, key):
    args = {"paths": [good_dir], "seq_len": 8, **kwargs}
    with pytest.raises(UserError, match=rf"^run.yaml: {key}: "):
        validate_tree(DataConfig(**args), "run.yaml", "data")


def test_split_too_small_for_one_sample(good_dir):
    with pytest.raises(UserError, match=r"splits\.valid: \d+ tokens \(with EOS\) cannot fill one sample"):
        Sources(DataConfig(paths=[good_dir], seq_len=100_000), "valid")


def test_compressed_shard_refused(tmp_path):
    """A compressed IPC file would be decompressed whole at open: no memory mapping, slow start."""
    rng = np.random.default_rng(4)
    d = write_shard_dir(str(tmp_path / "z"), {"train": random_docs(20, rng, 3000, 5, 50)}, vocab_size=3000, compression="zstd")
    with pytest.raises(UserError, match=r"train-00000\.arrow: record batch 0 is compressed"):
        open_split(load_manifest(d), "train")
