"""One config path for every run: `--set SECTION.KEY=VALUE` reaches any field of a run's dataclass configs.

A run config is a dataclass whose fields are sections (dataclasses: `train`, `method`, `model`, ...) or plain
values. `--set train.lr=3e-4` sets a section's field; a bare `--set lr=3e-4` is taken when exactly one place
has the key. Values are parsed with the field's type (bools true/false, tuples comma-separated, `none` for an
optional field), and each changed section is rebuilt, so its own checks (`__post_init__`) run on the result.
`field_docs` reads each field's one-line meaning from its comment, for `--help`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing


def _parse_value(text: str, kind):
    origin = typing.get_origin(kind)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(kind) or (float,)
        return origin(_parse_value(t, inner) for t in text.split(",") if t)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if text.lower() == "none" else _parse_value(text, options[0])
    return kind(text)


def _sections(root) -> dict[str, object]:
    return {f.name: getattr(root, f.name) for f in dataclasses.fields(root)
            if dataclasses.is_dataclass(getattr(root, f.name))}


def _field_names(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _locate(root, key: str) -> tuple[str | None, str]:
    """(section or None for the root, field) that `key` names; ValueError naming the options otherwise."""
    sections = _sections(root)
    if "." in key:
        section, _, name = key.partition(".")
        if section not in sections:
            raise ValueError(f"--set {key}: no section {section!r}; sections: {sorted(sections)}")
        if name not in _field_names(sections[section]):
            options = _field_names(sections[section])
            raise ValueError(f"--set {key}: {section} has no option {name!r}; options: {options}")
        return section, name
    plain = [n for n in _field_names(root) if n not in sections]
    if key in plain:
        return None, key
    owners = [s for s, obj in sections.items() if key in _field_names(obj)]
    if len(owners) == 1:
        return owners[0], key
    if owners:
        raise ValueError(f"--set {key}: ambiguous, say {' or '.join(f'{s}.{key}' for s in owners)}")
    options = plain + [f"{s}.{n}" for s, obj in sections.items() for n in _field_names(obj)]
    raise ValueError(f"--set: no option {key!r}; options: {options}")


def apply_overrides(root, assignments: list[str]):
    """A copy of dataclass `root` with `key=value` assignments applied (typed by the field, checked by its class)."""
    changes: dict[str | None, dict[str, object]] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        section, name = _locate(root, key.strip())
        owner = root if section is None else getattr(root, section)
        kind = typing.get_type_hints(type(owner))[name]
        try:
            changes.setdefault(section, {})[name] = _parse_value(value, kind)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--set {key}: cannot parse {value!r} as {kind}: {e}") from e
    top = changes.pop(None, {})
    for section, values in changes.items():
        top[section] = dataclasses.replace(getattr(root, section), **values)
    return dataclasses.replace(root, **top) if top else root


def field_docs(cls) -> dict[str, str]:
    """{field: meaning} of dataclass `cls`: the comment on the field's line, else the comment lines above it."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs, pending = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"\s+(\w+)\s*:", line)
        if match and match.group(1) in names:
            comment = line.partition("  # ")[2].strip()
            docs[match.group(1)] = comment or " ".join(pending)
        pending = []
    return docs


def describe(root) -> str:
    """Every option of `root` as `key = value  meaning` lines, section by section (for --help)."""
    lines = []
    sections = _sections(root)
    plain = [n for n in _field_names(root) if n not in sections]
    groups = [(None, root, plain)] + [(s, obj, _field_names(obj)) for s, obj in sections.items()]
    for section, obj, names in groups:
        if not names:
            continue
        docs = field_docs(type(obj))
        lines.append(f"{section or 'run'} options:")
        for name in names:
            key = name if section is None else f"{section}.{name}"
            value = getattr(obj, name)
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            lines.append(f"  {key} = {shown}" + (f"  ({docs[name]})" if docs.get(name) else ""))
    return "\n".join(lines)
