"""Image shards (made by `megalm prep --images`) -> per-step micro batches with their noise.

Order and randomness are functions of the global sample index g only: the epoch e = g // N reads
the train split in a permutation seeded by (seed, e), and every sample's noise, time draw and
label-dropout draw come from a generator seeded by (seed, g). So the training is the same for
any data-parallel size and after any resume: the loader's whole state is the next g.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from megalm.data.manifest import FORMAT, FORMAT_VERSION, SplitInfo, _get, _parse_split
from megalm.errors import UserError
from megalm.fsio import sha256_file

Batch = dict[str, torch.Tensor]
_EVAL_STREAM = 1 << 62  # eval draws use indices far from any training index


@dataclass(frozen=True)
class ImageManifest:
    dir: str
    path: str
    height: int
    width: int
    channels: int
    num_classes: int
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]


def load_image_manifest(shard_dir: str) -> ImageManifest:
    dir_ = os.path.abspath(shard_dir)
    path = os.path.join(dir_, "manifest.json")
    try:
        obj = json.loads(open(path, "rb").read())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; expected an image shard directory made by `megalm prep --images`") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    if _get(obj, "format", str, "", path) != FORMAT or _get(obj, "format_version", int, "", path) != FORMAT_VERSION:
        raise UserError(f"{path}: format: expected {FORMAT!r} version {FORMAT_VERSION}")
    if obj.get("kind") != "images":
        raise UserError(f"{path}: kind: expected 'images' (a token shard directory cannot train a diffusion model)")
    im = _get(obj, "images", dict, "", path)
    dims = {k: _get(im, k, int, "images.", path) for k in ("height", "width", "channels", "num_classes")}
    for k, v in dims.items():
        if v <= 0:
            raise UserError(f"{path}: images.{k}: expected > 0, got {v}")
    splits = {name: _parse_split(name, s, dir_, path) for name, s in _get(obj, "splits", dict, "", path).items()}
    return ImageManifest(dir_, path, dims["height"], dims["width"], dims["channels"], dims["num_classes"],
                         tuple(_get(im, "classes", list, "images.", path)), splits)


def read_split(m: ImageManifest, split: str, verify: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels uint8 [N, C, H, W], labels int64 [N]) of one split, every shard checked against the manifest."""
    if split not in m.splits:
        raise UserError(f"{m.path}: splits.{split}: no such split (has: {', '.join(sorted(m.splits))})")
    row_bytes = m.height * m.width * m.channels
    pixels, labels = [], []
    for shard in m.splits[split].shards:
        if not os.path.exists(shard.file) or os.path.getsize(shard.file) != shard.bytes:
            raise UserError(f"{shard.file}: missing or of the wrong size (manifest says {shard.bytes} bytes)")
        if verify and sha256_file(shard.file) != shard.sha256:
            raise UserError(f"{shard.file}: sha256 differs from the manifest's; the shard is damaged")
        try:
            table = pa.ipc.open_file(pa.memory_map(shard.file)).read_all()
            col = table.column("pixels").combine_chunks()
            lab = table.column("label").to_numpy()
        except (pa.ArrowException, KeyError) as exc:
            raise UserError(f"{shard.file}: not an image shard ({exc})") from None
        if col.type != pa.binary(row_bytes) or table.num_rows != shard.rows:
            raise UserError(f"{shard.file}: expected {shard.rows} rows of {row_bytes} pixel bytes, got "
                            f"{table.num_rows} rows of {col.type}")
        buf = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=table.num_rows * row_bytes, offset=col.offset * row_bytes)
        pixels.append(buf.reshape(-1, m.height, m.width, m.channels))
        labels.append(lab.astype(np.int64))
    if not pixels:
        raise UserError(f"{m.path}: splits.{split}: holds no images")
    lab = np.concatenate(labels)
    if lab.min() < 0 or lab.max() >= m.num_classes:
        raise UserError(f"{m.path}: split {split} has labels outside 0..{m.num_classes - 1}")
    px = torch.from_numpy(np.ascontiguousarray(np.concatenate(pixels).transpose(0, 3, 1, 2)))
    return px, torch.from_numpy(lab)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def sample_draws(seed: int, index: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, float, float]:
    """(noise, u for the time, u for label dropout) of global sample `index`."""
    g = torch.Generator().manual_seed((seed * 0x9E3779B1 + index) % (2**63))
    noise = torch.randn(shape, generator=g)
    u = torch.rand(2, generator=g, dtype=torch.float64)
    return noise, float(u[0]), float(u[1])


def make_batch(pixels: torch.Tensor, labels: torch.Tensor, rows: list[int], indices: list[int], seed: int,
               class_dropout: float) -> Batch:
    shape = tuple(pixels.shape[1:])
    draws = [sample_draws(seed, g, shape) for g in indices]
    return {"x0": to_model_range(pixels[rows]), "y": labels[rows].clone(),
            "noise": torch.stack([d[0] for d in draws]),
            "u": torch.tensor([d[1] for d in draws], dtype=torch.float32),
            "drop": torch.tensor([d[2] < class_dropout for d in draws], dtype=torch.bool)}


class ImageLoader:
    """Per optimizer step: this rank's micro batches of the global batch (the Loader protocol)."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, seed: int, class_dropout: float,
                 global_batch: int, micro_batch: int, dp_rank: int, dp_world: int, fingerprint: str = ""):
        self.pixels, self.labels, self.seed, self.class_dropout = pixels, labels, seed, class_dropout
        self.fingerprint = fingerprint  # the split's shard hashes (split_fingerprint)
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.next_sample = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def _row(self, g: int) -> int:
        n = len(self.labels)
        epoch = g // n
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._perm = (epoch, torch.randperm(n, generator=gen))
        return int(self._perm[1][g % n])

    def __iter__(self) -> Iterator[list[Batch]]:
        per_rank = self.global_batch // self.dp_world
        while True:
            start = self.next_sample + self.dp_rank * per_rank
            self.next_sample += self.global_batch
            micro = []
            for m in range(start, start + per_rank, self.micro_batch):
                idx = list(range(m, m + self.micro_batch))
                micro.append(make_batch(self.pixels, self.labels, [self._row(g) for g in idx], idx, self.seed,
                                        self.class_dropout))
            yield micro

    def state_dict(self) -> dict[str, Any]:
        return {"next_sample": self.next_sample, "global_batch": self.global_batch, "seed": self.seed,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses state made from other images or another seed
        (the sample order and every draw would differ), as the token loader does."""
        if state.get("seed", self.seed) != self.seed:
            raise UserError(f"data.seed: the checkpoint was made with seed {state['seed']}, the config says {self.seed}")
        if state.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise UserError("data.paths: the checkpoint's training images differ from the config's (other shards); "
                            "resuming would not continue the same sample sequence")
        self.next_sample = int(state["next_sample"])

    def skip(self, n: int) -> None:
        self.next_sample += n * self.global_batch

    def source_weights(self) -> list[float]:
        return [1.0]  # one image source


class ImageEvalLoader:
    """The eval split in order (the eval-loader interface of megalm.data.loader.EvalLoader: one
    source): rank r takes micro batches r, r + R, ... cycling over the split; fixed draws and no
    label dropout, so every eval scores the same noisy inputs."""

    num_sources = 1

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, seed: int, micro_batch: int, dp_rank: int,
                 dp_world: int):
        self.pixels, self.labels, self.seed = pixels, labels, seed
        self.micro_batch, self.dp_rank, self.dp_world = micro_batch, dp_rank, dp_world

    def source_batches(self, k: int) -> Iterator[Batch]:
        if k != 0:
            raise IndexError(f"source {k}: an image eval split is one source")
        n, b, mb = len(self.labels), self.dp_rank, self.micro_batch
        while True:
            idx = [b * mb + j for j in range(mb)]
            yield make_batch(self.pixels, self.labels, [i % n for i in idx], [_EVAL_STREAM + i for i in idx],
                             self.seed, 0.0)
            b += self.dp_world

    def __iter__(self) -> Iterator[Batch]:
        return self.source_batches(0)


def split_fingerprint(m: ImageManifest, split: str) -> str:
    """Identifies a split's images (the shards' content hashes), not where they live."""
    shards = [[s.rows, s.sha256] for s in m.splits[split].shards] if split in m.splits else []
    return hashlib.sha256(json.dumps([split, shards]).encode()).hexdigest()
