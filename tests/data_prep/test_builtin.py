import itertools
import json

from data_prep.builtin import iter_python_docs, write_python_docs_jsonl


def test_corpus_is_deterministic_real_text(docs):
    again = list(itertools.islice(iter_python_docs(), len(docs)))
    assert again == docs
    from pydoc_data import topics

    # Topics come first, sorted by name; then docstrings.
    first = sorted(topics.topics)[0]
    assert docs[0] == topics.topics[first].strip()
    assert sum(map(len, docs)) > 500_000
    assert all(d.strip() for d in docs)


def test_write_jsonl_limits_bytes(tmp_path, docs):
    path = tmp_path / "c.jsonl"
    n = write_python_docs_jsonl(path, max_bytes=100_000)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == n > 10
    assert path.stat().st_size <= 100_000
    assert [json.loads(line)["text"] for line in lines] == docs[:n]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
