"""Bad input reaches the user as one line on stderr, exit status 2, no traceback, no output."""

import gzip
import json

import pytest

from .conftest import run_prep


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


CASES = {
    "malformed_json": (b'{"text": "ok"}\n{"text": "unterminated\n', "bad.jsonl:2: malformed JSON"),
    "missing_key": (b'{"text": "ok"}\n{"body": "x", "id": 3}\n',
                    "bad.jsonl:2: no key 'text' (keys seen: body, id)"),
    "non_utf8": (b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n',
                 "bad.jsonl:3: invalid UTF-8 at byte offset 43"),
    "not_a_string": (b'{"text": 5}\n', "bad.jsonl:1: key 'text' holds a int"),
    "empty": (b"", "empty input"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_jsonl(tmp_path, model_path, case):
    data, needle = CASES[case]
    src = _write(tmp_path / "bad.jsonl", data)
    out = tmp_path / "out"
    proc = run_prep(src, "-o", out, "--tokenizer", model_path, check=False)
    _one_line_error(proc, needle)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.arrow")) if out.exists() else True


def test_bad_gzip_and_txt(tmp_path, model_path):
    gz = _write(tmp_path / "t.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100)[:-20])
    _one_line_error(run_prep(gz, "-o", tmp_path / "o", "--tokenizer", model_path, check=False),
                    "t.jsonl.gz: cannot read")
    txt = _write(tmp_path / "t.txt", b"line one\nline two \xff\n")
    _one_line_error(run_prep(txt, "-o", tmp_path / "o2", "--tokenizer", model_path,
                             check=False), "t.txt:2: invalid UTF-8 at byte offset 18")


def test_skip_bad_reports_count(tmp_path, model_path):
    src = _write(tmp_path / "bad.jsonl",
                 b'{"text": "good document one"}\n{oops\n{"text": "good two"}\n')
    proc = run_prep(src, "-o", tmp_path / "o", "--tokenizer", model_path, "--skip-bad")
    assert "bad_lines 1" in proc.stdout
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())[
        "stats"]["removed"]["bad_lines"] == 1


def test_bad_tokenizer_file(tmp_path, corpus):
    bad = _write(tmp_path / "junk.model", b"\x00\x01not a model")
    _one_line_error(run_prep(corpus, "-o", tmp_path / "o", "--tokenizer", bad, check=False),
                    "--tokenizer", "junk.model: not a sentencepiece model")


def test_foreign_manifest_refused(tmp_path, corpus, model_path, docs):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "megalm-shards",
                                                   "tokenizer": {"sha256": "ab" * 32}}))
    _one_line_error(run_prep(corpus, "-o", out, "--tokenizer", model_path, check=False),
                    "manifest.json: holds shards of another tokenizer", "--overwrite")


def test_usage_errors(tmp_path):
    _one_line_error(run_prep("--bogus", check=False), "unrecognized arguments: --bogus")
    _one_line_error(run_prep("x.jsonl", check=False), "--output is required")
    _one_line_error(run_prep("--verify", tmp_path, check=False), "no manifest")
    _one_line_error(run_prep(tmp_path / "nope.jsonl", "-o", tmp_path / "o", check=False),
                    "nope.jsonl: no such file")
    _one_line_error(run_prep("builtin:python-docs", "-o", tmp_path / "o", "--vocab-size", "2",
                             check=False), "--vocab-size: expected 8..")


@pytest.mark.parametrize("case", ["malformed_json", "non_utf8"])
def test_bad_line_met_while_training_the_tokenizer(tmp_path, case):
    """Without --tokenizer the first reader is the tokenizer's sample: its error must still
    name the file and line, not sentencepiece's training."""
    data, needle = CASES[case]
    src = _write(tmp_path / "bad.jsonl", b'{"text": "some words here"}\n' * 50 + data)
    lineno = 50 + int(needle.split(":")[1])
    proc = run_prep(src, "-o", tmp_path / "out", "--vocab-size", "40", check=False)
    line = _one_line_error(proc, f"bad.jsonl:{lineno}:")
    assert "tokenizer training failed" not in line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_truncated_gzip_while_training(tmp_path):
    gz = _write(tmp_path / "t.jsonl.gz", gzip.compress(b'{"text": "a b c"}\n' * 2000)[:-20])
    _one_line_error(run_prep(gz, "-o", tmp_path / "o", "--vocab-size", "40", check=False),
                    "t.jsonl.gz: cannot read")


def test_zst_that_is_not_zstd(tmp_path, model_path):
    bad = _write(tmp_path / "c.jsonl.zst", b'{"text": "plain, not compressed"}\n')
    _one_line_error(run_prep(bad, "-o", tmp_path / "o", "--tokenizer", model_path, check=False),
                    "c.jsonl.zst: not a readable zstd stream")


def test_output_folder_that_cannot_be_made(tmp_path, corpus, model_path):
    blocker = _write(tmp_path / "file", b"")
    _one_line_error(run_prep(corpus, "-o", blocker / "out", "--tokenizer", model_path,
                             check=False), f"--output {blocker / 'out'}: cannot create or write",
                    "expected a writable directory")
    # Refused even to root: sysfs takes no new directories.
    _one_line_error(run_prep(corpus, "-o", "/sys/megalm-prep-test", "--tokenizer", model_path,
                             check=False), "--output /sys/megalm-prep-test: cannot create",
                    "expected a writable directory")


def test_verify_of_a_file(tmp_path, corpus):
    _one_line_error(run_prep("--verify", corpus, check=False),
                    f"{corpus}: expected a shard directory made by `megalm prep`, got a file")


def test_vocab_smaller_than_asked_is_said_or_refused(tmp_path):
    src = _write(tmp_path / "small.jsonl", b'{"text": "tiny corpus with few words"}\n' * 20)
    proc = run_prep(src, "-o", tmp_path / "o", "--vocab-size", "5000")
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "--vocab-size 5000: the tokenizer sample yields only" in \
        warnings[0], proc.stderr
    got = json.loads((tmp_path / "o" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert f"only {got:,} pieces" in warnings[0]
    line = _one_line_error(run_prep(src, "-o", tmp_path / "o2", "--vocab-size", "5000",
                                    "--strict-vocab", check=False),
                           "--vocab-size 5000: the tokenizer sample yields only")
    assert not (tmp_path / "o2" / "manifest.json").exists(), line


def test_document_over_the_cap_is_one_line(tmp_path, model_path):
    big = ("word " * 300_000).strip()  # 1.4M characters
    data = (json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": big}) + "\n").encode()
    src = _write(tmp_path / "big.jsonl", data)
    _one_line_error(run_prep(src, "-o", tmp_path / "o", "--tokenizer", model_path,
                             "--max-document-mb", "1", check=False),
                    "big.jsonl:2: a document of 1.4M characters exceeds --max-document-mb 1")
    txt = _write(tmp_path / "big.txt", big.encode())
    _one_line_error(run_prep(txt, "-o", tmp_path / "o2", "--tokenizer", model_path,
                             "--max-document-mb", "1", check=False),
                    "big.txt: a document of 1.4M characters exceeds")
