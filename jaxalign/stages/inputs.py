"""What a run reads: its model, tokenizer and data dirs, checked before anything runs, and the models
and tokenizer fingerprinted in the workdir so a resume against changed files is refused.

    paths = input_paths(config)                          # {"model.init_path": "out/sft_tiny/export", ...}
    check_inputs(config)                                 # FileNotFoundError naming the command that makes a missing one
    check_and_save_fingerprints(config, workdir, allow_change=False)   # WORKDIR/inputs.json

A run's inputs are config.tokenizer, config.model.init_path and the `*_path` fields of the stage's
own group (`rl.*` for the RL stages, `dpo.*` for the DPO family): the init model, the frozen
reference, reward, cost and critic models. Their fingerprint (files.fingerprint_dir: every file's
size, mtime and sha256) is written to WORKDIR/inputs.json at the first start. Each later start of
the same workdir re-fingerprints them, re-hashing only files whose size or mtime moved (a resume
with untouched inputs costs one stat per file; the first start reads each model once, as loading it
does), and refuses a change in content, naming the field, the dir and the files, unless
--allow-config-change: a reward model copied over `rl.reward_model_path` would otherwise resume
the run against another reward. jaxalign's own records in an export (its manifest) are not content.
"""

from __future__ import annotations

import json
import logging
import pathlib

import ml_collections

from jaxalign import config as config_lib
from jaxalign import files, stages
from jaxalign.data import pku_saferlhf as pku

log = logging.getLogger(__name__)

INPUTS_NAME = "inputs.json"
# The group whose *_path fields a stage module reads (besides model.init_path and tokenizer).
_PATH_GROUPS = {"jaxalign.stages.rl": "rl", "jaxalign.stages.dpo": "dpo"}


def input_paths(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{config field: dir} of the model and tokenizer dirs the stage reads (non-empty fields only)."""
    fields = {"tokenizer": config.tokenizer, "model.init_path": config.model.init_path}
    group = _PATH_GROUPS.get(stages.STAGES.get(config.stage, ""))
    if group:
        for key, value in config[group].items():
            if key.endswith("_path"):
                fields[f"{group}.{key}"] = value
    return {field: str(value) for field, value in fields.items() if value}


def _how_to_make(field: str, path: str, config) -> str:
    """What writes the dir of `field` (for the error when it is missing)."""
    location = pathlib.Path(path)
    if field == "tokenizer":
        return f"make it with `jaxalign tokenizer --data {config.data.source or 'DATA_DIR'} --out {path}`"
    if location.name == "export" and (config_lib.REPO_CONFIGS / f"{location.parent.name}.py").is_file():
        return f"make it with `jaxalign train --config configs/{location.parent.name}.py --workdir {location.parent}`"
    return "expected a training run's WORKDIR/export or an HF model dir (config.json + *.safetensors)"


def _how_to_make_data(config) -> str:
    source = config.data.source
    if str(config.data.name).startswith("single-"):
        return (f"make the single-preference release of the mini dataset with `python experiments/mini_single.py "
                f"--mini out/mini --out {source}`, or point config.data.source at PKU-SafeRLHF-single")
    return f"make the mini dataset with `jaxalign data mini --out {source}`, or point config.data.source at the release"


def check_inputs(config: ml_collections.ConfigDict) -> None:
    """FileNotFoundError (one line naming the field, the path and the command that makes it) for a
    missing model or tokenizer dir, or release files the config's data.name and splits need."""
    for field, path in input_paths(config).items():
        marker = "" if field == "tokenizer" else "config.json"
        if not (pathlib.Path(path) / marker).exists():
            what = "no such dir" if not pathlib.Path(path).exists() else f"no {marker} in it"
            raise FileNotFoundError(f"config.{field}: {path}: {what}; {_how_to_make(field, path, config)}")
    data = config.data
    if data.prepared_dir:
        return  # a prepared dir names what it holds when a split is missing (sources.read_split)
    if not data.source:
        raise ValueError("config.data.source is empty: set the release dir (or config.data.prepared_dir)")
    for split in dict.fromkeys(s for s in (data.train_split, data.eval_split) if s):
        if not pku.find_files(data.source, data.name, split):
            what = "no such dir" if not pathlib.Path(data.source).is_dir() else \
                f"no files for config {data.name!r}, split {split!r}"
            raise FileNotFoundError(f"config.data.source: {data.source}: {what}; {_how_to_make_data(config)}")


def check_and_save_fingerprints(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                                allow_change: bool = False) -> list[str]:
    """Fingerprints every input dir into WORKDIR/inputs.json; a dir whose content changed since the
    fingerprint stored there is a ConfigError naming it unless allow_change (then a warning).
    Returns the changes ("config.FIELD (DIR): FILE changed, ...")."""
    path = pathlib.Path(workdir) / INPUTS_NAME
    stored = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise config_lib.ConfigError(f"{path} is not valid JSON ({error}); move it away to start this workdir "
                                         f"afresh") from None
    current, changes = {}, []
    for field, directory in input_paths(config).items():
        before = stored.get(field) if isinstance(stored.get(field), dict) else None
        same_dir = before is not None and before.get("path") == directory
        current[field] = {"path": directory, **files.fingerprint_dir(directory, before if same_dir else None)}
        difference = files.fingerprint_difference(before, current[field]) if same_dir else ""
        if difference:
            changes.append(f"config.{field} ({directory}): {difference}")
    if changes and not allow_change:
        raise config_lib.ConfigError(
            f"{path}: inputs changed since the run in this workdir started ({'; '.join(changes)}); resuming would "
            f"not continue that run. Restore them, use a new workdir, or --allow-config-change to resume anyway")
    for change in changes:
        log.warning("%s changed since the last run in this workdir (allowed by --allow-config-change)", change)
    files.write_text(path, json.dumps(current, indent=1, sort_keys=True) + "\n")
    return changes
