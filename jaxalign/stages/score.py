"""Reward- and cost-model stages (config.stage "reward" / "cost"), as safe-rlhf's
safe_rlhf/values/reward/trainer.py and safe_rlhf/values/cost/trainer.py.

    jaxalign train --config configs/reward_tiny.py --workdir out/reward_tiny

  * model: a ScoreModel = the backbone of the causal LM in config.model.init_path (e.g. the SFT
    export) + a fresh score head, or a random init from config.model.hf_config;
  * data: preference pairs (reward) or safety-preference pairs (cost); each step runs one forward
    over concat([better; worse]) (2B sequences), like upstream;
  * the normalizer statistics of the end scores (config.score.normalizer_type) are updated every
    micro-batch inside the jitted step and live in TrainState.extra, so they are checkpointed;
  * eval (every config.train.eval_every updates and at the end) scores the whole eval split with
    the same metrics as `jaxalign evaluate reward|cost`;
  * WORKDIR/export is a score-model dir (normalizer stats in config.json) plus the tokenizer.
"""

from __future__ import annotations

import logging
import pathlib

import jax

from jaxalign.data import pipeline, views
from jaxalign.evaluate import scores as scores_lib
from jaxalign.models import loading, score
from jaxalign.objectives import preference
from jaxalign.stages import common
from jaxalign.train import loop, optim, state as state_lib

STAGE_KINDS = {"reward": "preference", "cost": "safety_preference"}

log = logging.getLogger(__name__)


def score_head(config) -> score.ScoreHead:
    """The ScoreHead (score type, dim, normalizer) of a reward/cost config."""
    if config.stage not in STAGE_KINDS:
        raise ValueError(f"the score stage runs stages {tuple(STAGE_KINDS)}, got {config.stage!r}")
    if config.score.score_dim != 1:
        raise ValueError("config.score.score_dim: reward/cost losses need 1")
    return score.ScoreHead(
        score_type=config.stage,
        score_dim=int(config.score.score_dim),
        score_bias=bool(config.score.score_bias),
        normalizer_type=config.score.normalizer_type,
        momentum=float(config.score.momentum),
        do_normalize=bool(config.score.normalize_during_training),
    )


def load_examples(config, split: str, template) -> views.Examples:
    """Preference or safety-preference examples of one split."""
    rows, _ = common.read_rows(config, split)
    if config.stage == "reward":
        examples = views.preference_examples(rows, template=template)
    else:
        examples = views.safety_preference_examples(rows, template=template, inconsistent=config.score.inconsistent_pairs)
    log.info("%s %s examples: %s", split, examples.kind, dict(examples.counts))
    return examples


def make_eval_fn(config, module, eval_arrays, mesh, rules):
    """eval_fn(state, frozen) -> metrics over the eval split (accuracy, score mean/std, sign accuracy)."""
    kind = STAGE_KINDS[config.stage]
    scorer = scores_lib.make_pair_scorer(module, mesh, rules)

    def eval_fn(state, frozen=None):
        del frozen
        first, second = scorer(state.params, eval_arrays, kind, batch_size=int(config.data.eval_batch_size),
                               max_batches=int(config.train.eval_batches))
        return scores_lib.pair_metrics(kind, first, second, eval_arrays)

    return eval_fn


def run(config, workdir) -> loop.LoopResult:
    """Trains a reward or cost model as configured and exports it to WORKDIR/export."""
    workdir = pathlib.Path(workdir)
    head = score_head(config)
    kind = STAGE_KINDS[config.stage]
    mesh, rules = common.mesh_and_rules(config)
    batch_size = common.check_batch_size(config, mesh)
    tokenizer = common.load_tokenizer(config)
    settings = common.model_settings(config)
    special = loading.special_ids(tokenizer)
    cfg = loading.model_config(settings, vocab_size=len(tokenizer), special=special)
    module = head.model(cfg)

    template = common.prompt_template(config, tokenizer)
    train_examples = load_examples(config, config.data.train_split, template)
    common.check_responses_fit(config, kind, train_examples, tokenizer, config.data.train_split)
    num_steps = common.num_steps(config, len(train_examples) // batch_size)
    train_iter = pipeline.make_batches(
        kind, train_examples, tokenizer, batch_size=batch_size, max_length=int(config.data.max_length),
        mesh=mesh, seed=config.seed, shuffle=bool(config.data.shuffle),
        num_epochs=None if config.train.num_steps > 0 else int(config.train.epochs),
    )
    eval_fn = None
    if config.data.eval_split:
        eval_examples = load_examples(config, config.data.eval_split, template)
        common.check_eval_batch(config, len(eval_examples), mesh)
        common.check_responses_fit(config, kind, eval_examples, tokenizer, config.data.eval_split)
        eval_arrays, _ = pipeline.tokenize_examples(kind, eval_examples, tokenizer,
                                                    max_length=int(config.data.max_length))
        eval_fn = make_eval_fn(config, module, eval_arrays, mesh, rules)

    optimizer = common.optimizer_settings(config)
    tx = optim.make_optimizer(optimizer, num_steps)
    extra = {"normalizer": score.init_normalizer(head.score_dim)}
    abstract = state_lib.abstract_train_state(loading.init_fn(module), tx, mesh, rules, extra)
    params_rng, head_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)

    def init_state():
        model = loading.load_backbone_with_head(settings, head, mesh, rules, vocab_size=len(tokenizer),
                                                special=special, rng=head_rng if settings.init_path else params_rng)
        return state_lib.init_train_state(model.params, tx, state_rng, abstract, extra)

    loss_fn = preference.make_score_loss_fn(module, head, kind, config.score.loss_type,
                                            float(config.score.regularization))
    result = loop.train(
        settings=common.loop_settings(config, num_steps, config.stage), workdir=workdir, mesh=mesh, rules=rules,
        tx=tx, loss_fn=loss_fn, abstract_state=abstract, init_state=init_state, train_iter=train_iter,
        eval_fn=eval_fn, schedule=optim.make_schedule(optimizer, num_steps),
    )
    state = result.state
    common.export_once(result, workdir, lambda out: loading.export_score_model(
        out, cfg, state.params, head, state.extra["normalizer"], tokenizer))
    return result
