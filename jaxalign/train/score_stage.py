"""Reward- and cost-model training (config.stage "reward" / "cost"), spec §4.2-4.3.

    jaxalign train --config configs/reward_tiny.py --workdir out/reward_tiny

  * model: `ScoreModel` = the backbone of an HF Llama dir (config.model.init_path, e.g. the SFT
    export) + a fresh score head; or a random init from config.model.hf_config;
  * data: preference pairs (reward) or safety-preference pairs (cost) of config.data.source;
    each step runs one forward over concat([better; worse]) (2B sequences), like upstream;
  * the normalizer statistics of the end scores (config.score.normalizer_type, EMA by default)
    are updated every micro-batch inside the jitted step and kept in `TrainState.extra`, so
    they are checkpointed and restored with the parameters;
  * the generic loop (jaxalign.train.loop) does steps, logging, checkpoints and resume; eval
    (every config.train.eval_every updates and at the end) scores the whole eval split;
  * at the end WORKDIR/export is a score-model dir (jaxalign.models.score.save_score_model,
    with the normalizer stats in config.json) plus the tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data import pipeline, pku_saferlhf, views
from jaxalign.evaluate import scores as scores_lib
from jaxalign.models import hf, llama, score
from jaxalign.objectives import preference
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import loop, optim, sft_stage
from jaxalign.train import state as state_lib

STAGE_KINDS = {"reward": "preference", "cost": "safety_preference"}

log = logging.getLogger(__name__)


def score_head(config) -> score.ScoreHead:
    """The ScoreHead (score type, dim, normalizer) of a reward/cost config."""
    if config.stage not in STAGE_KINDS:
        raise ValueError(f"score_stage runs stages {tuple(STAGE_KINDS)}, got {config.stage!r}")
    if config.score.score_dim != 1:
        raise ValueError("reward/cost losses need config.score.score_dim == 1")
    return score.ScoreHead(
        score_type=config.stage,
        score_dim=int(config.score.score_dim),
        score_bias=bool(config.score.score_bias),
        normalizer_type=config.score.normalizer_type,
        momentum=float(config.score.momentum),
        do_normalize=bool(config.score.normalize_during_training),
    )


def model_config(config, tokenizer) -> llama.LlamaConfig:
    """The SFT stage's model config (init dir or config.model.hf_config, runtime fields, the
    tokenizer's special ids) with vocab_size = len(tokenizer), as for the policy."""
    cfg = sft_stage.model_config_for(config, tokenizer)
    return dataclasses.replace(cfg, vocab_size=len(tokenizer))


def load_examples(config, split: str, template) -> views.Examples:
    """Preference or safety-preference examples of one split of config.data.source."""
    rows, report = pku_saferlhf.read_release(config.data.source, config.data.name, split)
    log.info("%s/%s: %s", config.data.source, split, report)
    if config.stage == "reward":
        examples = views.preference_examples(rows, template=template)
    else:
        examples = views.safety_preference_examples(
            rows, template=template, inconsistent=config.score.inconsistent_pairs
        )
    log.info("%s %s examples: %s", split, examples.kind, dict(examples.counts))
    return examples


def make_loss_fn(model: score.ScoreModel, head: score.ScoreHead, config):
    """loss_fn(params, batch, rng, extra) -> (loss, (metrics, extra)) for the generic loop.

    extra = {"normalizer": stats}; the stats are updated from the 2B end scores of the step.
    """
    kind = STAGE_KINDS[config.stage]
    loss_type = config.score.loss_type
    regularization = float(config.score.regularization)
    objective = preference.reward_loss if config.stage == "reward" else preference.cost_loss
    if loss_type not in preference.LOSS_TYPES:
        raise ValueError(f"config.score.loss_type: {loss_type!r} is not one of {preference.LOSS_TYPES}")

    def loss_fn(params, batch, rng, extra):
        del rng  # no dropout
        ids, mask = scores_lib.concat_pair(batch, kind)
        out = model.apply({"params": params}, ids, attention_mask=mask)
        stats = score.update_normalizer(
            extra["normalizer"], jax.lax.stop_gradient(out.end_scores), head.normalizer_type, head.momentum
        )
        token_scores, end_scores = out.scores, out.end_scores
        if head.do_normalize:
            token_scores = score.normalize(token_scores, stats, head.score_type)
            end_scores = score.normalize(end_scores, stats, head.score_type)
        loss, metrics = objective(token_scores[..., 0], end_scores[..., 0], batch, loss_type, regularization)
        metrics["normalizer_mean"] = stats["mean"][0]
        metrics["normalizer_var"] = stats["var"][0]
        return loss, (metrics, {"normalizer": stats})

    return loss_fn


def _place(tree, shardings):
    """Host (numpy) pytree -> global arrays in `shardings`, shard by shard."""
    return jax.tree.map(lambda x, s: mesh_lib.put_sharded(np.asarray(x), s), tree, shardings)


def load_backbone_with_fresh_head(path, cfg: llama.LlamaConfig, head: score.ScoreHead, rng) -> dict:
    """Host (numpy) ScoreModel params: the backbone of the HF Llama dir `path` (vocabulary
    resized to cfg.vocab_size, new rows = mean) and a fresh score head."""
    init_cfg = hf.load_config(path, param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers)
    backbone = hf.backbone_from_hf_tensors(init_cfg, hf.read_safetensors_dir(path))
    with jax.default_device(jax.devices("cpu")[0]):
        if init_cfg.vocab_size != cfg.vocab_size:
            _, resized = llama.resize_token_embeddings(init_cfg, {"model": backbone}, cfg.vocab_size)
            backbone = resized["model"]
        params = score.init_params_from_llama(backbone, cfg, rng, head.score_dim, head.score_bias)
    return jax.tree.map(np.asarray, params)


def boxed_init_fn(model: score.ScoreModel):
    """rng -> params boxed with their logical axes (for abstract_train_state / init_sharded)."""
    return lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def initial_extra(head: score.ScoreHead) -> dict:
    """The stage state kept in TrainState.extra: the normalizer statistics."""
    return {"normalizer": score.init_normalizer(head.score_dim)}


def make_init_state(config, cfg, head, model, tx, abstract, mesh, rules):
    """init_state() for the loop: the init dir's backbone + a fresh head, or a random init."""
    params_rng, head_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)

    def init_state():
        if config.model.init_path:
            params = load_backbone_with_fresh_head(config.model.init_path, cfg, head, head_rng)
            params = _place(params, state_lib.shardings_of(abstract).params)
            log.info("score model initialised from %s (fresh score head)", config.model.init_path)
        else:
            params, _ = mesh_lib.init_sharded(boxed_init_fn(model), params_rng, mesh, rules)
            log.info("score model randomly initialised")
        return state_lib.init_train_state(params, tx, state_rng, abstract, initial_extra(head))

    return init_state


def make_eval_fn(config, model, eval_arrays, mesh, rules):
    """eval_fn(state) -> metrics over the eval split (accuracy, score mean/std, sign accuracy)."""
    kind = STAGE_KINDS[config.stage]

    def eval_fn(state):
        first, second = scores_lib.score_pairs(
            model, state.params, eval_arrays, kind, batch_size=int(config.data.eval_batch_size),
            mesh=mesh, rules=rules, max_batches=int(config.train.eval_batches),
        )
        return scores_lib.pair_metrics(kind, first, second, eval_arrays)

    return eval_fn


def export(workdir: pathlib.Path, cfg, head, state, tokenizer) -> pathlib.Path:
    """WORKDIR/export: the score model (normalizer stats in config.json) and the tokenizer."""
    out = workdir / "export"
    params, stats = state.params, state.extra["normalizer"]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params, stats = multihost_utils.process_allgather((params, stats), tiled=True)
    if jax.process_index() == 0:
        score.save_score_model(out, cfg, params, head, stats)
        tokenizer.save_pretrained(str(out))
        log.info("exported the %s model to %s", head.score_type, out)
    return out


def run(config, workdir) -> pathlib.Path:
    """Trains a reward or cost model as configured; returns WORKDIR/export."""
    workdir = pathlib.Path(workdir)
    head = score_head(config)
    kind = STAGE_KINDS[config.stage]
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.axis_rules(config.mesh)
    log.info("mesh: %s", mesh_lib.describe(mesh))

    tokenizer = sft_stage.load_tokenizer_for(config)
    cfg = model_config(config, tokenizer)
    model = head.model(cfg)

    template = sft_stage.prompt_template(config, tokenizer)
    train_examples = load_examples(config, config.data.train_split, template)
    batch_size = int(config.data.batch_size)
    num_steps = loop.resolve_num_steps(config.train, len(train_examples) // batch_size)
    train_iter = pipeline.make_batches(
        kind, train_examples, tokenizer, batch_size=batch_size, max_length=int(config.data.max_length),
        mesh=mesh, seed=config.seed, shuffle=bool(config.data.shuffle),
        num_epochs=None if config.train.num_steps > 0 else int(config.train.epochs),
    )
    eval_fn = None
    if config.data.eval_split:
        eval_examples = load_examples(config, config.data.eval_split, template)
        eval_arrays, _ = pipeline.tokenize_examples(kind, eval_examples, tokenizer,
                                                    max_length=int(config.data.max_length))
        eval_fn = make_eval_fn(config, model, eval_arrays, mesh, rules)

    tx = optim.make_optimizer(config.train, num_steps)
    abstract = state_lib.abstract_train_state(boxed_init_fn(model), tx, mesh, rules, initial_extra(head))
    state = loop.train(
        config=config, workdir=workdir, mesh=mesh, rules=rules, tx=tx,
        loss_fn=make_loss_fn(model, head, config), abstract_state=abstract,
        init_state=make_init_state(config, cfg, head, model, tx, abstract, mesh, rules),
        train_iter=train_iter, num_steps=num_steps, eval_fn=eval_fn,
        schedule=optim.make_schedule(config.train, num_steps),
    )
    return export(workdir, cfg, head, state, tokenizer)
