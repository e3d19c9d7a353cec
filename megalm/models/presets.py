"""Named model shapes: megalm/configs/models/<name>.yaml (package data, so a wheel has them too;
`configs/` in the checkout links there), whose keys are exactly LLMConfig's fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megalm import CONFIGS_DIR
from megalm.config import field_names, key_line, read_yaml
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
    """The YAML mapping, with an unknown key reported as file:line."""
    values = read_yaml(path, "LLMConfig")
    known = field_names(LLMConfig)
    for key in values:
        if key not in known:
            raise UserError(f"{key_line(path, key)}: {key}: unknown key (expected one of {', '.join(sorted(known))})")
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
