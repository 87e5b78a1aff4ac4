"""MkDocs hook: the configuration reference, generated from the pydantic models of `pipeline/config.py`.

`docs/reference/configuration.md` holds the marker below; `on_page_markdown` replaces it with one table per
section of `RunConfig`, recursively through nested models and lists of models (`label.judges[]`): every field's
dotted name, type, default and description, read from the models themselves, so the page cannot drift from the
code. A field without a description is a warning, which `mkdocs build --strict` turns into a failed build.
"""

from __future__ import annotations

import enum
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]  # docs/hooks/ -> the repository
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydantic import BaseModel
from pydantic.fields import FieldInfo

MARKER = "<!-- dice:config-reference -->"
log = logging.getLogger("mkdocs.hooks.config_reference")


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds: the model itself, in `X | None`, or as `list[X]` items."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _is_list_of_models(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list and bool(_models(annotation))


def type_text(annotation: Any) -> str:
    """An annotation as a reader of the YAML needs it: `"a" | "b"` for closed choices, `list[str]`, `int | None`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_text(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(f'"{m.value}"' for m in annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _yaml(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json", exclude_defaults=True) for v in value]
    elif isinstance(value, enum.Enum):
        value = value.value
    elif isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6, allow_unicode=True)
    return text.strip().removesuffix("...").strip()


def default_text(info: FieldInfo) -> str:
    """The default as it would be written in YAML; `required` when there is none."""
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel) and not value.model_dump(exclude_defaults=True):
        return "(section)"  # a section whose own fields give its defaults
    return f"`{_yaml(value)}`"


def _cell(text: str) -> str:
    """A description as one table cell: outside its code spans, `|` would end the cell, `<x>` would be read as an
    HTML tag and `*` as emphasis."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return "`".join(parts)


def anchor(path: str) -> str:
    return "cfg-" + path.replace("[]", "").replace(".", "-").replace("_", "-")


def sections(model: type[BaseModel], path: str, intro: str) -> list[tuple[str, str, list[str]]]:
    """(dotted path, intro, table rows) for `model` and, after it, every model nested in it."""
    rows, nested = [], []
    for name, info in model.model_fields.items():
        full = f"{path}.{name}" if path else name
        if not info.description:
            log.warning(f"pipeline/config.py: {model.__name__}.{name} has no description (every field needs one)")
        description = _cell(info.description or "")
        inner = _models(info.annotation)
        if inner:
            sub = f"{full}[]" if _is_list_of_models(info.annotation) else full
            description += f" See [`{sub}`](#{anchor(sub)})."
            nested += sections(inner[0], sub, info.description or "")
        rows.append(f"| `{full}` | `{type_text(info.annotation)}` | {default_text(info)} | {description} |")
    return [(path, intro, rows), *nested]


def render() -> str:
    from pipeline.config import RunConfig

    out = []
    for path, intro, rows in sections(RunConfig, "", ""):
        if path:
            item = " Each item of the list has these fields." if path.endswith("[]") else ""
            out += [f"## `{path}` {{#{anchor(path)}}}", "", f"{_cell(intro)}{item}", ""]
        else:
            out += ["## Top level {#cfg-top-level}", ""]
        out += ["| field | type | default | description |", "|---|---|---|---|", *rows, ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the marker with the generated reference (pages without it are returned unchanged)."""
    return markdown.replace(MARKER, render()) if MARKER in markdown else markdown
