"""Moderation stage (config.stage "moderation"): the severity-sensitive, streaming moderation model
of PKU-SafeRLHF (Ji et al. 2024, arXiv:2406.15513) on the QA view.

    jaxalign train --config configs/moderation_tiny.py --workdir out/moderation_tiny

  * data: views.qa_examples (two labelled QA pairs per release row: is_safe, 19 categories,
    severity) -> pipeline "qa" batches (with the response tokens, for the streaming loss);
  * model: the backbone of config.model.init_path (e.g. the SFT export) + fresh unsafe /
    category / severity heads (loading.load_moderation_model), or a random init;
  * loss: objectives/moderation.py with config.moderation's coefficients; per-category positive
    weights from the training split's frequencies (logged, capped at max_pos_weight);
  * the one loop (exact resume, checkpoints, NaN stop); eval every config.train.eval_every
    updates on config.data.eval_split (evaluate/moderation.py's headline metrics at threshold 0.5);
  * the unsafe threshold maximising F1 on validation data (config.moderation.validation_split, or
    validation_fraction of the train rows held out, never trained on), and per-category
    thresholds likewise (tune_category_thresholds), chosen by moderation/validation.py, are saved in
    the export's config.json: WORKDIR/export is a moderation-model dir + the tokenizer.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Sequence

import jax
import numpy as np

from jaxalign.data import pipeline, views
from jaxalign.models import loading
from jaxalign.models import moderation as moderation_model
from jaxalign.moderation import validation
from jaxalign.objectives import moderation as objective
from jaxalign.stages import common
from jaxalign.train import loop, optim, state as state_lib

log = logging.getLogger(__name__)


def qa_examples(config, split: str, template) -> Sequence[dict]:
    rows, _ = common.read_rows(config, split)
    examples = views.qa_examples(rows, template=template)
    log.info("%s: %d rows -> %d QA examples", split, len(examples) // 2, len(examples))
    return examples


def train_and_validation(config, template) -> tuple[Sequence[dict], Sequence[dict]]:
    """The training examples and the validation examples the threshold is chosen on: the
    validation split, or the last validation_fraction of the train rows."""
    train = qa_examples(config, config.data.train_split, template)
    if config.moderation.validation_split:
        return train, qa_examples(config, config.moderation.validation_split, template)
    return validation.hold_out_rows(train, float(config.moderation.validation_fraction))


def category_weights(config, examples: Sequence[dict], names) -> tuple[float, ...]:
    """Per-category positive weights from the training examples' frequencies (logged)."""
    labels = np.array([e["categories"] for e in examples], bool).reshape(len(examples), -1)
    weights = objective.positive_weights(labels, float(config.moderation.max_pos_weight))
    log.info("category positives / weights: %s", ", ".join(
        f"{name}: {int(n)}/{w:.2f}" for name, n, w in zip(names, labels.sum(0), weights)))
    return objective.as_tuple(weights)


def moderation_head(config, tokenizer) -> moderation_model.ModerationHead:
    """The head fields saved with the model: the prompt template (a {input} string or "chat"), the
    category threshold and the training length."""
    template = common.prompt_template(config, tokenizer)
    return moderation_model.ModerationHead(
        category_threshold=float(config.moderation.category_threshold),
        prompt_template=template if isinstance(template, str) else "chat",
        max_length=int(config.data.max_length),
    )


def loss_settings(config, pos_weight: tuple[float, ...]) -> objective.ModerationLossSettings:
    group = config.moderation
    return objective.ModerationLossSettings(
        unsafe_coeff=float(group.unsafe_coeff), category_coeff=float(group.category_coeff),
        severity_coeff=float(group.severity_coeff), stream_coeff=float(group.stream_coeff),
        category_pos_weight=pos_weight)


def run(config, workdir) -> loop.LoopResult:
    """Trains the moderation model as configured and exports it (with its threshold) to WORKDIR/export."""
    workdir = pathlib.Path(workdir)
    mesh, rules = common.mesh_and_rules(config)
    batch_size = common.check_batch_size(config, mesh)
    tokenizer = common.load_tokenizer(config)
    settings = common.model_settings(config)
    special = loading.special_ids(tokenizer)
    cfg = loading.model_config(settings, vocab_size=len(tokenizer), special=special)
    head = moderation_head(config, tokenizer)
    module = head.model(cfg)
    template = common.prompt_template(config, tokenizer)
    max_length = int(config.data.max_length)

    train_examples, validation_examples = train_and_validation(config, template)
    common.check_responses_fit(config, "qa", train_examples, tokenizer, config.data.train_split)
    common.check_batch_size(config, mesh, "eval_batch_size")  # the scorers pad a short last batch
    pos_weight = category_weights(config, train_examples, head.category_names)
    num_steps = common.num_steps(config, len(train_examples) // batch_size)
    train_iter = pipeline.make_batches(
        "qa", train_examples, tokenizer, batch_size=batch_size, max_length=max_length, mesh=mesh, seed=config.seed,
        shuffle=bool(config.data.shuffle), num_epochs=None,
    )
    eval_fn = None
    if config.data.eval_split:
        eval_examples = qa_examples(config, config.data.eval_split, template)
        common.check_eval_batch(config, len(eval_examples), mesh)
        eval_arrays, _ = pipeline.tokenize_examples("qa", eval_examples, tokenizer, max_length=max_length)
        eval_fn = validation.make_eval_fn(module, head, eval_arrays, mesh, rules,
                                          batch_size=int(config.data.eval_batch_size),
                                          max_batches=int(config.train.eval_batches))

    optimizer = common.optimizer_settings(config)
    tx = optim.make_optimizer(optimizer, num_steps)
    abstract = state_lib.abstract_train_state(loading.init_fn(module), tx, mesh, rules)
    params_rng, head_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)

    def init_state():
        model = loading.load_moderation_model(settings, mesh, rules, head=head, vocab_size=len(tokenizer),
                                              special=special, rng=head_rng if settings.init_path else params_rng)
        return state_lib.init_train_state(model.params, tx, state_rng, abstract)

    log.info("moderation: %d examples, %d updates of %d x %d sequences", len(train_examples), num_steps,
             config.train.grad_accum_steps, batch_size)
    result = loop.train(
        settings=common.loop_settings(config, num_steps, "moderation"), workdir=workdir, mesh=mesh, rules=rules,
        tx=tx, loss_fn=objective.make_loss_fn(module, loss_settings(config, pos_weight)), abstract_state=abstract,
        init_state=init_state, train_iter=train_iter, eval_fn=eval_fn,
        schedule=optim.make_schedule(optimizer, num_steps),
    )

    def export(out):
        arrays, _ = pipeline.tokenize_examples("qa", validation_examples, tokenizer, max_length=max_length)
        tuned = validation.tune_thresholds(module, result.state.params, head, arrays, mesh, rules,
                                           batch_size=int(config.data.eval_batch_size),
                                           tune_categories=bool(config.moderation.tune_category_thresholds))
        loading.export_moderation_model(out, cfg, result.state.params, tuned, tokenizer)

    common.export_once(result, workdir, export)
    return result
