"""Pairwise preference stages: config.stage names a method of the table in objectives/pairwise.py
(dpo | safe_dpo | c_dpo | ipo | simpo | kto); its settings are config.dpo's fields of the same names.

    jaxalign train --config configs/dpo_tiny.py --workdir out/dpo_tiny

  * the policy: config.model.init_path (the SFT export); the method's frozen models (the reference,
    a second copy of that policy; C-DPO's reward and cost models) come from pairwise.load_frozen and
    travel as `frozen` through the one loop, never donated nor checkpointed;
  * data: the method's view of the release rows, batched as its batch kind;
  * TrainState.extra holds the method's state (C-DPO's λ), so it is checkpointed and resumes exactly;
  * eval: the same loss and metrics over the eval split;
  * WORKDIR/export: the policy as an HF dir with the tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax

from jaxalign import models
from jaxalign.data import pipeline
from jaxalign.models import loading
from jaxalign.objectives import pairwise
from jaxalign.stages import common
from jaxalign.train import loop, optim, state as state_lib

log = logging.getLogger(__name__)


def method_settings(config, method: pairwise.Method):
    """The method's settings dataclass from config.dpo (a field the group lacks keeps its default)."""
    names = [field.name for field in dataclasses.fields(method.settings)]
    return method.settings(**{name: config.dpo[name] for name in names if name in config.dpo})


def load_examples(config, method: pairwise.Method, split: str, template):
    rows, _ = common.read_rows(config, split)
    examples = method.view(rows, template=template)
    log.info("%s %s examples: %s", split, config.stage, dict(examples.counts))
    return examples


def run(config, workdir) -> loop.LoopResult:
    """Trains the preference stage in `workdir` (resuming if it holds checkpoints) and exports the policy."""
    method = pairwise.method(config.stage)
    settings = method_settings(config, method)
    workdir = pathlib.Path(workdir)
    mesh, rules = common.mesh_and_rules(config)
    batch_size = common.check_batch_size(config, mesh)
    tokenizer = common.load_tokenizer(config)
    model = common.model_settings(config)
    if not model.init_path:
        raise ValueError("config.model.init_path: a preference stage starts from a trained policy (the SFT export); "
                         "it is empty")
    special = loading.special_ids(tokenizer)
    cfg = loading.model_config(model, vocab_size=len(tokenizer), special=special)
    module = models.causal_lm(cfg)
    template = common.prompt_template(config, tokenizer)
    max_length = int(config.data.max_length)

    train_examples = load_examples(config, method, config.data.train_split, template)
    common.check_responses_fit(config, method.batch_kind, train_examples, tokenizer, config.data.train_split)
    num_steps = common.num_steps(config, len(train_examples) // batch_size)
    train_iter = pipeline.make_batches(
        method.batch_kind, train_examples, tokenizer, batch_size=batch_size, max_length=max_length, mesh=mesh,
        seed=config.seed, shuffle=bool(config.data.shuffle),
        num_epochs=None if config.train.num_steps > 0 else int(config.train.epochs))

    param_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    frozen = pairwise.load_frozen(method, settings, model, mesh, rules, vocab_size=len(tokenizer), special=special,
                                  rng=param_rng)
    policy = pairwise.policy_fn(cfg)
    loss_fn = pairwise.make_loss_fn(method, settings, policy, frozen.score_fns)

    eval_fn = None
    if config.data.eval_split:
        eval_examples = load_examples(config, method, config.data.eval_split, template)
        common.check_eval_batch(config, len(eval_examples), mesh)

        def make_eval_iter():
            return pipeline.make_batches(method.batch_kind, eval_examples, tokenizer,
                                         batch_size=int(config.data.eval_batch_size), max_length=max_length,
                                         mesh=mesh, shuffle=False, num_epochs=1)

        eval_fn = loop.make_eval_fn(pairwise.make_eval_metrics_fn(method, settings, policy, frozen.score_fns),
                                    make_eval_iter, int(config.train.eval_batches), mesh, rules)

    extra = method.init_extra(settings)
    optimizer = common.optimizer_settings(config)
    tx = optim.make_optimizer(optimizer, num_steps)
    abstract = state_lib.abstract_train_state(loading.init_fn(module), tx, mesh, rules, extra)

    def init_state() -> state_lib.TrainState:
        placed = loading.load_policy(model, mesh, rules, vocab_size=len(tokenizer), special=special, rng=param_rng)
        return state_lib.init_train_state(placed.params, tx, state_rng, abstract, extra)

    log.info("%s: %d examples, %d updates of %d x %d, %s", config.stage, len(train_examples), num_steps,
             config.train.grad_accum_steps, batch_size, settings)
    result = loop.train(
        settings=common.loop_settings(config, num_steps, config.stage), workdir=workdir, mesh=mesh, rules=rules,
        tx=tx, loss_fn=loss_fn, abstract_state=abstract, init_state=init_state, train_iter=train_iter,
        eval_fn=eval_fn, schedule=optim.make_schedule(optimizer, num_steps), frozen=frozen.params,
        frozen_shardings=frozen.shardings,
    )
    common.export_once(result, workdir, lambda out: loading.export_policy(out, cfg, result.state.params, tokenizer))
    return result
