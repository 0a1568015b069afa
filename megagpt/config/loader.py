"""YAML recipes -> the typed config tree, strictly.

Unknown keys, wrong types and duplicate keys are errors naming the key and ``file:line``; an
empty section (``train:`` with nothing under it) keeps its defaults. Dotted ``KEY=VALUE``
overrides from the command line go through the same checks (a key given twice there: the last
one wins, as with any command line).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from megagpt.config.schema import SECTIONS, Config, to_dict
from megagpt.errors import MegagptError


class ConfigError(MegagptError, ValueError):
    """A config problem a user can fix; the message names the key and where it came from."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _line_map(node: yaml.Node | None, prefix: str, out: dict[str, int]) -> None:
    """Record the 1-based line of every dotted key in a composed YAML mapping (None: empty)."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        out[key] = key_node.start_mark.line + 1
        _line_map(value_node, key + ".", out)


def _check_duplicates(node: yaml.Node | None, prefix: str, path: Path, seen: set[int]) -> None:
    """Raise ConfigError at the second of two equal keys in any mapping of a composed document.

    PyYAML keeps the last of duplicate keys silently; a recipe that sets ``train.steps`` twice
    (or has two ``train:`` sections) almost always means one of them is a leftover.
    """
    if node is None or id(node) in seen:  # an alias repeats a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            name = str(key_node.value)
            if key_node.tag != "tag:yaml.org,2002:merge":  # "<<: *base" merges, it is no key
                if name in first:
                    raise ConfigError(
                        f"{path}:{line}: duplicate key '{prefix}{name}' "
                        f"(also at line {first[name]})"
                    )
                first[name] = line
            _check_duplicates(value_node, f"{prefix}{name}.", path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{prefix.removesuffix('.')}[{i}].", path, seen)


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    """Check ``value`` against a field type; ints are accepted where floats are expected."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(
            f"{where}: key '{key}' must be {expected}, got {value!r} ({type(value).__name__})"
        )

    if typ is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if typ in (int, float) and isinstance(value, str):
        # PyYAML reads "3e-4" (no dot) as a string: accept any text that parses as a number.
        try:
            value = float(value)
        except ValueError:
            raise bad("an integer" if typ is int else "a number") from None
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad("an integer")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if typ is list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise bad("a list")
        return value
    return value


def _apply(cfg: Config, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    sections = {f.name for f in dataclasses.fields(Config)}
    if len(parts) != 2 or parts[0] not in sections:
        hint = difflib.get_close_matches(parts[0], sections, n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint and hint[0] != parts[0] else ""
        raise ConfigError(
            f"{where}: unknown key '{dotted}'{extra}; keys are SECTION.FIELD with "
            f"SECTION one of {', '.join(sorted(sections))}"
        )
    section = getattr(cfg, parts[0])
    hints = _hints(type(section))
    if parts[1] not in hints:
        hint = difflib.get_close_matches(parts[1], hints, n=1)
        extra = f" (did you mean '{parts[0]}.{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{where}: unknown key '{dotted}'{extra}")
    value = _coerce(value, hints[parts[1]], dotted, where)
    choices = type(section).__dataclass_fields__[parts[1]].metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: key '{dotted}' must be one of {list(choices)}, got {value!r}")
    setattr(section, parts[1], value)


def load_yaml(path: str | Path) -> list[tuple[str, Any, str]]:
    """Read a recipe into (dotted key, value, "file:line") triples, in file order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    _check_duplicates(node, "", path, set())
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    lines: dict[str, int] = {}
    _line_map(node, "", lines)
    items = []
    for section, body in data.items():
        where = f"{path}:{lines.get(str(section), 0)}"
        if str(section) in SECTIONS and body is None:
            # `train:` with every line below it commented out: the section's defaults, as an
            # empty file means every default (an error here would only make the user delete
            # the header too).
            continue
        if str(section) in SECTIONS and not isinstance(body, dict):
            raise ConfigError(
                f"{where}: section '{section}' must be a mapping of its keys (indented "
                f"'key: value' lines below '{section}:'), got {body!r} "
                f"({type(body).__name__})"
            )
        if not isinstance(body, dict):
            items.append((str(section), body, where))  # _apply names the unknown section
            continue
        for key, value in body.items():
            dotted = f"{section}.{key}"
            items.append((dotted, value, f"{path}:{lines.get(dotted, 0)}"))
    return items


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ("optim.lr", 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(
            f"command line: override {text!r} must look like KEY=VALUE, e.g. train.steps=100"
        )
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Build a Config from an optional YAML recipe plus dotted overrides, then resolve it.

    Raises ConfigError naming the file:line (or "command line") and the key for any problem.
    Resolution fills model fields left at 0/"" from the registered size ``model.name`` and the
    LR and batch from the size's table row.
    """
    cfg = Config()
    items = load_yaml(path) if path else []
    for o in overrides:
        key, value = parse_override(o)
        items.append((key, value, f"command line '{o}'"))
    explicit: dict[str, str] = {}
    # model.name first, so that a size's values are the base that explicit keys override.
    for key, value, where in items:
        if key == "model.name":
            _apply(cfg, key, value, where)
            explicit[key] = where
    if cfg.model.name:
        _resolve_size(cfg, explicit.get("model.name", "model.name"))
    for key, value, where in items:
        if key != "model.name":
            _apply(cfg, key, value, where)
            explicit[key] = where
    _fill_defaults(cfg)
    return cfg


def _resolve_size(cfg: Config, where: str) -> None:
    from megagpt.config.sizes import get_size

    try:
        size = get_size(cfg.model.name)
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from None
    # The size fixes the architecture; the dropouts are training choices and stay as given.
    cfg.model = dataclasses.replace(
        size.model_config(),
        dropout=cfg.model.dropout,
        attention_dropout=cfg.model.attention_dropout,
    )
    cfg.optim.lr = size.lr
    cfg.train.global_batch_size = size.global_batch_sequences


def _fill_defaults(cfg: Config) -> None:
    if not cfg.run.name:
        cfg.run.name = Path(cfg.run.dir).name


def dump_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML (written into the run directory at start)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
