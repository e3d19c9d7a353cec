"""DiT -> diffusers, checked by diffusers itself: `DiTTransformer2DModel.from_pretrained` on the
export gives megalm's output in fp32 (max abs diff <= 1e-4, null class included) for random DiTs
with non-zero adaLN and for a dit-tiny trained through the real trainer (ZeRO-2, 2 gloo ranks,
EMA weights); the exported scheduler has megalm's schedule, and the model card's own sampling code
reproduces megalm's DDPM sampler (Euler for flow); bad input is one line with nothing left behind."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

from megalm.diffusion.objectives import DDPM, Flow
from megalm.diffusion.samplers import sample
from megalm.diffusion.schedules import alpha_bar
from megalm.errors import UserError
from megalm.export.diffusers import WEIGHTS, check_exportable, export_dit, scheduler_config, write_folder
from megalm.models.dit import DiT, DiTConfig
from tests.diffusion.conftest import digits  # noqa: F401  (session fixture: the digits as image shards)
from tests.distributed.helper import run_distributed

pytestmark = pytest.mark.timeout(900)
TOL = 1e-4
DDPM_V_LINEAR = ["diffusion.objective=ddpm", "diffusion.prediction=v", "diffusion.schedule=linear"]
DIT_TINY = ["model.preset=dit-tiny", "model.dim=128", "model.depth=4", "model.heads=4"]  # undo the jobs' shrink


def train_job(workdir: str, shards: str, lm_shards: str) -> dict[str, str]:
    """On the gloo ranks: a dit-tiny (DDPM, v, linear) 4 steps under ZeRO-2, and a 1-step LM."""
    from tests.diffusion.jobs import overrides, train
    from tests.distributed.jobs import MODES, small_overrides
    from tests.distributed.jobs import train as train_lm

    os.chdir(workdir)
    dit = train(overrides(shards, "dit", steps=4) + MODES["zero2"] + DDPM_V_LINEAR + DIT_TINY)
    lm = train_lm(small_overrides(lm_shards, "lm", steps=1) + MODES["zero0"])
    return {"dit": os.path.abspath(dit["run_dir"]), "lm": os.path.abspath(lm["run_dir"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits) -> dict[str, str]:  # noqa: F811
    from tests.distributed.corpus import make_corpus

    work = tmp_path_factory.mktemp("export-diffusers")
    lm_shards = make_corpus(str(work / "tokens"), n_docs=100)
    return run_distributed(f"{__name__}:train_job", {"workdir": str(work), "shards": digits, "lm_shards": lm_shards},
                           nproc=2)[0]


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("exported") / "dit-diffusers")
    export_dit(runs["dit"], out)
    return out


def _random_dit(**fields) -> DiT:
    """Every parameter drawn at random, adaLN modulation and output layer included (a fresh DiT
    starts them at zero, which would hide any mapping error behind a zero output)."""
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_dict({"preset": "dit-tiny", "image_size": 8, "channels": 1, "num_classes": 10,
                                     **fields}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def _trained_weights(run: str) -> DiT:
    """The run's DiT with its trained (non-EMA) weights, consolidated from the ZeRO-2 partitions."""
    from megalm.engine.layout import read_client_state, weights

    tag_dir, meta = read_client_state(run)
    model = DiT(DiTConfig.from_saved(meta["data"]["model_config"]))
    model.load_state_dict(weights(tag_dir, meta, model))
    return model.eval()


def _load(out: str) -> DiTTransformer2DModel:
    model = DiTTransformer2DModel.from_pretrained(os.path.join(out, "transformer"))
    assert not model.training
    return model


@torch.no_grad()
def _max_diff(ours: DiT, theirs: DiTTransformer2DModel) -> tuple[float, float]:
    """(max |megalm - diffusers|, max |megalm|) on one batch: times 0 to 999 (one fractional),
    labels including the null class (diffusers gets the null row 0 for an unconditional DiT)."""
    c = ours.config
    x = torch.randn(4, c.channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 1.5, 500.0, 999.0])
    y = torch.tensor([0, 3, c.num_classes - 1, c.num_classes]) if c.num_classes else None
    a = ours(x, t, y)
    b = theirs(x, timestep=t, class_labels=y if y is not None else torch.zeros(4, dtype=torch.long)).sample
    return float((a - b).abs().max()), float(a.abs().max())


@pytest.mark.parametrize("fields", [{}, {"learn_sigma": True}, {"num_classes": 0},
                                    {"channels": 3, "image_size": 16, "patch_size": 4, "heads": 2}],
                         ids=["classes", "learn-sigma", "unconditional", "rgb-patch4"])
def test_random_dit_output_equals_diffusers(tmp_path, fields):
    model = _random_dit(**fields)
    write_folder(str(tmp_path / "out"), dict(model.named_parameters()), model.config, {})
    theirs = _load(str(tmp_path / "out"))
    diff, scale = _max_diff(model, theirs)
    assert scale > 1.0  # a real signal, not a zero output
    assert diff <= TOL
    # megalm's adaLN LayerNorms use eps 1e-6; 1e-5 would shift outputs by only ~1e-6 on this batch.
    norms = [m for m in theirs.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * model.config.depth + 1 and {m.eps for m in norms} == {1e-6}


def test_paper_timestep_frequencies_are_refused_because_they_differ(tmp_path):
    model = _random_dit(freq_shift=0)
    with pytest.raises(UserError, match=r"src: model\.freq_shift: is 0 .*model\.freq_shift: 1"):
        check_exportable(model.config, "src")
    # Why: written anyway, diffusers' fixed frequencies give another output.
    write_folder(str(tmp_path / "out"), dict(model.named_parameters()), model.config, {})
    assert _max_diff(model, _load(str(tmp_path / "out")))[0] > 0.1


@pytest.mark.parametrize("fields,key", [({"freq_dim": 128}, "freq_dim"), ({"mlp_ratio": 2.0}, "mlp_ratio"),
                                        ({"dim": 34, "heads": 2}, "dim")])
def test_shapes_diffusers_cannot_express_are_refused_naming_the_key(fields, key):
    cfg = DiTConfig.from_dict({"preset": "dit-tiny", "image_size": 8, "channels": 1, "num_classes": 10, **fields})
    with pytest.raises(UserError, match=rf"^src: model\.{key}: .*DiTTransformer2DModel cannot represent it$"):
        check_exportable(cfg, "src")


def test_trained_checkpoint_exports_its_ema_weights(runs, exported):
    from megalm.diffusion.sample import from_checkpoint

    assert sorted(os.listdir(exported)) == ["README.md", "scheduler", "transformer"]
    assert not [n for n in os.listdir(os.path.dirname(exported)) if n.startswith(".tmp-")]
    mask = os.umask(0)
    os.umask(mask)
    for path in (exported, os.path.join(exported, "transformer", WEIGHTS)):  # shareable, as the umask allows
        assert os.stat(path).st_mode & 0o044 == 0o044 & ~mask
    theirs = _load(exported)
    ema, _ = from_checkpoint(runs["dit"])  # what `megalm sample` runs: the EMA weights
    assert ema.config.dim == 128 and ema.config.depth == 4  # dit-tiny
    diff, scale = _max_diff(ema, theirs)
    assert scale > 0.01 and diff <= TOL
    # The trained (non-EMA) weights give another output: the export did take the EMA.
    assert _max_diff(_trained_weights(runs["dit"]), theirs)[0] > 100 * TOL
    card = open(os.path.join(exported, "README.md")).read()
    assert "EMA of the weights (decay 0.9, 4 updates)" in card and "step 4" in card


def test_checkpoint_without_ema_exports_its_trained_weights(runs, tmp_path, monkeypatch):
    """The ZeRO-2 partitions consolidated through the reader, when the client state has no EMA."""
    from megalm.engine import layout

    client_state = layout.client_state
    monkeypatch.setattr(layout, "client_state",
                        lambda tag_dir: {k: v for k, v in client_state(tag_dir).items() if k != "task_state"})
    export_dit(runs["dit"], str(tmp_path / "out"))
    monkeypatch.undo()
    diff, scale = _max_diff(_trained_weights(runs["dit"]), _load(str(tmp_path / "out")))
    assert scale > 0.01 and diff <= TOL
    assert "the trained weights (the checkpoint holds no EMA)" in (tmp_path / "out" / "README.md").read_text()


def test_model_card_loop_reproduces_megalm_ddpm_sampling(runs, exported):
    from megalm.diffusion.sample import from_checkpoint

    model, objective = from_checkpoint(runs["dit"])
    assert isinstance(objective, DDPM) and objective.prediction == "v"
    sched = DDPMScheduler.from_pretrained(os.path.join(exported, "scheduler"))
    assert torch.allclose(sched.alphas_cumprod.double(), objective.abar, rtol=1e-5, atol=0)
    # Run the card's own code (50 steps, class 3, seed 0) against megalm's ancestral DDPM sampler.
    card = open(os.path.join(exported, "README.md")).read()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace('"DIR/', f'"{exported}/')
    scope: dict = {}
    exec(code, scope)
    want = sample(objective, model, (8, 1, 8, 8), torch.tensor([3] * 8), sampler="ddpm", steps=50,
                  generator=torch.Generator().manual_seed(0))
    assert want.abs().max() > 0.1
    assert float((scope["images"] - want).abs().max()) <= TOL


def test_flow_scheduler_reproduces_megalm_euler_sampling(tmp_path):
    model = _random_dit()
    sched_cfg = scheduler_config({"objective": "flow"})
    write_folder(str(tmp_path / "out"), dict(model.named_parameters()), model.config, {})
    theirs = _load(str(tmp_path / "out"))
    sched = FlowMatchEulerDiscreteScheduler.from_config(sched_cfg)
    shape, y, steps = (2, 1, 8, 8), torch.tensor([4, 10]), 5
    want = sample(Flow(), model, shape, y, sampler="euler", steps=steps, generator=torch.Generator().manual_seed(3))
    sched.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(theirs(x, t.expand(2), class_labels=y).sample, t, x).prev_sample
    assert float((x.clamp(-1, 1) - want).abs().max()) <= TOL


@pytest.mark.parametrize("schedule,steps", [("linear", 1000), ("linear", 250), ("cosine", 1000)])
def test_ddpm_scheduler_config_has_megalms_schedule(schedule, steps):
    cfg = scheduler_config({"objective": "ddpm", "schedule": schedule, "timesteps": steps, "prediction": "eps"})
    sched = DDPMScheduler.from_config(cfg)
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == steps
    assert torch.allclose(sched.alphas_cumprod.double(), alpha_bar(schedule, steps), rtol=1e-5, atol=1e-7)


def test_bad_input_is_one_line_and_leaves_nothing(runs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"not a DiT checkpoint \(task 'lm'\).*--format hf or gguf") as err:
        export_dit(runs["lm"], str(out))
    assert "\n" not in str(err.value)
    # A damaged checkpoint file: refused naming the checkpoint.
    broken = tmp_path / "broken"
    src = os.path.join(runs["dit"], "checkpoints")
    shutil.copytree(src, broken)
    tag = sorted(n for n in os.listdir(broken) if n.startswith("step_"))[-1]
    victim = broken / tag / "mp_rank_00_model_states.pt"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=rf"{tag}: not loadable") as err:
        export_dit(str(broken / tag), str(out))
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["broken"]  # no output, no temporary folder
    # An --out that holds something is refused before anything is read, and left as it was.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already exists"):
        export_dit(runs["dit"], str(out))
    assert os.listdir(out) == ["keep.txt"]
