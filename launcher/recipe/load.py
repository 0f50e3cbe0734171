"""Reading a recipe: YAML, --set overrides, validation against the schema with every error at once (dotted path,
value given, what was expected), and the resolved recipe written back as YAML."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from launcher.errors import LauncherError
from launcher.recipe.schema import Recipe


def _fields_at(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _format_errors(e: ValidationError) -> list[str]:
    lines = []
    for err in e.errors(include_url=False):
        if err["type"] == "value_error" and err["msg"].startswith("Value error, ["):
            for path, value, expected in json.loads(err["msg"][len("Value error, "):]):
                lines.append(f"{path}: got {value!r}, expected {expected}")
            continue
        path = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = _fields_at(err["loc"])
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            lines.append(f"{path}: unknown key ({hint}known here: {', '.join(known)})")
        elif err["type"] == "missing":
            lines.append(f"{path}: missing, required")
        else:
            lines.append(f"{path}: got {err['input']!r}, expected {err['msg'].lower()}")
    return lines


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set optim.lr=1e-5 model.freeze_encoder=true`: each value is read as YAML (numbers, booleans, lists)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LauncherError(f"--set {item!r}: expected KEY.SUB=VALUE, e.g. --set optim.lr=1e-5")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LauncherError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else value
    return raw


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raises LauncherError listing every problem at once."""
    path = Path(path)
    if not path.is_file():
        raise LauncherError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LauncherError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise LauncherError(f"{path}: a recipe is a mapping of sections (model, data, optim, ...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        lines = _format_errors(e)
        raise LauncherError(f"{path}: {len(lines)} problem(s):\n  " + "\n  ".join(lines)) from None


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False, allow_unicode=True)
