"""megalm.config: the one mechanism every config section is built and validated with."""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass, field

import pytest

from megalm.config import INTERNAL, Invalid, Section, apply_overrides, build, read_yaml
from megalm.errors import UserError
from megalm.train.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CALLS: list[str] = []


@dataclass
class Inner(Section):
    size: int = 1
    rate: float = 0.5
    names: list[str] = field(default_factory=list)

    def validate(self) -> None:
        CALLS.append("inner")
        if self.size > 10:
            raise Invalid("size", f"expected at most 10, got {self.size}")


@dataclass
class Outer(Section):
    required: str
    inner: Inner = field(default_factory=Inner)
    flag: bool = False
    origin: str = field(default="", metadata=INTERNAL)

    def validate(self) -> None:
        CALLS.append("outer")
        if self.flag and self.inner.size == 1:
            raise Invalid("inner.size", "must be set when flag is on")


def test_build_coerces_and_validates_innermost_first():
    CALLS.clear()
    cfg = build(Outer, {"required": "x", "inner": {"size": 3.0, "rate": "1e-3", "names": ["a"]}}, "run.yaml",
                internal={"origin": "run.yaml"})
    assert cfg == Outer("x", Inner(3, 1e-3, ["a"]), False, "run.yaml")
    assert isinstance(cfg.inner.size, int) and CALLS == ["inner", "outer"]


@pytest.mark.parametrize("data, error", [
    ({"required": "x", "inner": {"sise": 1}}, "run.yaml: inner.sise: unknown key (expected one of names, rate, size)"),
    ({"required": "x", "origin": "y"}, "run.yaml: origin: unknown key"),
    ({}, "run.yaml: required: required key missing"),
    ({"required": "x", "inner": {"size": 1.5}}, "run.yaml: inner.size: expected an integer, got 1.5"),
    ({"required": "x", "inner": {"rate": ".inf"}}, "run.yaml: inner.rate: expected a number, got '.inf'"),
    ({"required": "x", "inner": {"names": "a"}}, "run.yaml: inner.names: expected a list, got 'a'"),
    ({"required": "x", "flag": "yes"}, "run.yaml: flag: expected true or false, got 'yes'"),
    ({"required": "x", "inner": 3}, "run.yaml: inner: expected a mapping, got 3"),
    ({"required": "x", "inner": {"size": 11}}, "run.yaml: inner.size: expected at most 10, got 11"),
    ({"required": "x", "flag": True}, "run.yaml: inner.size: must be set when flag is on"),
])
def test_every_error_is_one_line_naming_file_and_dotted_key(data, error):
    with pytest.raises(UserError) as exc:
        build(Outer, data, "run.yaml")
    assert str(exc.value).startswith(error) and "\n" not in str(exc.value)


def test_overrides_and_yaml_errors(tmp_path):
    raw = {"inner": {"size": 2}}
    apply_overrides(raw, ["inner.rate=3e-4", "inner.names=[a, b]", "required=x"], "run.yaml")
    assert build(Outer, raw, "run.yaml").inner == Inner(2, 3e-4, ["a", "b"])
    with pytest.raises(UserError, match=r"^run.yaml: required: is not a section, cannot set required.x$"):
        apply_overrides(raw, ["required.x=1"], "run.yaml")
    with pytest.raises(UserError, match=r"^override 'inner': expected key=value$"):
        apply_overrides(raw, ["inner"], "run.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1,\n")
    with pytest.raises(UserError, match=r"^run.yaml:3: invalid YAML"):
        read_yaml(bad, name="run.yaml")
    bad.write_text("- 1\n")
    with pytest.raises(UserError, match=r"expected a mapping of config keys at the top level"):
        read_yaml(bad)
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize("task, override, error", [
    ("lm", "model.n_layer=2", "model.n_layer: unknown key (expected one of activation_checkpointing"),
    ("lm", "model.dim=wide", "model.dim: expected an integer, got 'wide'"),
    ("diffusion", "model.dept=2", "model.dept: unknown key (expected one of channels, depth"),
    ("diffusion", "model.learn_sigma=1", "model.learn_sigma: expected true or false, got 1"),
])
def test_the_model_section_is_typed_by_the_task(task, override, error):
    """Checked when the config loads, before any data or model exists."""
    with pytest.raises(UserError) as exc:
        load_config(None, [f"task={task}", "data.paths=[d]", "train.steps=1", override])
    assert str(exc.value).startswith(f"config: {error}")


def test_model_section_values_are_coerced_to_their_field_types():
    cfg = load_config(None, ["data.paths=[d]", "train.steps=1", "model=tiny", "model.norm_eps=1e-6"])
    assert cfg.model == {"preset": "tiny", "norm_eps": 1e-6}


def _config_dataclasses() -> list[str]:
    """file:Class of every dataclass in the package that has a `validate` method."""
    found = []
    for top in ("megalm", "data_prep", "launcher"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                    if any(isinstance(b, ast.FunctionDef) and b.name == "validate" for b in node.body):
                        bases = [ast.unparse(b) for b in node.bases]
                        found.append((f"{path.relative_to(ROOT)}:{node.name}", "Section" in bases))
    return found


def test_every_validated_config_dataclass_is_a_section():
    """One validation style: a config dataclass that validates itself does it as a Section."""
    found = _config_dataclasses()
    assert len(found) >= 15, found  # TrainConfig's sections, LLMConfig, DiTConfig, LoRA, prep...
    assert [name for name, ok in found if not ok] == []


def test_a_field_type_without_a_coercion_is_a_programming_error():
    @dataclass
    class Odd(Section):
        either: int | str = 0

    with pytest.raises(TypeError, match="either: config fields are one type or `X | None`"):
        build(Odd, {"either": 1}, "run.yaml")


def test_config_from_a_pipe_as_with_process_substitution(tmp_path):
    """`megalm train <(generate-config)`: the path is not a regular file."""
    import os

    r, w = os.pipe()
    os.write(w, b"data:\n  paths: [d]\ntrain:\n  steps: 3\n")
    os.close(w)
    try:
        assert load_config(f"/dev/fd/{r}").train.steps == 3
    finally:
        os.close(r)
    with pytest.raises(UserError, match=r"cannot read config \(Is a directory\)"):
        load_config(str(tmp_path))
