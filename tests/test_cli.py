"""The `megalm` program's exit: the train verb leaves without teardown (no process-group destroy,
no interpreter teardown: a race in torch/gloo C++ destructors sometimes aborted finished ranks);
other verbs and in-process callers keep the plain behaviour."""

from __future__ import annotations

import sys

import pytest

import megalm.cli as cli
import megalm.train.cli as train_cli


def test_run_leaves_train_without_teardown(monkeypatch):
    calls = []
    monkeypatch.setattr(train_cli, "main", lambda argv, teardown=True: calls.append((argv, teardown)) or 0)
    monkeypatch.setattr(cli, "leave", lambda code: (calls.append(("leave", code)), sys.exit(code)))
    monkeypatch.setattr(sys, "argv", ["megalm", "train", "run.yaml", "train.steps=2"])
    with pytest.raises(SystemExit) as exc:
        cli.run()
    assert exc.value.code == 0
    assert calls == [(["run.yaml", "train.steps=2"], False), ("leave", 0)]


def test_in_process_callers_and_other_verbs_tear_down(monkeypatch):
    calls = []
    monkeypatch.setattr(train_cli, "main", lambda argv, teardown=True: calls.append(teardown) or 3)
    assert cli.main(["train", "run.yaml"]) == 3 and calls == [True]
    monkeypatch.setattr(cli, "leave", lambda code: pytest.fail("only the train verb leaves without teardown"))
    monkeypatch.setattr(sys, "argv", ["megalm", "--version"])
    with pytest.raises(SystemExit) as exc:
        cli.run()
    assert exc.value.code == 0
