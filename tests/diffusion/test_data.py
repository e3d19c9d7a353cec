"""Image loader: per-sample draws from (seed, index), the same global batch on any DP size,
resume from the saved position, classifier-free-guidance label dropout."""

from __future__ import annotations

import pytest
import torch

from megalm.diffusion.data import ImageEvalLoader, ImageLoader, sample_draws
from megalm.errors import UserError


def _data(n: int = 50):
    pixels = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return pixels, torch.arange(n) % 10


def _step(loader: ImageLoader, it=None) -> dict[str, torch.Tensor]:
    micro = next(it or iter(loader))
    return {k: torch.cat([mb[k] for mb in micro]) for k in micro[0]}


def test_global_batch_is_the_same_for_any_data_parallel_size():
    px, lab = _data()
    one = ImageLoader(px, lab, 7, 0.1, global_batch=8, micro_batch=2, dp_rank=0, dp_world=1)
    two = [ImageLoader(px, lab, 7, 0.1, 8, 2, r, 2) for r in range(2)]
    it1, its = iter(one), [iter(x) for x in two]
    for _ in range(9):  # crosses an epoch boundary (50 images, 8 per step)
        a = _step(one, it1)
        parts = [_step(x, i) for x, i in zip(two, its)]
        for k in a:
            assert torch.equal(a[k], torch.cat([p[k] for p in parts])), k


def test_each_epoch_is_a_permutation_and_resume_continues_exactly():
    px, lab = _data()
    loader = ImageLoader(px, lab, 3, 0.0, 10, 5, 0, 1)
    it = iter(loader)
    steps = [_step(loader, it) for _ in range(5)]
    rows = torch.cat([s["x0"][:, 0, 0, 0] for s in steps])
    assert len(set(rows.tolist())) == 50  # one epoch: every image once
    resumed = ImageLoader(px, lab, 3, 0.0, 10, 5, 0, 1)
    loader2 = ImageLoader(px, lab, 3, 0.0, 10, 5, 0, 1)
    it2 = iter(loader2)
    for _ in range(3):
        _step(loader2, it2)
    resumed.load_state_dict(loader2.state_dict())
    it3 = iter(resumed)
    for a, b in zip([_step(loader2, it2) for _ in range(3)], [_step(resumed, it3) for _ in range(3)]):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_draws_depend_only_on_seed_and_index():
    a, b = sample_draws(1, 12345, (1, 2, 2)), sample_draws(1, 12345, (1, 2, 2))
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert not torch.equal(a[0], sample_draws(1, 12346, (1, 2, 2))[0])
    assert not torch.equal(a[0], sample_draws(2, 12345, (1, 2, 2))[0])


def test_label_dropout_share_matches_class_dropout():
    px, lab = _data()
    loader = ImageLoader(px, lab, 0, 0.25, 500, 500, 0, 1)
    it = iter(loader)
    drops = torch.cat([_step(loader, it)["drop"] for _ in range(8)]).float()
    assert abs(drops.mean().item() - 0.25) < 0.02  # 4000 draws: 3.5 standard errors
    never = ImageLoader(px, lab, 0, 0.0, 50, 50, 0, 1)
    assert not _step(never)["drop"].any()


def test_eval_batches_are_fixed_and_split_across_ranks():
    px, lab = _data(12)
    loaders = [ImageEvalLoader(px, lab, 1, 4, r, 2) for r in range(2)]
    assert loaders[0].num_sources == 1
    first = [next(ld.source_batches(0)) for ld in loaders]
    again = next(loaders[0].source_batches(0))  # every eval starts over: the same noisy inputs
    assert torch.equal(first[0]["noise"], again["noise"]) and not first[0]["drop"].any()
    assert first[0]["y"].tolist() == [0, 1, 2, 3] and first[1]["y"].tolist() == [4, 5, 6, 7]


def test_resume_refuses_another_seed_or_other_images():
    px, lab = _data()
    saved = ImageLoader(px, lab, 7, 0.1, 8, 8, 0, 1, fingerprint="abc").state_dict()
    with pytest.raises(UserError, match="data.seed: the checkpoint was made with seed 7, the config says 8"):
        ImageLoader(px, lab, 8, 0.1, 8, 8, 0, 1, fingerprint="abc").load_state_dict(saved)
    with pytest.raises(UserError, match="data.paths: the checkpoint's training images differ"):
        ImageLoader(px, lab, 7, 0.1, 8, 8, 0, 1, fingerprint="xyz").load_state_dict(saved)
    same = ImageLoader(px, lab, 7, 0.1, 8, 8, 0, 1, fingerprint="abc")
    same.load_state_dict({**saved, "next_sample": 24})
    assert same.next_sample == 24
