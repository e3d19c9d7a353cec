"""Per-shard `max_token_id` (written by `megalm prep`) against the model's vocabulary."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megalm.data.manifest import check_token_ids, load_manifest
from megalm.errors import UserError
from tests.data.shards import random_docs, write_shard_dir


@pytest.fixture
def shard_dir(tmp_path):
    rng = np.random.default_rng(0)
    return write_shard_dir(str(tmp_path / "d"), {"train": random_docs(20, rng, 500, 1, 20),
                                                 "valid": random_docs(4, rng, 500, 1, 20)},
                           vocab_size=500, shard_docs=10)


def _set_max(d: str, split: str, i: int, value) -> None:
    path = os.path.join(d, "manifest.json")
    obj = json.loads(open(path).read())
    obj["splits"][split]["shards"][i]["max_token_id"] = value
    with open(path, "w") as f:
        json.dump(obj, f)


def test_recorded_max_id_is_read_and_checked(shard_dir):
    _set_max(shard_dir, "train", 0, 10)
    _set_max(shard_dir, "train", 1, 499)
    m = load_manifest(shard_dir)
    assert m.splits["train"].shards[1].max_token_id == 499
    assert m.splits["valid"].shards[0].max_token_id is None  # older manifests: absent
    check_token_ids([m], 500)
    with pytest.raises(UserError) as err:
        check_token_ids([m], 499)
    msg = str(err.value)
    assert "\n" not in msg and m.splits["train"].shards[1].file in msg
    assert "token id 499" in msg and "vocab_size is 499" in msg


def test_old_manifest_falls_back_to_the_tokenizer_vocab(shard_dir):
    m = load_manifest(shard_dir)
    check_token_ids([m], 500)
    with pytest.raises(UserError, match=r"train-00000.*up to 499.*vocab_size is 400"):
        check_token_ids([m], 400)


def test_bad_max_id_names_the_key(shard_dir):
    _set_max(shard_dir, "valid", 0, -1)
    with pytest.raises(UserError, match=r"splits\.valid\.shards\[0\]\.max_token_id"):
        load_manifest(shard_dir)
