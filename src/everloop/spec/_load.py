"""Reading `everloop.yaml`: YAML errors and schema errors become one `SpecError` naming each bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from everloop.errors import SpecError
from everloop.spec._model import ProjectSpec

SPEC_FILE = "everloop.yaml"


def load_spec(path: str | Path) -> ProjectSpec:
    """Load and validate a project file (or the `everloop.yaml` inside a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILE
    if not path.exists():
        raise SpecError(f"{path}: no project file here; create one with 'everloop init'", path=str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", path=str(path)) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise SpecError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}", path=str(path)) from None
    return parse_spec(raw, origin=str(path))


def parse_spec(raw: Any, origin: str = SPEC_FILE) -> ProjectSpec:
    """Validate an already-parsed mapping; `origin` names it in errors."""
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: expected a mapping of settings at the top, got {type(raw).__name__}", path=origin)
    try:
        return ProjectSpec.model_validate(raw)
    except ValidationError as exc:
        problems = describe_errors(exc, ProjectSpec)
        listing = "\n".join(f"  - {p}" for p in problems)
        raise SpecError(f"{origin}: {len(problems)} problem(s):\n{listing}", path=origin, problems=problems) from None


def describe_errors(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per problem of a pydantic validation of `model`: 'field.path: what is wrong (got value)'."""
    return [_describe(err, model) for err in exc.errors()]


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or "(top level)"
    kind = err["type"]
    if kind == "missing":
        return f"{loc}: required field is missing"
    if kind == "extra_forbidden":
        parent, _, key = loc.rpartition(".")
        allowed = _allowed_keys(model, parent)
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        return f"{loc}: unknown field {key!r}{hint}"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{loc}: {message} (got {shown})" if kind != "value_error" or loc != "(top level)" else message


def _is_union_tag(part: Any) -> bool:
    # pydantic names the tried union member in the location (e.g. 'str', 'SqlSource'); users never wrote those.
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or part[:1].isupper())


def _allowed_keys(root: type[BaseModel], dotted: str) -> list[str]:
    """The fields allowed at a dotted location, walking nested models and mapping values."""
    model: type[BaseModel] | None = root
    mapping_key = False  # the previous part was a dict field: this part is a key, not a field
    for part in filter(None, dotted.split(".")):
        if model is None:
            return []
        if mapping_key:
            mapping_key = False
            continue
        field = model.model_fields.get(part) or next((f for f in model.model_fields.values() if f.alias == part),
                                                     None)
        annotation = field.annotation if field else None
        if getattr(annotation, "__origin__", None) is dict:
            mapping_key = True
            annotation = annotation.__args__[1]
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        if isinstance(annotation, type):
            candidates.insert(0, annotation)
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
    # as written in the project file: a field's alias (`from`, a Python keyword, is the field `from_`)
    return sorted(f.alias or name for name, f in model.model_fields.items()) if model else []
