"""Reading a checkpoint never runs code from it."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from megalm.checkpoint.unpickle import check_dir, check_file, safe_load
from megalm.engine.layout import load
from megalm.errors import UserError


class _RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: str, marker: str) -> None:
    # A real torch.save zip whose data.pkl carries the payload next to a tensor.
    torch.save({"module": {"w": torch.ones(2)}, "client": _RunsCode(marker)}, path)


def test_planted_pickle_is_refused_with_one_line_and_never_runs(tmp_path):
    path, marker = str(tmp_path / "mp_rank_00_model_states.pt"), str(tmp_path / "ran")
    _plant(path, marker)
    for read in (safe_load, check_file):
        with pytest.raises(UserError) as info:
            read(path)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"{path}: refusing to load") and "system" in msg, msg
    with pytest.raises(UserError, match="refusing to load"):
        check_dir(str(tmp_path))
    assert not os.path.exists(marker)
    torch.load(path, weights_only=False)  # the plant is real: the unsafe load does run it
    assert os.path.exists(marker)


def test_a_pickle_that_is_not_a_torch_file_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(pickle.dumps(_RunsCode(str(tmp_path / "ran"))))
    with pytest.raises(UserError, match=f"{path}: "):
        safe_load(str(path))
    assert not (tmp_path / "ran").exists()


def test_deepspeed_and_trainer_objects_load(tmp_path):
    """What DeepSpeed's ZeRO files and the trainer's client state hold (loss scaler, stage enum,
    fragment addresses, numpy RNG state) is allowed and comes back equal."""
    import random

    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
             "w": torch.arange(4.0)}
    path = str(tmp_path / "s.pt")
    torch.save(state, path)
    got = load(path)
    assert isinstance(got["loss_scaler"], LossScaler) and got["loss_scaler"].cur_scale == 1.0
    assert got["zero_stage"] is ZeroStageEnum.gradients
    assert got["rng"]["python"] == state["rng"]["python"]
    assert (got["rng"]["numpy"][1] == state["rng"]["numpy"][1]).all()
    assert torch.equal(got["w"], state["w"])
    assert zipfile.is_zipfile(path)
