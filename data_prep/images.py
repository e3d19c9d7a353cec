"""`megalm prep` for images: a folder (one subfolder per class), an `.npz` file, or
`builtin:digits` (scikit-learn's bundled 8x8 handwritten digits) -> Arrow shards + manifest.json.

Same directory contract as the token shards (docs/interfaces.md, "Image shards"): Arrow IPC
files with one row per image (`pixels`: the H·W·C uint8 bytes in HWC order, `label`: int32), a
deterministic train/valid split by the image's hash, every shard sha256-checked in a manifest
written last. `documents` counts images and `tokens` counts pixel values, so the split
bookkeeping reads like the token shards'.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from megalm.cliparse import Parser
from megalm.errors import UserError
from megalm.fsio import atomic_write, fsync_dir, sha256_file

from . import manifest as token_manifest
from .outdir import output_error
from .shards import remove_temp_files

KIND = "images"  # the manifest's `kind`; format and version are the token shards' (data_prep.manifest)
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGITS = "builtin:digits"


def _is_image_dir(path: str) -> bool:
    try:
        return json.loads(Path(path, token_manifest.MANIFEST).read_bytes()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def wants_images(argv: list[str]) -> bool:
    """Does this `megalm prep` command line name image inputs (or --verify an image shard dir)?"""
    if "--verify" in argv and argv.index("--verify") + 1 < len(argv):
        return _is_image_dir(argv[argv.index("--verify") + 1])
    return "--images" in argv or any(a == DIGITS or a.endswith(".npz") for a in argv if not a.startswith("-"))


def verify(out_dir: str) -> list[str]:
    """Re-check every shard against the manifest (size, sha256, rows, pixel width); one line per problem."""
    # megalm.diffusion imports torch (2 s and ~190 MB in every prep worker): only verification needs it
    from megalm.diffusion.data import load_image_manifest, read_split

    m = load_image_manifest(out_dir)
    problems = []
    for split, info in m.splits.items():
        for shard in info.shards:
            if not os.path.exists(shard.file):
                problems.append(f"{shard.file}: missing")
            elif sha256_file(shard.file) != shard.sha256:
                problems.append(f"{shard.file}: sha256 does not match the manifest")
        if not problems and info.shards:
            try:
                read_split(m, split)
            except UserError as exc:
                problems.append(str(exc))
    return problems


@dataclass
class Images:
    pixels: np.ndarray  # [N, H, W, C] uint8
    labels: np.ndarray  # [N] int
    classes: list[str]


def load_digits_images() -> Images:
    try:
        # scikit-learn (the optional images extra, heavy): only the builtin digits need it
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(f"{DIGITS}: needs scikit-learn (pip install 'megalm[images]')") from None
    d = load_digits()
    # Values 0..16 -> 0..255, exactly (16 * 255 / 16).
    pixels = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return Images(pixels, d.target.astype(np.int64), [str(c) for c in d.target_names])


def load_npz(path: str) -> Images:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read .npz ({exc})") from None
    keys = set(arrays.files)
    img_key = next((k for k in ("images", "x") if k in keys), None)
    lab_key = next((k for k in ("labels", "y") if k in keys), None)
    if img_key is None or lab_key is None:
        raise UserError(f"{path}: expected arrays 'images' (or 'x') and 'labels' (or 'y'), found "
                        f"{', '.join(sorted(keys)) or 'none'}")
    images, labels = arrays[img_key], arrays[lab_key]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise UserError(f"{path}: {img_key}: expected uint8 [N, H, W] or [N, H, W, C], got {images.dtype} "
                        f"{list(images.shape)}")
    if images.ndim == 3:
        images = images[..., None]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: {lab_key}: expected {images.shape[0]} integer labels, got {labels.dtype} "
                        f"{list(labels.shape)}")
    if labels.size and labels.min() < 0:
        raise UserError(f"{path}: {lab_key}: expected labels >= 0, got {int(labels.min())}")
    n_classes = int(labels.max()) + 1 if labels.size else 0
    return Images(images, labels.astype(np.int64), [str(i) for i in range(n_classes)])


def load_folder(root: str, channels: int, size: int | None) -> Images:
    try:
        # Pillow is optional (the images extra): only image folders need it
        from PIL import Image
    except ImportError:
        raise UserError(f"{root}: reading image files needs Pillow (pip install 'megalm[images]')") from None
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: expected one subfolder per class, found none")
    pixels, labels, shape = [], [], None
    for label, name in enumerate(classes):
        for file in sorted(Path(root, name).rglob("*")):
            if file.suffix.lower() not in EXTENSIONS or not file.is_file():
                continue
            try:
                with Image.open(file) as im:
                    im = im.convert("L" if channels == 1 else "RGB")
                    if size:
                        im = im.resize((size, size), Image.Resampling.BICUBIC)
                    arr = np.asarray(im, dtype=np.uint8)
            except (OSError, SyntaxError, ValueError) as exc:
                raise UserError(f"{file}: cannot decode image ({exc})") from None
            arr = arr[..., None] if arr.ndim == 2 else arr
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise UserError(f"{file}: image is {arr.shape[1]}x{arr.shape[0]}, expected {shape[1]}x{shape[0]} "
                                f"like the first image (pass --image-size N to resize all)")
            pixels.append(arr)
            labels.append(label)
    if not pixels:
        raise UserError(f"{root}: no image files ({', '.join(EXTENSIONS)}) in its class subfolders")
    return Images(np.stack(pixels), np.asarray(labels, dtype=np.int64), classes)


def _split_of(row: bytes, label: int, valid_fraction: float) -> str:
    h = hashlib.sha256(row + int(label).to_bytes(4, "little")).digest()
    return "valid" if int.from_bytes(h[:8], "little") / 2**64 < valid_fraction else "train"


def encode_shard(pixels: np.ndarray, labels: np.ndarray) -> bytes:
    row_bytes = int(np.prod(pixels.shape[1:]))
    flat = pa.py_buffer(np.ascontiguousarray(pixels).tobytes())
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(row_bytes), len(pixels), [None, flat])
    table = pa.table({"pixels": column, "label": pa.array(labels.astype(np.int32), pa.int32())})
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def write_shards(images: Images, out: str, valid_fraction: float, shard_size_mb: float, source: str) -> dict:
    """Write shards then the manifest (last, atomically); returns the manifest."""
    n, h, w, c = images.pixels.shape
    out_path = Path(out)
    try:
        out_path.mkdir(parents=True, exist_ok=True)
        remove_temp_files(out_path)  # an interrupted earlier run's partial writes
        return _write_shards(images, out_path, valid_fraction, shard_size_mb, source)
    except OSError as exc:  # unwritable folder, disk full: one line, the manifest never written
        raise output_error(out_path, exc) from None


def _write_shards(images: Images, out_path: Path, valid_fraction: float, shard_size_mb: float, source: str) -> dict:
    n, h, w, c = images.pixels.shape
    rows = [images.pixels[i].tobytes() for i in range(n)]
    split = np.array([_split_of(rows[i], int(images.labels[i]), valid_fraction) for i in range(n)])
    per_shard = max(1, int(shard_size_mb * 2**20) // (h * w * c))
    manifest = {"format": token_manifest.FORMAT, "format_version": token_manifest.FORMAT_VERSION, "kind": KIND,
                "images": {"height": h, "width": w, "channels": c, "num_classes": len(images.classes),
                           "classes": images.classes, "layout": "HWC", "pixel_dtype": "uint8", "source": source},
                "splits": {}}
    for name in ("train", "valid"):
        idx = np.flatnonzero(split == name)
        shards = []
        for k, start in enumerate(range(0, len(idx), per_shard)):
            part = idx[start:start + per_shard]
            blob = encode_shard(images.pixels[part], images.labels[part])
            fname = f"{name}-{k:05d}.arrow"
            atomic_write(out_path / fname, blob, sync_dir=False)
            shards.append({"file": fname, "rows": len(part), "tokens": len(part) * h * w * c, "bytes": len(blob),
                           "sha256": hashlib.sha256(blob).hexdigest()})
        manifest["splits"][name] = {"documents": int(len(idx)), "tokens": int(len(idx)) * h * w * c,
                                    "shards": shards}
    counts = np.bincount(images.labels, minlength=len(images.classes))
    manifest["stats"] = {"images": n, "per_class": counts.tolist()}
    fsync_dir(out_path)
    token_manifest.write(out_path, manifest)  # last: a directory without it is not a shard directory
    return manifest


def main(argv: list[str]) -> int:
    p = Parser(prog="megalm prep --images", description="Images -> Arrow shards + manifest.json: a folder "
                "with one subfolder per class, an .npz (uint8 'images' [N,H,W(,C)] + 'labels'), or builtin:digits.")
    p.add_argument("input", nargs="?")
    p.add_argument("-o", "--output")
    p.add_argument("--verify", metavar="DIR", help="re-check every shard of an image shard directory and exit")
    p.add_argument("--images", action="store_true", help="treat the input as images (implied for .npz / digits)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image folders: 1 = grey, 3 = RGB")
    p.add_argument("--image-size", type=int, default=None, help="image folders: resize every image to N x N")
    p.add_argument("--valid-fraction", type=float, default=0.2)
    p.add_argument("--shard-size-mb", type=float, default=64.0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard directory")
    args = p.parse_args(argv)
    if args.verify:
        problems = verify(args.verify)
        for line in problems:
            print(line)
        print(f"{args.verify}: {len(problems)} problem(s)" if problems else f"{args.verify}: ok",
              file=sys.stderr if problems else sys.stdout)
        return 1 if problems else 0
    if not args.input or not args.output:
        raise UserError("megalm prep --images: expected INPUT and -o OUTPUT (or --verify DIR)")
    if not 0.0 <= args.valid_fraction < 1.0:
        raise UserError(f"--valid-fraction: expected 0 <= f < 1, got {args.valid_fraction}")
    if args.image_size is not None and args.image_size <= 0:
        raise UserError(f"--image-size: expected a positive size, got {args.image_size}")
    if os.path.exists(os.path.join(args.output, token_manifest.MANIFEST)) and not args.overwrite:
        raise UserError(f"{args.output}: already holds a shard directory; pass --overwrite to replace it")
    if args.input == DIGITS:
        images = load_digits_images()
    elif args.input.endswith(".npz"):
        images = load_npz(args.input)
    elif os.path.isdir(args.input):
        images = load_folder(args.input, args.channels, args.image_size)
    else:
        raise UserError(f"{args.input}: expected an image folder, an .npz file or {DIGITS}")
    if args.overwrite and os.path.isdir(args.output):
        for old in Path(args.output).glob("*.arrow"):
            old.unlink()
    m = write_shards(images, args.output, args.valid_fraction, args.shard_size_mb, args.input)
    print(f"{args.output}: {m['stats']['images']} images {m['images']['height']}x{m['images']['width']}x"
          f"{m['images']['channels']}, {m['images']['num_classes']} classes; train "
          f"{m['splits']['train']['documents']}, valid {m['splits']['valid']['documents']}")
    return 0
