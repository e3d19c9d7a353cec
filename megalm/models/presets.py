"""Named model shapes: megalm/configs/models/<name>.yaml (package data, so a wheel has them too;
`configs/` in the checkout links there), whose keys are exactly LLMConfig's fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from megalm import CONFIGS_DIR
from megalm.errors import UserError
from megalm.models.config import LLMConfig

PRESET_DIR = CONFIGS_DIR / "models"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"{path}: model config file not found")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise UserError(f"model preset {str(name_or_path)!r}: unknown; expected one of "
                        f"{', '.join(preset_names())} or a path to a .yaml file")
    return preset


def _parse(path: Path) -> dict[str, Any]:
    """The YAML mapping, with unknown keys reported as file:line."""
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(values, dict) or not isinstance(node, yaml.MappingNode):
        raise UserError(f"{path}: expected a mapping of LLMConfig fields")
    known = LLMConfig.__dataclass_fields__
    for key_node, _ in node.value:
        if key_node.value not in known:
            raise UserError(f"{path}:{key_node.start_mark.line + 1}: unknown key {key_node.value!r}; "
                            f"expected one of {', '.join(sorted(known))}")
    return values


def load_preset(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> LLMConfig:
    """LLMConfig from a preset name (`tiny`, `llama3-8b`, ...) or a YAML path, then `overrides`.

    Errors name the file (and line) or the override key at fault.
    """
    path = _resolve(name_or_path)
    values = _parse(path)
    source = str(path)
    if overrides:
        values.update(overrides)
        source = f"{path} + overrides {sorted(overrides)}"
    return LLMConfig.from_dict(values, source=source)
