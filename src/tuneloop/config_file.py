"""Loading a `LoopConfig` from YAML with `--set key.path=value` overrides, and turning pydantic errors into
messages that name the field and say what to do."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneloop.config import LoopConfig, nested_model
from tuneloop.errors import ConfigError


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> LoopConfig:
    """Read the YAML file at `path` (or start from defaults when None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    config_dir: Path | None = None
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}", hint="pass an existing YAML file with -c/--config")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}", hint="check indentation and quoting") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections (project, model, data, ...)")
        raw = loaded
        config_dir = file.resolve().parent
    for override in overrides or []:
        apply_override(raw, override)
    config = validate_config(raw, source=str(path) if path else "<defaults>")
    config._config_dir = config_dir
    return config


def validate_config(raw: dict[str, Any], source: str = "<config>") -> LoopConfig:
    try:
        return LoopConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source), hint=_hint_for(exc)) from exc


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place. The value is parsed as YAML (`0.2`, `true`, `[q_proj]`);
    list items are addressed by index (`data.sources.0.path=...`)."""
    key, sep, value_text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad --set {override!r}", hint="write --set section.field=value, e.g. --set data.seed=7")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    parts = key.strip().split(".")
    node: Any = raw
    for position, part in enumerate(parts[:-1]):
        next_part = parts[position + 1]
        node = _child(node, part, make_list=next_part.isdigit(), override=override)
    _assign(node, parts[-1], value, override)


def _child(node: Any, part: str, make_list: bool, override: str) -> Any:
    if isinstance(node, list):
        if part.isdigit() and int(part) == len(node):  # the next index adds an item
            node.append([] if make_list else {})
        return node[_index(part, node, override)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {override}: {part!r} is inside a value that is not a section")
    if part not in node or node[part] is None:
        node[part] = [] if make_list else {}
    return node[part]


def _assign(node: Any, part: str, value: Any, override: str) -> None:
    if isinstance(node, list):
        index = int(part) if part.isdigit() else -1
        if index == len(node):
            node.append(value)
            return
        node[_index(part, node, override)] = value
        return
    if not isinstance(node, dict):
        raise ConfigError(f"--set {override}: cannot set {part!r} inside a plain value")
    node[part] = value


def _index(part: str, node: list[Any], override: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(
            f"--set {override}: list index {part!r} out of range (the list has {len(node)} item(s))",
            hint="indices start at 0; to add an item use the next index",
        )
    return int(part)


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} invalid config value(s):"]
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "<root>"
        if error["type"] == "extra_forbidden":
            lines.append(f"  - {location}: unknown key{_suggestion(error['loc'])}")
        else:
            given = error.get("input")
            shown = "" if isinstance(given, dict | list) else f" (got {given!r})"
            lines.append(f"  - {location}: {error['msg']}{shown}")
    return "\n".join(lines)


def _hint_for(exc: ValidationError) -> str:
    if any(error["type"] == "extra_forbidden" for error in exc.errors()):
        return "run `tuneloop config schema` or see docs/config.md for every accepted key"
    return "see docs/config.md for each field's type and meaning"


def _suggestion(location: tuple[Any, ...]) -> str:
    """Suggest the closest valid key for a misspelt one."""
    model: Any = LoopConfig
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return ""
        model = nested_model(field.annotation)
        if model is None:
            return ""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(location[-1]), list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(model.model_fields)}"
