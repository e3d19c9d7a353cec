"""CheckpointConfig: the YAML `checkpoint:` section and the manager's config are one class."""

from __future__ import annotations

import pytest

from megalm.checkpoint.config import CheckpointConfig
from megalm.config import validate_tree
from megalm.errors import UserError
from megalm.train.config import load_config


@pytest.mark.parametrize("kw, key", [({"keep_last": 0}, "checkpoint.keep_last"),
                                     ({"interval": -5}, "checkpoint.interval"),
                                     ({"interval": True}, "checkpoint.interval"),
                                     ({"dir": 3}, "checkpoint.dir"),
                                     ({"async_save": "yes"}, "checkpoint.async_save")])
def test_config_rejects_bad_values_naming_the_key(kw, key):
    with pytest.raises(UserError, match=f"run.yaml: {key}"):
        validate_tree(CheckpointConfig(**kw), "run.yaml", "checkpoint")


def test_yaml_section_is_the_manager_config(tmp_path):
    cfg = load_config(None, ["data.paths=[x]", "train.steps=1", "checkpoint.keep_last=2", "checkpoint.async_save=true"])
    assert type(cfg.checkpoint) is CheckpointConfig
    assert (cfg.checkpoint.keep_last, cfg.checkpoint.async_save) == (2, True)
    with pytest.raises(UserError, match="config: checkpoint.keep_last: expected an integer >= 1"):
        load_config(None, ["data.paths=[x]", "train.steps=1", "checkpoint.keep_last=0"])
