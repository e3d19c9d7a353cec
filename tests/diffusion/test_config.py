"""`task: diffusion` configs: one-line errors naming the key, shards and model checked together."""

from __future__ import annotations

import pytest

from megalm.train.diffusion import DiffusionTask
from megalm.errors import UserError
from megalm.train.config import load_config



@pytest.mark.parametrize("override,key", [
    ("task=gan", "task"), ("diffusion.objective=score", "diffusion.objective"),
    ("diffusion.prediction=x0", "diffusion.prediction"), ("diffusion.class_dropout=1.0", "diffusion.class_dropout"),
    ("diffusion.ema_decay=1.5", "diffusion.ema_decay"), ("diffusion.schedule=sqrt", "diffusion.schedule"),
    ("diffusion.sigma=1", "diffusion.sigma")])
def test_bad_diffusion_settings_name_the_key(override, key):
    with pytest.raises(UserError, match=rf"config: {key}"):
        load_config(None, ["task=diffusion", "data.paths=[x]", "train.steps=1", override])


def test_task_reads_shape_and_classes_from_the_shards(digits):
    cfg = load_config(None, ["task=diffusion", f"data.paths=[{digits}]", "train.steps=1", "model.preset=dit-tiny"])
    task = DiffusionTask(cfg)
    mc = task.model_config
    assert (mc.image_size, mc.channels, mc.num_classes) == (8, 1, 10)
    assert cfg.data.seq_len == 16  # the trainer's tokens per sample = DiT patches
    bad = load_config(None, ["task=diffusion", f"data.paths=[{digits}]", "train.steps=1", "model.preset=dit-tiny",
                             "model.num_classes=1000"])
    with pytest.raises(UserError, match="model.num_classes: 1000 but the image shards have 10"):
        DiffusionTask(bad)
    learned = load_config(None, ["task=diffusion", f"data.paths=[{digits}]", "train.steps=1",
                                 "model.preset=dit-tiny", "model.learn_sigma=true"])
    with pytest.raises(UserError, match="model.learn_sigma"):
        DiffusionTask(learned)


def test_token_shards_are_refused(tmp_path):
    import json

    shards = tmp_path / "tokens"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"format": "megalm-shards", "format_version": 1, "dtype": "uint16",
                                                      "tokenizer": {}, "splits": {}}))
    cfg = load_config(None, ["task=diffusion", f"data.paths=[{shards}]", "train.steps=1"])
    with pytest.raises(UserError, match="kind: expected 'images'"):
        DiffusionTask(cfg)
