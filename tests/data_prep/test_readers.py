import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep.readers import ReadCounters, iter_documents, resolve
from megalm.errors import UserError

TEXTS = ["first document", "second\nwith two lines", "", "naïve café ✓"]


def _jsonl_bytes(texts, key="text"):
    return "".join(json.dumps({key: t, "n": i}) + "\n" for i, t in enumerate(texts)).encode()


def _read(paths, **kw):
    return list(iter_documents(resolve([str(p) for p in paths]), kw.pop("key", "text"), **kw))


def test_jsonl_plain_gz_zst(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl_bytes(TEXTS) + b"\n")  # blank line is ignored
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(TEXTS)))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        _jsonl_bytes(TEXTS)))
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        assert _read([tmp_path / name]) == TEXTS, name


def test_text_key_and_null(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": None}) + "\n")
    assert _read([p], key="body") == ["x", ""]


def test_parquet(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": TEXTS + [None], "other": list(range(5))}), p,
                   row_group_size=2)
    assert _read([p]) == TEXTS + [""]
    with pytest.raises(UserError, match=r"no column 'body' \(columns seen: text, other\)"):
        _read([p], key="body")


def test_txt_one_document_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("whole\nfile\n")
    assert _read([tmp_path / "a.txt"]) == ["whole\nfile\n"]


def test_directory_and_glob_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "c.jsonl").write_bytes(_jsonl_bytes(["C"]))
    (tmp_path / "ignored.csv").write_text("nope")
    # Directory: recursive, sorted by relative path ("a.txt" < "c.jsonl" < "sub/b.txt").
    assert _read([tmp_path]) == ["A", "C", "B"]
    assert _read([tmp_path / "*.txt"]) == ["A"]
    assert _read([tmp_path / "**" / "*.txt"]) == ["A", "B"]
    # Several inputs keep the order given.
    assert _read([tmp_path / "c.jsonl", tmp_path / "a.txt"]) == ["C", "A"]


def test_skip_bad_counts(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": broken\n\xff\xfe\n{"text": "ok2"}\n')
    counters = ReadCounters()
    assert _read([p], skip_bad=True, counters=counters) == ["ok", "ok2"]
    assert counters.bad_lines == 2
    assert "a.jsonl:2" in counters.bad_examples[0] and "a.jsonl:3" in counters.bad_examples[1]


def test_missing_and_unsupported_inputs(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        resolve([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(UserError, match="unsupported file type"):
        resolve([str(tmp_path / "x.csv")])
    with pytest.raises(UserError, match="unknown builtin"):
        resolve(["builtin:nope"])


def test_fast_reader_hands_over_midway_without_loss(tmp_path):
    """Arrow reads the first blocks; a null far into the file sends the rest to the line
    reader, which must continue exactly where Arrow stopped."""
    texts = [f"document number {i} " + "x" * 200 for i in range(60_000)]  # ~13 MB: >1 block
    records = [{"text": t} for t in texts] + [{"text": None}, {"text": "after"}]
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _read([p]) == texts + ["", "after"]


def test_document_cap_names_the_place_in_every_format(tmp_path):
    """The cap is in characters, the same on the fast (Arrow) and the line-by-line path."""
    texts = ["short", "é" * 3000, "ok"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_bytes(_jsonl_bytes(texts))
    (tmp_path / "nulls.jsonl").write_bytes(b'{"text": null}\n' + _jsonl_bytes(texts))
    limit = 2999
    with pytest.raises(UserError, match=r"t\.parquet: row 1: a document of 0\.0M characters "
                                        r"exceeds --max-document-mb"):
        _read([tmp_path / "t.parquet"], max_chars=limit)
    for name, line in (("t.jsonl", 2), ("nulls.jsonl", 3)):
        with pytest.raises(UserError, match=rf"{name}:{line}: a document"):
            _read([tmp_path / name], max_chars=limit)
        assert _read([tmp_path / name], max_chars=3000)[-3:] == texts
    # A JSON string spends at most 12 bytes per character: longer lines are not read whole.
    (tmp_path / "long.jsonl").write_bytes(_jsonl_bytes(["x" * 70_000]))
    with pytest.raises(UserError, match=r"long\.jsonl:1: line longer than 65,656 bytes"):
        _read([tmp_path / "long.jsonl"], max_chars=10)
