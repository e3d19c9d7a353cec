"""configs/recipe-tiny.yaml: every recipe switch reaches the model and the optimizer, and it trains
through `megalm train` (one process, ZeRO-2 as configured, a shrunken model)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megalm import CONFIGS_DIR
from megalm.train.config import load_config
from megalm.engine.config import to_deepspeed_config
from megalm.train.muon import muon_param_groups
from megalm.train.task import LMTask
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import REPO, cpu_env
from tests.distributed.jobs import small_overrides

RECIPE = CONFIGS_DIR / "recipe-tiny.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus") / "shards"))


def test_recipe_switches_reach_model_and_optimizer(shards):
    cfg = load_config(str(RECIPE), [f"data.paths=[{shards}]"], world_size=2)
    model = LMTask(cfg).build_model()
    c = model.config
    assert (c.qk_norm, c.mlp, c.zero_init_proj, c.logit_softcap, c.tie_embeddings) == (True, "relu2", True, 15.0,
                                                                                       False)
    assert c.value_embeds == 1 and model.layers[3].attention.ve_lambdas is not None
    assert not model.layers[0].attention.wo.weight.any()
    assert cfg.optimizer.name == "muon" and cfg.parallel.zero_stage == 2
    groups = muon_param_groups(model, cfg.optimizer)
    assert groups[0]["use_muon"] and not model.output.weight.use_muon
    assert to_deepspeed_config(cfg, 2)["gradient_clipping"] == 0.0


def test_recipe_trains_through_the_cli(shards, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megalm.cli", "train", str(RECIPE),
                           *small_overrides(shards, "recipe", steps=6)],
                          capture_output=True, text=True, cwd=tmp_path, env=cpu_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs/recipe/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_gpt2_recipe_config_validates_for_8_gpus_and_turns_every_switch_on(shards):
    from megalm.models.llm import LLM

    cfg = load_config(str(CONFIGS_DIR / "recipe-gpt2-124m.yaml"), [f"data.paths=[{shards}]"], world_size=8)
    task = LMTask(cfg)
    with torch.device("meta"):  # the 124M model's shape only: no memory, no init time
        model = task.build_model()
    assert isinstance(model, LLM)
    c = model.config
    assert (c.dim, c.n_layers, c.positions, c.mlp, c.qk_norm, c.zero_init_proj, c.tie_embeddings) == \
        (768, 12, "rope", "relu2", True, True, False)
    assert c.value_embeds == 3 and c.logit_softcap == 15.0
    assert [c.value_embed_table(i) for i in range(12)] == [0, 1, 2] + [None] * 6 + [0, 1, 2]
    assert cfg.optimizer.name == "muon" and cfg.optimizer.grad_clip == 0.0 and cfg.precision.dtype == "bf16"
    assert cfg.grad_accum(8) == 4
    # The blocks' matrices go to Muon; embeddings, value embeddings and head to AdamW.
    groups = muon_param_groups(model, cfg.optimizer)
    muon = {id(p) for p in groups[0]["params"]}
    assert id(model.output.weight) not in muon and id(model.value_embeddings[0].weight) not in muon
    assert id(model.layers[5].feed_forward.w1.weight) in muon
