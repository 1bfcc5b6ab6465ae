"""SFT stage: `run(config, workdir)` trains a Llama on prompt + response with the response-only loss.

Steps: mesh from config.mesh -> tokenizer (missing <pad>/<s>/</s>/<unk> added) -> model config
(from model.init_path's config.json, or model.hf_config for random init; vocab = len(tokenizer))
-> parameters created directly in their shardings (random init under jit, or HF tensors put on the
devices one by one; new vocabulary rows = mean of the old ones) -> release rows -> SFT examples ->
sharded batches -> `jaxalign.train.loop.train` -> WORKDIR/export (HF config.json + safetensors +
tokenizer files), loadable by transformers and by `hf.from_pretrained`.

The helpers `load_tokenizer_for`, `model_config_for`, `prompt_template` and `load_hf_params` are
shared with the other stages.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data import pipeline, pku_saferlhf, views
from jaxalign.models import hf, llama
from jaxalign.models import tokenizer as tokenizer_lib
from jaxalign.objectives import sft
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import loop, optim, state as state_lib

FORK_PROMPT_TEMPLATE = "{input} "  # the fork's template (spec §2.4); breaks Beaver checkpoints


def load_tokenizer_for(config):
    """config.tokenizer (or model.init_path) -> tokenizer with upstream's special tokens added."""
    path = config.tokenizer or config.model.init_path
    if not path:
        raise ValueError("config.tokenizer and config.model.init_path are both empty: set one of them")
    if not pathlib.Path(path).is_dir():
        raise FileNotFoundError(f"config.tokenizer: {path} is not a tokenizer directory")
    tokenizer = tokenizer_lib.load_tokenizer(path, padding_side="right", model_max_length=config.data.max_length)
    added = getattr(tokenizer, "jaxalign_added_tokens", [])
    if added:
        logging.info("added special tokens %s; vocabulary is now %d", added, len(tokenizer))
    return tokenizer


def model_config_for(config, tokenizer) -> llama.LlamaConfig:
    """LlamaConfig of the checkpoint in model.init_path, or of model.hf_config; runtime fields from config.model.

    vocab_size is len(tokenizer) for random init; a checkpoint keeps its own (resized later).
    """
    runtime = dict(
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        scan_layers=config.model.scan_layers,
        remat_policy=config.model.remat_policy,
    )
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if config.model.init_path:
        cfg = hf.load_config(config.model.init_path, **runtime)
        return dataclasses.replace(cfg, **special)
    return llama.LlamaConfig.from_hf_config(
        dict(config.model.hf_config.to_dict(), vocab_size=len(tokenizer), **special), **runtime
    )


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


def load_hf_params(cfg: llama.LlamaConfig, path: str, vocab_size: int, param_shardings: Any):
    """HF checkpoint -> (cfg with vocab_size, params in `param_shardings`).

    Tensors are read and converted on the host; each is sent to the devices already sharded, so
    no device holds a full copy. New vocabulary rows (added <pad>) are the mean of the old rows.
    """
    host = hf.params_from_hf_tensors(cfg, hf.read_safetensors_dir(path))
    if vocab_size != cfg.vocab_size:
        with jax.default_device(jax.devices("cpu")[0]):
            cfg, host = llama.resize_token_embeddings(cfg, host, vocab_size)
        host = jax.tree.map(np.asarray, host)
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    params = jax.tree.map(lambda x, s: mesh_lib.put_sharded(np.asarray(x, dtype), s), host, param_shardings)
    return cfg, params


def export(workdir: pathlib.Path, cfg: llama.LlamaConfig, params: Any, tokenizer) -> pathlib.Path:
    """Writes WORKDIR/export: HF config.json + model.safetensors + tokenizer files (process 0)."""
    out = pathlib.Path(workdir) / "export"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        hf.save_pretrained(out, cfg, params, max_shard_size="5GB")
        tokenizer.save_pretrained(str(out))
    return out


def sft_examples_for(config, split: str, template) -> views.Examples:
    rows, report = pku_saferlhf.read_release(config.data.source, config.data.name, split)
    examples = views.sft_examples(rows, template=template, response=config.sft.response)
    logging.info("%s/%s: %d rows -> %d SFT examples", config.data.source, split, len(rows), len(examples))
    return examples


def run(config, workdir) -> state_lib.TrainState:
    """Trains the SFT stage in `workdir` (resuming if it holds checkpoints) and exports the policy."""
    workdir = pathlib.Path(workdir)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.axis_rules(config.mesh)
    logging.info("mesh: %s", mesh_lib.describe(mesh))
    tokenizer = load_tokenizer_for(config)
    cfg = model_config_for(config, tokenizer)
    vocab_size = len(tokenizer)
    model_cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    model = llama.Llama(model_cfg)

    template = prompt_template(config, tokenizer)
    train_examples = sft_examples_for(config, config.data.train_split, template)
    batch_size = int(config.data.batch_size)
    batches_per_epoch = len(train_examples) // batch_size
    num_steps = loop.resolve_num_steps(config.train, batches_per_epoch)
    train_iter = pipeline.make_batches(
        "sft", train_examples, tokenizer, batch_size=batch_size, max_length=config.data.max_length,
        mesh=mesh, seed=config.seed, shuffle=config.data.shuffle, num_epochs=None,
    )

    tx = optim.make_optimizer(config.train, num_steps)
    dummy = jnp.zeros((1, 1), jnp.int32)
    init_params = lambda rng: model.init(rng, dummy)["params"]  # noqa: E731
    abstract = state_lib.abstract_train_state(init_params, tx, mesh, rules)
    param_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))

    def init_state() -> state_lib.TrainState:
        if config.model.init_path:
            _, params = load_hf_params(cfg, config.model.init_path, vocab_size, state_lib.shardings_of(abstract).params)
        else:
            params, _ = mesh_lib.init_sharded(init_params, param_rng, mesh, rules)
        return state_lib.init_train_state(params, tx, state_rng, abstract)

    eval_fn = None
    if config.data.eval_split:
        eval_examples = sft_examples_for(config, config.data.eval_split, template)
        if len(eval_examples) < config.data.eval_batch_size:
            raise ValueError(
                f"config.data.eval_batch_size={config.data.eval_batch_size} is larger than the {len(eval_examples)} "
                f"examples of split {config.data.eval_split!r}; lower it or set config.data.eval_split=''"
            )

        def make_eval_iter():
            return pipeline.make_batches(
                "sft", eval_examples, tokenizer, batch_size=int(config.data.eval_batch_size),
                max_length=config.data.max_length, mesh=mesh, shuffle=False, num_epochs=1,
            )

        eval_fn = loop.make_eval_fn(sft.make_metrics_fn(model), make_eval_iter, config.train.eval_batches, mesh, rules)

    logging.info("SFT: %d examples, %d batches/epoch, %d updates of %d x %d sequences",
                 len(train_examples), batches_per_epoch, num_steps, config.train.grad_accum_steps, batch_size)
    state = loop.train(
        config=config, workdir=workdir, mesh=mesh, rules=rules, tx=tx, loss_fn=sft.make_loss_fn(model),
        abstract_state=abstract, init_state=init_state, train_iter=train_iter, num_steps=num_steps,
        eval_fn=eval_fn, schedule=optim.make_schedule(config.train, num_steps),
    )
    out = export(workdir, model_cfg, state.params, tokenizer)
    logging.info("exported the policy to %s", out)
    return state
