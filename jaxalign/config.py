"""Load an ml-collections config file and apply `--config.a.b=value` overrides.

    config = load_config("configs/sft_tiny.py", ["--config.train.num_steps=10"])

The file must define `get_config() -> ml_collections.ConfigDict`. Overrides are coerced to the
type of the field they replace (bool, int, float, str, tuple, None); an unknown key is an error
that lists the valid keys at that level. The returned config is locked: later code may change
values but not add keys.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
import sys
from typing import Any, Sequence

import ml_collections

_PREFIX = "--config."


class ConfigError(ValueError):
    """A config file or an override is invalid; the message names the file or key."""


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports `path` and returns its `get_config()` (not yet locked)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    # configs/ is put on sys.path so a fork can `from configs import base` or `import base`.
    for directory in (str(path.parent.resolve()), str(path.parent.parent.resolve())):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(f"_jaxalign_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected ConfigDict")
    return config


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """`["--config.a.b=1", "--config.c", "x"]` -> `[("a.b", "1"), ("c", "x")]`."""
    pairs, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith(_PREFIX):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --config.a.b=value")
        body = arg[len(_PREFIX):]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            key, value = body, args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def _coerce(key: str, old: Any, text: str) -> Any:
    """Parses `text` into the type of the field's current value `old`."""
    if isinstance(old, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a bool (true/false), got {text!r}")
    if isinstance(old, int):
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)  # accept 1e3
            except ValueError:
                raise ConfigError(f"--config.{key}: expected an int, got {text!r}") from None
            if not value.is_integer():
                raise ConfigError(f"--config.{key}: expected an int, got {text!r}")
            return int(value)
    if isinstance(old, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a float, got {text!r}") from None
    if isinstance(old, str):
        return text
    if isinstance(old, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            # "a,b" without brackets: a tuple of strings.
            value = tuple(part.strip() for part in text.split(",") if part.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(old)(value)
    if old is None:
        if text.strip().lower() in ("none", "null", ""):
            return None
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise ConfigError(f"--config.{key}: cannot override a field of type {type(old).__name__}")


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets `config.<key>` from the string `text`, coerced to the existing field's type."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth]) or "<root>"
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key}: {prefix} is a value, not a group")
        if part not in node:
            valid = ", ".join(sorted(node.keys()))
            raise ConfigError(f"--config.{key}: unknown key {part!r} in {prefix}; valid keys: {valid}")
        if depth < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if isinstance(old, ml_collections.ConfigDict):
        valid = ", ".join(sorted(old.keys()))
        raise ConfigError(f"--config.{key} is a group; set one of its keys: {valid}")
    with node.unlocked():
        node[parts[-1]] = _coerce(key, old, text)


def load_config(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from `path`, applies `--config.*` overrides and locks the result."""
    config = load_config_file(path)
    for key, value in parse_overrides(overrides):
        apply_override(config, key, value)
    config.lock()
    return config


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """A stable JSON rendering of `config` (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def save_config(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """Writes WORKDIR/config.json (JSON) beside the checkpoints; returns its path."""
    path = pathlib.Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_json(config) + "\n")
    return path
