"""Memory-map one split's Arrow shards and index its documents without reading token data.

Start-up cost is the Arrow list offsets only (4-8 bytes per document), never the tokens: the
token values stay in the page cache / on disk until a sample touches them. The shards are
checked against the manifest at open (file size, rows, tokens, Arrow type); a full sha256 of
the data is opt-in (`verify=True`) because it reads every byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from megalm.data.manifest import Manifest, ShardInfo
from megalm.fsio import sha256_file
from megalm.errors import UserError

_ARROW_TYPES = {"uint16": pa.uint16(), "uint32": pa.uint32()}


@dataclass
class DocIndex:
    """Where every document of a split lives.

    Document g (manifest order) is `chunks[doc_chunk[g]][doc_begin[g] : doc_begin[g] + doc_len[g]]`;
    a chunk is the flat token buffer of one Arrow record batch, a zero-copy view of the mmap.
    """

    chunks: list[np.ndarray]
    doc_chunk: np.ndarray  # int32 [documents]
    doc_begin: np.ndarray  # int64 [documents]
    doc_len: np.ndarray  # int64 [documents]
    files: list[pa.MemoryMappedFile]  # kept open: the chunks point into these maps
    mask_chunks: list[np.ndarray] | None = None  # SFT shards: the loss_mask values, laid out like chunks

    @property
    def documents(self) -> int:
        return int(self.doc_len.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.doc_len.sum())

    def doc(self, g: int) -> np.ndarray:
        b = int(self.doc_begin[g])
        return self.chunks[int(self.doc_chunk[g])][b : b + int(self.doc_len[g])]

    def doc_mask(self, g: int) -> np.ndarray:
        """The loss mask of document g (SFT shards only)."""
        b = int(self.doc_begin[g])
        return self.mask_chunks[int(self.doc_chunk[g])][b : b + int(self.doc_len[g])]


def _open_shard(shard: ShardInfo, dtype: str, vocab_size: int, verify: bool, with_mask: bool):
    name = shard.file
    try:
        size = os.path.getsize(name)
    except FileNotFoundError:
        raise UserError(f"{name}: shard listed in the manifest is missing") from None
    if size != shard.bytes:
        raise UserError(f"{name}: file is {size} bytes, manifest says {shard.bytes} (truncated or replaced?)")
    if verify:
        digest = sha256_file(name)
        if digest != shard.sha256:
            raise UserError(f"{name}: sha256 is {digest}, manifest says {shard.sha256} (corrupted)")
    mm = pa.memory_map(name, "r")
    try:
        chunks, begins, lens, masks = _index_batches(mm, name, dtype, vocab_size, verify, with_mask)
    except BaseException:
        mm.close()
        raise
    rows = sum(x.size for x in lens)
    tokens = int(sum(int(x.sum()) for x in lens))
    if rows != shard.rows or tokens != shard.tokens:
        mm.close()
        what = f"{rows} rows" if rows != shard.rows else f"{tokens} tokens"
        want = f"{shard.rows}" if rows != shard.rows else f"{shard.tokens}"
        raise UserError(f"{name}: has {what}, manifest says {want}")
    return mm, chunks, begins, lens, masks


def _index_batches(mm: pa.MemoryMappedFile, name: str, dtype: str, vocab_size: int, verify: bool,
                   with_mask: bool = False):
    whole = mm.read_buffer()  # zero-copy view of the map: where mapped buffers must lie
    mapped = (whole.address, whole.address + whole.size)
    try:
        reader = pa.ipc.open_file(mm)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{name}: not a readable Arrow IPC file ({exc})") from None

    want = pa.list_(_ARROW_TYPES[dtype])
    schema = reader.schema
    names = ["tokens", "loss_mask"] if with_mask else ["tokens"]
    if schema.names != names or schema.field("tokens").type not in (want, pa.large_list(_ARROW_TYPES[dtype])):
        expected = f"tokens: {want}" + (", loss_mask: list<uint8> (an SFT shard)" if with_mask else "")
        raise UserError(f"{name}: schema is {schema.to_string(show_schema_metadata=False)!r}, expected {expected}")

    chunks, begins, lens, masks = [], [], [], []
    for b in range(reader.num_record_batches):
        try:
            col = reader.get_batch(b).column(0)
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{name}: record batch {b} unreadable ({exc})") from None
        values = col.values
        if col.null_count or values.null_count:
            raise UserError(f"{name}: record batch {b} has null rows or tokens; expected none")
        offsets = col.offsets.to_numpy()
        if offsets.size and (offsets[-1] > len(values) or offsets[0] < 0 or np.any(offsets[1:] < offsets[:-1])):
            raise UserError(f"{name}: record batch {b} has list offsets outside its values (corrupted)")
        if len(values) and not mapped[0] <= values.buffers()[1].address < mapped[1]:
            raise UserError(
                f"{name}: record batch {b} is compressed; megalm needs uncompressed Arrow IPC shards so they "
                "can be memory-mapped instead of read whole at start-up"
            )
        arr = values.to_numpy(zero_copy_only=True)
        if verify and arr.size and int(arr.max()) >= vocab_size:
            raise UserError(f"{name}: record batch {b} holds token id {int(arr.max())} >= vocab_size {vocab_size}")
        if with_mask:
            masks.append(_mask_values(reader.get_batch(b).column(1), offsets, name, b))
        chunks.append(arr)
        begins.append(offsets[:-1].astype(np.int64))
        lens.append(np.diff(offsets).astype(np.int64))
    return chunks, begins, lens, masks


def _mask_values(col: pa.Array, offsets: np.ndarray, name: str, b: int) -> np.ndarray:
    """The loss_mask values of one record batch; each row as long as its tokens row."""
    if col.type != pa.list_(pa.uint8()) or col.null_count or col.values.null_count:
        raise UserError(f"{name}: record batch {b}: loss_mask is {col.type} with {col.null_count} nulls; "
                        f"expected list<uint8> without nulls")
    if not np.array_equal(col.offsets.to_numpy(), offsets):
        raise UserError(f"{name}: record batch {b}: loss_mask rows differ in length from the tokens rows")
    return col.values.to_numpy(zero_copy_only=True)


def open_split(manifest: Manifest, split: str, verify: bool = False) -> DocIndex:
    """Open every shard of `split`, check it against the manifest, and index its documents."""
    info = manifest.split(split)
    files: list[pa.MemoryMappedFile] = []
    chunks: list[np.ndarray] = []
    begins: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    chunk_ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    try:
        # only verify reads every byte: worth a progress bar
        for shard in tqdm(info.shards, desc=f"verifying {split} shards", unit="shard", disable=not verify):
            mm, c, b, n, mk = _open_shard(shard, manifest.dtype, manifest.tokenizer.vocab_size, verify,
                                          manifest.kind == "sft")
            files.append(mm)
            masks += mk
            for arr, beg, ln in zip(c, b, n):
                chunk_ids.append(np.full(ln.size, len(chunks), dtype=np.int32))
                chunks.append(arr)
                begins.append(beg)
                lens.append(ln)
    except BaseException:
        for mm in files:
            mm.close()
        raise
    empty = np.zeros(0, dtype=np.int64)
    return DocIndex(
        chunks=chunks,
        doc_chunk=np.concatenate(chunk_ids) if chunk_ids else np.zeros(0, dtype=np.int32),
        doc_begin=np.concatenate(begins) if begins else empty,
        doc_len=np.concatenate(lens) if lens else empty,
        files=files,
        mask_chunks=masks if manifest.kind == "sft" else None,
    )
