"""The Task interface: what a task must implement, what it may, and the one table of tasks."""

from __future__ import annotations

import math

import pytest

from megalm.errors import UserError
from megalm.train.config import TASKS, task_class
from megalm.train.task import Task, TaskHook
from tests.distributed.corpus import make_corpus
from tests.distributed.helper import run_distributed


def test_every_registered_task_is_a_task_subclass_named_by_its_key():
    for name in TASKS:
        cls = task_class(name)
        assert issubclass(cls, Task) and cls.name == name


def test_a_task_missing_a_required_method_cannot_be_built():
    class NoLoss(Task):
        name = "noloss"

        def build_model(self): ...
        def build_loader(self, split, dp_rank, dp_world): ...
        def build_eval_loader(self, dp_rank, dp_world): ...
        def fingerprint(self): ...

    with pytest.raises(TypeError, match="loss"):
        NoLoss()


def test_optional_hooks_default_to_the_plain_case():
    from tests.train.task_jobs import Regression

    task = Regression(cfg=None)
    hook = task.attach(engine=None, dp_rank=0, dp_world=1)
    assert type(hook) is TaskHook and not hook.carries_state
    assert hook.state_dict() == {} and hook.checkpoint_files() == {} and hook.after_step(1, True) is None
    assert task.tokenizer_model() is None and task.flops_per_token(task.build_model()) == 0
    assert task.saved_model_config({"dim": 4}) == {"dim": 4}
    for call in (lambda: task.pipeline_layers(None), lambda: task.pipeline_loss([]), lambda: task.pipeline_batch({})):
        with pytest.raises(UserError, match="task regression does not run as pipeline stages"):
            call()


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    shards = make_corpus(str(tmp_path_factory.mktemp("corpus") / "shards"))  # the config's data section only
    work = tmp_path_factory.mktemp("work")
    return run_distributed("tests.train.task_jobs:regression", {"workdir": str(work), "shards": shards}, nproc=2)


def test_a_new_task_trains_checkpoints_and_resumes_through_the_trainer(regression):
    for rank in regression:
        straight, first, second = rank["straight"], rank["first"], rank["second"]
        assert not straight["resumed"] and not first["resumed"] and second["resumed"]
        assert straight["summary"]["step"] == 4 and second["summary"]["step"] == 4
        losses = straight["losses"]
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
        # the split run's metrics (both halves, one run directory) equal the straight run's, bit for bit
        assert first["losses"] == losses[:2] and second["losses"] == losses
        assert not math.isnan(straight["summary"]["eval_loss"])
