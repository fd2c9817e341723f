"""Loading a config: a YAML file, then `section.key=value` overrides, into the schema's dataclasses."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from .schema import Config, ConfigError, from_dict


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int):
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last silently, so a
    second `model:` section would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in first:
                raise _DuplicateKey(key, line, first[key])
            first[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str) -> dict:
    """The file's top-level mapping; a missing, empty or malformed file, or a repeated key, is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file; pass a YAML file such as configs/tiny.yaml")
    text = p.read_text()
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"--config {path}:{e.line}: '{e.key}' is given twice in the same section (first on line "
                          f"{e.first}); YAML would keep only the last one, so merge the two") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if tree is None:
        raise ConfigError(f"--config {path}: the file is empty; give sections such as model:, moe:, train:, "
                          "or leave out --config to train with the defaults")
    if not isinstance(tree, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of sections (model:, moe:, ...)")
    return tree


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`model.d_model=512 moe.top_k=1` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value, for example moe.top_k=2")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def merge(base: dict, extra: dict) -> dict:
    """`extra`'s keys over `base`'s, section by section."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                world_size: Optional[int] = None) -> Config:
    """YAML (optional) + overrides -> a validated Config, its derived values still unresolved.

    With `world_size`, the layout is checked too (validate_layout); `resolve` fills the derived values.
    """
    from .validate import validate, validate_layout

    tree = read_yaml(path) if path is not None else {}
    cfg = from_dict(Config, merge(tree, parse_overrides(overrides or [])))
    validate(cfg)
    if world_size is not None:
        validate_layout(cfg, world_size)
    return cfg
