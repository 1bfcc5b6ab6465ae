"""Load an ml-collections config file and apply `--config.a.b=value` overrides.

    config = load_config("configs/sft_tiny.py", ["--config.train.num_steps=10"])

The file must define `get_config() -> ml_collections.ConfigDict`. Overrides are coerced to the
type of the field they replace (bool, int, float, str, tuple, None); an unknown key is an error
that lists the valid keys at that level; a non-finite float (nan/inf) is an error naming the key.
The returned config is locked: later code may change values but not add keys.

The file is loaded by path and never put first on `sys.path`: a stray `grain.py` or `json.py`
beside a config cannot shadow a library. `from configs import base` resolves to the config's own
`configs/` directory when the file lives in one, else to the repository's `configs/`; a sibling
`import parent` works too (the file's directory is searched last, and only while it loads).

    validate_config(config)                                  # value checks (batch_size > 0, ...)
    check_config_change(workdir / "config.json", config, allow=False)  # refuse drift on resume
    check_and_save_config(config, workdir, allow_change=False)         # check, then write config.json
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import importlib.util
import json
import logging
import math
import pathlib
import sys
import types
from typing import Any, Iterator, Sequence

import ml_collections

from jaxalign import files

_PREFIX = "--config."


class ConfigError(ValueError):
    """A config file or an override is invalid; the message names the file or key."""


REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"  # the repository's configs/


def _configs_package_dir(path: pathlib.Path) -> pathlib.Path | None:
    """The directory `import configs` should mean while loading `path`."""
    if path.parent.name == "configs":
        return path.parent
    if (REPO_CONFIGS / "__init__.py").is_file():
        return REPO_CONFIGS
    return None


def _register_configs_package(directory: pathlib.Path) -> None:
    """Makes `configs` (and `configs.<name>`) resolve to `directory`, without touching sys.path."""
    current = sys.modules.get("configs")
    if current is not None:
        paths = [pathlib.Path(p).resolve() for p in getattr(current, "__path__", [])]
        if paths == [directory]:
            return
        # Another configs/ dir was loaded before: drop it and its submodules so this one's load.
        for name in [n for n in sys.modules if n == "configs" or n.startswith("configs.")]:
            del sys.modules[name]
    init = directory / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location("configs", init, submodule_search_locations=[str(directory)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["configs"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["configs"]
            raise
    else:
        module = types.ModuleType("configs")
        module.__path__ = [str(directory)]
        sys.modules["configs"] = module


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports `path` and returns its `get_config()` (not yet locked)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    path = path.resolve()
    package_dir = _configs_package_dir(path)
    if package_dir is not None:
        _register_configs_package(package_dir.resolve())
    # Sibling imports (`import base`) find the file's directory, but only after everything
    # installed, and only while the config loads: nothing next to it can shadow a library.
    directory = str(path.parent)
    appended = directory not in sys.path
    if appended:
        sys.path.append(directory)
    try:
        spec = importlib.util.spec_from_file_location(f"_jaxalign_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path} has no get_config() function")
        config = module.get_config()
    finally:
        if appended and directory in sys.path:
            sys.path.remove(directory)
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
    check_finite(config)
    config.lock()
    return config


def mesh_settings(path: str | pathlib.Path = "", overrides: Sequence[str] = ()):
    """config.mesh of a config file (with `--config.*` overrides) as typed
    parallel.mesh.MeshSettings; the default settings (every device, FSDP) without a file. For
    commands that take --config only to place their models."""
    from jaxalign.parallel import mesh as mesh_lib

    if not path:
        return mesh_lib.MeshSettings()
    mesh = load_config(path, overrides).mesh
    fields = [field.name for field in dataclasses.fields(mesh_lib.MeshSettings)]
    missing = [name for name in fields if name not in mesh]
    if missing:
        raise ConfigError(f"{path}: config.mesh has no {', '.join(missing)}")
    return mesh_lib.MeshSettings(**{name: mesh[name] for name in fields})


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf; tuple/list elements get `key[i]`."""
    if isinstance(node, (ml_collections.ConfigDict, dict)):
        for key in sorted(node.keys()):
            yield from _leaves(node[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (tuple, list)):
        for i, item in enumerate(node):
            yield from _leaves(item, f"{prefix}[{i}]")
    else:
        yield prefix, node


def check_finite(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first float field that is nan or +-inf."""
    for key, value in _leaves(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config.{key} is {value}: float settings must be finite")


# Integer fields that must be >= 1 (checked when present).
POSITIVE_INT_FIELDS = (
    "data.batch_size",
    "data.eval_batch_size",
    "data.max_length",
    "train.grad_accum_steps",
    "model.hf_config.vocab_size",
    "model.hf_config.hidden_size",
    "model.hf_config.intermediate_size",
    "model.hf_config.num_hidden_layers",
    "model.hf_config.num_attention_heads",
    "model.hf_config.num_key_value_heads",
    "model.hf_config.max_position_embeddings",
    "checkpoint.keep",
    "rl.prompt_length",
    "rl.max_new_tokens",
    "rl.ppo_epochs",
    "rl.num_minibatches",
)

# Integer fields that must be >= 0.
NON_NEGATIVE_INT_FIELDS = ("checkpoint.save_every", "train.log_every", "train.eval_every")


def _get(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    node = config
    for part in key.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Value checks a config must pass before anything runs; ConfigError naming the key.

    Float fields are finite; sizes and counts (POSITIVE_INT_FIELDS) are ints >= 1; intervals
    (NON_NEGATIVE_INT_FIELDS) are ints >= 0; attention heads divide the hidden size and KV heads
    divide the attention heads.
    """
    check_finite(config)
    for key in POSITIVE_INT_FIELDS + NON_NEGATIVE_INT_FIELDS:
        present, value = _get(config, key)
        if not present:
            continue
        low = 1 if key in POSITIVE_INT_FIELDS else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"config.{key} is {value!r}: expected an int >= {low}")
    present, hf = _get(config, "model.hf_config")
    if present:
        heads, kv_heads, hidden = (hf.get(k) for k in ("num_attention_heads", "num_key_value_heads", "hidden_size"))
        if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden % heads:
            raise ConfigError(
                f"config.model.hf_config.num_attention_heads={heads} does not divide hidden_size={hidden}"
            )
        if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0 and heads % kv_heads:
            raise ConfigError(
                f"config.model.hf_config.num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}"
            )


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """A stable JSON rendering of `config` (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def save_config(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """Writes WORKDIR/config.json (JSON) beside the checkpoints; returns its path.

    The file is replaced atomically (write + rename), so a crash never leaves half a record.
    """
    return files.write_text(pathlib.Path(workdir) / "config.json", config_to_json(config) + "\n")


# Fields a resumed run may change: they do not alter the data order, the model or the updates
# made so far (how long to train, how often to log/evaluate/save, the device layout).
SAFE_CONFIG_CHANGES = (
    "train.num_steps",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "data.eval_batch_size",
    "checkpoint.*",
    "mesh.*",
)

_ABSENT = "<absent>"

# Fields moved into an algorithm's group (config.rl.<algorithm>) since earlier runs wrote their
# config.json: {old key: {config.stage: new key}}. check_config_change reads an earlier run's
# config.json through this table, so a resumed run compares like with like; a moved field that its
# run's stage never read (rl.threshold of a ppo run) is dropped.
_LAGRANGIAN = ("ppo_lag", "safe_grpo", "multi_lag")
MOVED_FIELDS = {
    "rl.threshold": {stage: f"rl.{stage}.threshold" for stage in ("ppo_lag", "safe_grpo")},
    "rl.lambda_init": {**{stage: f"rl.{stage}.lambda_init" for stage in _LAGRANGIAN},
                       "ppo_reward_shaping": "rl.ppo_reward_shaping.nu"},
    **{f"rl.{name}": {stage: f"rl.{stage}.{name}" for stage in _LAGRANGIAN}
       for name in ("lambda_lr", "lambda_max", "lambda_update_delay_steps", "episode_cost_window_size")},
    "rl.cost_per_token": {stage: f"rl.{stage}.cost_per_token" for stage in ("ppo_lag", "multi_lag")},
    "rl.constraints": {"multi_lag": "rl.multi_lag.constraints"},
}


def _with_moved_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A flattened earlier config.json with its MOVED_FIELDS under their current keys."""
    stage = saved.get("stage")
    current = {}
    for key, value in saved.items():
        if key in MOVED_FIELDS:
            key = MOVED_FIELDS[key].get(stage)
            if key is None:
                continue
        current[key] = value
    return current


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        items: dict[str, Any] = {}
        for key, value in tree.items():
            items.update(_flatten(value, f"{prefix}{key}."))
        return items
    return {prefix[:-1]: tree}


def _is_safe_change(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in SAFE_CONFIG_CHANGES)


def check_config_change(
    saved_json_path: str | pathlib.Path, config: ml_collections.ConfigDict, allow: bool = False
) -> list[str]:
    """Compares `config` with the config.json of an earlier run; returns the changes as
    `"key: old -> new"` (empty when nothing changed or no file exists).

    The earlier run's fields that moved since (MOVED_FIELDS) are compared under their current keys.
    Changes to SAFE_CONFIG_CHANGES fields are logged. Any other change (batch size, seed,
    learning rate, data, model, ...) would resume a different run: ConfigError naming every such
    field, unless `allow` (then each is logged as a warning).
    """
    path = pathlib.Path(saved_json_path)
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); move it away to start this workdir afresh") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    old = _with_moved_fields(_flatten(saved))
    new = _flatten(json.loads(config_to_json(config)))
    changes, refused = [], []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before == after:
            continue
        change = f"{key}: {before!r} -> {after!r}"
        changes.append(change)
        # A field the saved run did not have yet (a newer configs/base.py) is logged, not refused:
        # refusing it would stop every resume after an upgrade.
        if not _is_safe_change(key) and before is not _ABSENT:
            refused.append(change)
    for change in changes:
        if change not in refused:
            logging.info("config.%s (changed since the last run in this workdir)", change)
    if refused and not allow:
        raise ConfigError(
            f"{path}: the config differs from the run in this workdir ({'; '.join(refused)}); resuming would "
            f"not continue that run. Use a new workdir, or --allow-config-change to resume anyway"
        )
    for change in refused:
        logging.warning("config.%s changed since the last run in this workdir (allowed by --allow-config-change)", change)
    return changes


def check_and_save_config(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, allow_change: bool = False
) -> list[str]:
    """check_config_change against WORKDIR/config.json, then (only if it passed) save_config.
    Returns the changes. A refused run leaves the earlier config.json untouched."""
    changes = check_config_change(pathlib.Path(workdir) / "config.json", config, allow=allow_change)
    save_config(config, workdir)
    return changes
