"""DiffusionTask pieces that need no process group: the EMA hook's TensorBoard sample grid."""

from __future__ import annotations

from types import SimpleNamespace

from megalm.train.diffusion import DiffusionTask
from megalm.train.config import load_config


def test_grid_interval_logs_an_ema_sample_grid_to_tensorboard(tmp_path, digits):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, ["task=diffusion", f"data.paths=[{digits}]", "train.steps=4", "model.preset=dit-tiny",
                             "model.dim=32", "model.depth=1", "model.heads=2", "diffusion.grid_interval=2",
                             "diffusion.grid_steps=2", f"logging.tensorboard_dir={tmp_path / 'tb'}"])
    task = DiffusionTask(cfg)
    hook = task.attach(SimpleNamespace(module=task.build_model()), 0, 1)
    for step in (1, 2, 3, 4):
        hook.after_step(step, applied=True)
    assert hook.ema.updates == 4
    hook._writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    images = acc.Images("samples/ema")
    assert [im.step for im in images] == [2, 4]
    # 10 class rows of 4 samples, each 8x8 digit enlarged 8x with 1-pixel gaps
    assert (images[0].height, images[0].width) == (10 * 65 + 1, 4 * 65 + 1)
