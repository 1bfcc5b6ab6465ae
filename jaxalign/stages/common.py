"""What every stage reads from its ConfigDict, turned into the typed settings the library takes.

Stages are the only modules that see a ConfigDict; each builds the settings below and wires the
library packages (models, data, objectives, train, rl, evaluate).
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import numpy as np

from jaxalign import files
from jaxalign.data import pipeline, sources, views
from jaxalign.models import loading, lora
from jaxalign.models import tokenizer as tokenizer_lib
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import checkpoint as checkpoint_lib
from jaxalign.train import loop, optim

FORK_PROMPT_TEMPLATE = "{input} "  # the fork's safe_rlhf/configs/constants.py; breaks Beaver checkpoints

log = logging.getLogger(__name__)


def model_settings(config) -> loading.ModelSettings:
    """config.model -> ModelSettings."""
    model = config.model
    return loading.ModelSettings(init_path=model.init_path, hf_config=model.hf_config.to_dict(), dtype=model.dtype,
                                 param_dtype=model.param_dtype, scan_layers=bool(model.scan_layers),
                                 remat_policy=model.remat_policy,
                                 attention_impl=model.attention_impl)


def lora_settings(config) -> lora.LoraSettings:
    """config.lora -> LoraSettings (rank 0 = off); config.lora.targets is comma-separated."""
    group = config.lora
    targets = tuple(t.strip() for t in str(group.targets).split(",") if t.strip())
    return lora.LoraSettings(rank=int(group.rank), alpha=float(group.alpha), targets=targets)


LORA_EXPORTS = ("merged", "adapters")


def lora_export(config) -> str:
    """config.lora.export: merged (an HF dir of the merged weights) | adapters (an HF PEFT dir)."""
    kind = str(config.lora.export)
    if kind not in LORA_EXPORTS:
        raise ValueError(f"config.lora.export: expected one of {LORA_EXPORTS}, got {kind!r}")
    return kind


def optimizer_settings(config) -> optim.OptimizerSettings:
    """config.train's optimizer fields."""
    return optim.OptimizerSettings.from_group(config.train, "config.train")


def checkpoint_settings(config) -> checkpoint_lib.CheckpointSettings:
    group = config.checkpoint
    return checkpoint_lib.CheckpointSettings(save_every=int(group.save_every), keep=int(group.keep),
                                             async_save=bool(group.async_save))


def loop_settings(config, num_steps: int, desc: str) -> loop.LoopSettings:
    """config.train's loop fields + config.checkpoint, for `num_steps` steps."""
    return loop.LoopSettings(num_steps=num_steps, checkpoint=checkpoint_settings(config),
                             log_every=int(config.train.log_every), eval_every=int(config.train.eval_every),
                             grad_accum_steps=int(config.train.grad_accum_steps), desc=desc)


def num_steps(config, batches_per_epoch: int | None) -> int:
    """config.train.num_steps, or epochs over the data when it is -1."""
    train = config.train
    return loop.resolve_num_steps(int(train.num_steps), int(train.epochs), batches_per_epoch,
                                  int(train.grad_accum_steps))


def mesh_and_rules(config):
    """The config's device mesh and logical axis rules."""
    mesh = mesh_lib.make_mesh(config.mesh)
    log.info("mesh: %s", mesh_lib.describe(mesh))
    return mesh, mesh_lib.axis_rules(config.mesh)


def load_tokenizer(config, padding_side: str = "right"):
    """config.tokenizer (or model.init_path) -> tokenizer with upstream's special tokens added."""
    path = config.tokenizer or config.model.init_path
    if not path:
        raise ValueError("config.tokenizer and config.model.init_path are both empty: set one of them")
    if not pathlib.Path(path).is_dir():
        raise FileNotFoundError(f"config.tokenizer: {path} is not a tokenizer directory")
    tokenizer = tokenizer_lib.load_tokenizer(path, padding_side=padding_side, model_max_length=config.data.max_length)
    added = getattr(tokenizer, "jaxalign_added_tokens", [])
    if added:
        log.info("added special tokens %s; vocabulary is now %d", added, len(tokenizer))
    return tokenizer


def prompt_template(config, tokenizer) -> views.Template:
    """config.data.prompt_template: upstream | fork | chat | a string containing {input}."""
    name = config.data.prompt_template
    if name == "upstream":
        return views.PROMPT_TEMPLATE
    if name == "fork":
        return FORK_PROMPT_TEMPLATE
    if name == "chat":
        return views.chat_template(tokenizer)
    if "{input}" in name:
        return name
    raise ValueError(f"config.data.prompt_template: expected upstream, fork, chat or a '{{input}}' template, got {name!r}")


def read_rows(config, split: str, source: str = "", name: str = ""):
    """Rows of one split: the TFDS-prepared ArrayRecord dataset when config.data.prepared_dir is
    set, else the release files under config.data.source. -> (rows, report)."""
    source = source or config.data.source
    name = name or config.data.name
    prepared = config.data.prepared_dir if source == config.data.source else ""
    rows, report = sources.read_split(source, name, split, prepared_dir=prepared)
    log.info("%s/%s: %s", prepared or source, split, report)
    return rows, report


def check_batch_size(config, mesh, key: str = "batch_size") -> int:
    """config.data.<key> must be >= 1 and divide over the mesh's batch shards (data x fsdp)."""
    size = int(config.data[key])
    shards = int(mesh.shape["data"] * mesh.shape["fsdp"])
    if size < 1 or size % shards:
        raise ValueError(f"config.data.{key}={size} must be a positive multiple of the {shards} batch shards "
                         f"(mesh data x fsdp)")
    return size


def check_responses_fit(config, kind: str, examples, tokenizer, split: str) -> None:
    """Refuses a split where config.data.max_length leaves no example a response token (each prompt
    alone fills it: training would see no target and export an untrained model); warns with the
    count when it leaves some examples none (they train nothing)."""
    max_length = int(config.data.max_length)
    without, checked = pipeline.rows_without_response(kind, examples, tokenizer, max_length=max_length)
    if checked and without == checked:
        raise ValueError(f"config.data.max_length={max_length} leaves no response token in split {split!r}: each of "
                         f"the {checked} prompts checked is {max_length} tokens or longer, so nothing would be trained; "
                         f"raise config.data.max_length")
    if without:
        log.warning("config.data.max_length=%d: %d of %d %s examples checked keep no response token (their prompt "
                    "fills it); they train nothing", max_length, without, checked, split)


def check_eval_batch(config, num_examples: int, mesh) -> None:
    """The eval batch must fit the split and divide over the batch shards: checked before training."""
    size = check_batch_size(config, mesh, "eval_batch_size")
    if num_examples < size:
        raise ValueError(f"config.data.eval_batch_size={size} is larger than the {num_examples} examples of split "
                         f"{config.data.eval_split!r}; lower it or set config.data.eval_split=''")


EXPORT_STEP_NAME = "jaxalign_export.json"  # {"step": N}: the training step the export holds


def export_once(result: loop.LoopResult, workdir: pathlib.Path, export_fn) -> pathlib.Path:
    """export_fn(WORKDIR/export), unless the run was already finished and its export is complete
    and of the final step: loading.check_export (its manifest's sizes and sha256, config,
    safetensors headers, tokenizer) and EXPORT_STEP_NAME, written into the export once it is in
    place. The export functions write a temporary sibling and rename it into place, so a run killed
    while exporting keeps the previous export, and the next run exports again."""
    out = pathlib.Path(workdir) / "export"
    if result.trained_steps == 0:
        problem = _agreed(_stale_export(out, result.step) if jax.process_index() == 0 else "")
        if not problem:
            log.info("already finished; %s is up to date", out)
            return out
        log.warning("already finished, but %s; exporting again", problem)
    export_fn(out)
    if jax.process_index() == 0:
        files.write_text(out / EXPORT_STEP_NAME, json.dumps({"step": int(result.step)}) + "\n")
    log.info("exported to %s", out)
    return out


def _stale_export(out: pathlib.Path, step: int) -> str:
    """"" when `out` is a complete export of training step `step`, else what is wrong."""
    problem = loading.check_export(out)
    if problem:
        return f"the export is not complete ({problem})"
    try:
        exported = json.loads((out / EXPORT_STEP_NAME).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return (f"{out / EXPORT_STEP_NAME} is missing or unreadable ({type(error).__name__}): an export cut off "
                f"right after it was renamed into place, or written before this record existed")
    if exported != step:
        return f"{out} holds step {exported}, the run ended at step {step}"
    return ""


def _agreed(problem: str) -> str:
    """Process 0's verdict on every host (each host must then export, or none: the export gathers)."""
    if jax.process_count() == 1:
        return problem
    from jax.experimental import multihost_utils

    again = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(problem))))
    return (problem or "see process 0's log") if again else ""
