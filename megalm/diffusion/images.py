"""Image grids: [N, C, H, W] floats in [-1, 1] -> one tiled uint8 picture -> PNG (zlib, no Pillow)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from megalm.fsio import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: torch.Tensor, rows: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile N images into `rows` rows ([rows·(H+pad)+pad, cols·(W+pad)+pad, C] uint8, black gaps);
    `scale` enlarges each pixel (8x8 digits are too small to see otherwise)."""
    arr = to_uint8(images)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = arr.shape
    cols = -(-n // rows)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = arr[i]
    return out


def png_bytes(picture: np.ndarray) -> bytes:
    """An 8-bit greyscale (C = 1) or RGB (C = 3) PNG of [H, W, C] uint8."""
    h, w, c = picture.shape
    if c not in (1, 3):
        raise ValueError(f"png_bytes: expected 1 or 3 channels, got {c}")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + picture[y].tobytes() for y in range(h))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_png(path: str | Path, picture: np.ndarray) -> None:
    atomic_write(path, png_bytes(picture))
