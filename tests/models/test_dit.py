"""DiT: the paper's parameter counts, adaLN-Zero start, shapes, guidance's null class, config errors."""

from __future__ import annotations

import pytest
import torch

from megalm.errors import UserError
from megalm.models.dit import DiT, DiTConfig, dit_presets


def _count(preset: str, **kw) -> int:
    cfg = DiTConfig.from_dict({"preset": preset, "image_size": 32, "channels": 4, "num_classes": 1000, **kw})
    with torch.device("meta"):  # shapes only: DiT-XL would take GBs to materialise
        return sum(p.numel() for p in DiT(cfg).parameters())


def test_dit_xl2_parameter_count_matches_the_paper():
    # DiT-XL/2 on 32x32x4 latents with 1000 classes and learned sigma: 675,129,632 in the paper's
    # code, which counts the fixed 256 x 1152 position table as a (frozen) parameter; ours is a buffer.
    ours = _count("DiT-XL/2", learn_sigma=True)
    assert abs(ours - 675_129_632) / 675_129_632 < 0.005
    assert ours + 256 * 1152 == 675_129_632


@pytest.mark.parametrize("preset,millions", [("DiT-S/2", 33.0), ("DiT-B/2", 130.5), ("DiT-L/2", 458.0)])
def test_other_presets_match_the_paper_table(preset, millions):
    assert abs(_count(preset, learn_sigma=True) / 1e6 - millions) / millions < 0.01


def test_every_size_has_patch_2_4_8():
    presets = dit_presets()  # package data: megalm/configs/models/dit/presets.yaml
    for size in ("S", "B", "L", "XL"):
        for patch in (2, 4, 8):
            assert presets[f"DiT-{size}/{patch}"]["patch_size"] == patch


def _tiny(**kw) -> DiT:
    return DiT(DiTConfig.from_dict({"preset": "dit-tiny", "image_size": 8, "channels": 1, "num_classes": 10, **kw}))


def test_adaln_zero_starts_at_zero_output_and_trains():
    torch.manual_seed(0)
    model = _tiny()
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 10])
    assert torch.equal(model(x, t, y), torch.zeros(4, 1, 8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = (model(x, t, y) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model(x, t, y)
    assert out.abs().sum() > 0
    # Conditioning reaches the output: another class or time gives another prediction.
    assert not torch.allclose(out, model(x, t, torch.tensor([3, 4, 5, 6])))
    assert not torch.allclose(out, model(x, t + 100, y))


def test_learned_sigma_doubles_output_channels_and_null_class_row():
    model = _tiny(learn_sigma=True)
    assert model(torch.randn(2, 1, 8, 8), torch.zeros(2)).shape == (2, 2, 8, 8)  # y None -> null class
    assert model.class_embed.num_embeddings == 11 and model.null_class() == 10


def test_unpatchify_inverts_patchify_layout():
    model = _tiny()
    c = model.config
    img = torch.arange(2 * 64, dtype=torch.float32).view(2, 1, 8, 8)
    p = c.patch_size
    # patchify in (row, col) token order with (p, p, C) inside each token, as the final linear emits
    tokens = img.view(2, 1, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p)
    assert torch.equal(model.unpatchify(tokens), img)


@pytest.mark.parametrize("fields,key", [({"preset": "DiT-Q/2"}, "preset"), ({"patch_size": 3, "image_size": 8}, "patch_size"),
                                        ({"dim": 10, "heads": 3}, "heads"), ({"widht": 3}, "widht")])
def test_config_errors_name_the_key(fields, key):
    with pytest.raises(UserError, match=rf"cfg: {key}"):
        DiTConfig.from_dict(fields, source="cfg")


def test_freq_shift_picks_the_timestep_frequencies_and_old_saved_configs_keep_the_papers():
    from megalm.models.dit import timestep_features

    t = torch.tensor([0.0, 10.0, 999.0])
    ours, paper = timestep_features(t, 256, shift=1), timestep_features(t, 256, shift=0)
    assert torch.equal(ours[:, 127], torch.cos(t * 10000.0 ** -1.0))  # lowest frequency: 10000^(-127/127)
    assert torch.allclose(paper[:, 127], torch.cos(t * 10000.0 ** (-127 / 128)))
    fields = {"preset": "dit-tiny", "image_size": 8, "channels": 1, "num_classes": 10}
    assert DiTConfig.from_dict(fields).freq_shift == 1  # new models: diffusers' form
    assert DiTConfig.from_saved(fields).freq_shift == 0  # saved before the field existed
    assert DiTConfig.from_saved({**fields, "freq_shift": 1}).freq_shift == 1
    with pytest.raises(UserError, match=r"cfg: freq_shift"):
        DiTConfig.from_dict({**fields, "freq_shift": 2}, source="cfg")
