"""PNG grids decode (with Pillow) to exactly the tiled pixels."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from megalm.diffusion.images import grid, png_bytes, write_png


def test_grid_png_round_trip(tmp_path):
    imgs = torch.linspace(-1, 1, 6 * 3 * 2 * 2).view(6, 3, 2, 2)
    pic = grid(imgs, rows=2, pad=1, scale=2)
    assert pic.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    write_png(tmp_path / "g.png", pic)
    back = np.asarray(Image.open(tmp_path / "g.png"))
    assert np.array_equal(back, pic)
    first = ((imgs[0, :, 0, 0] + 1) * 127.5).round().int().tolist()
    assert back[1, 1].tolist() == first and back[0, 0].tolist() == [0, 0, 0]  # pad is black
    assert back[-2, -2, 2] == 255  # the last value, 1.0
    grey = grid(imgs[:, :1], rows=3)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(grey)))), grey[..., 0])
