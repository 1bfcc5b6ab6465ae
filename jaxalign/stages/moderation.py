"""Moderation stage (config.stage "moderation", issue 10): the severity-sensitive, streaming
moderation model of PKU-SafeRLHF on the QA view.

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
    thresholds likewise (tune_category_thresholds), are saved in the export's config.json:
    WORKDIR/export is a moderation-model dir + the tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections import Counter
from typing import Sequence

import jax
import numpy as np

from jaxalign.data import pipeline, views
from jaxalign.evaluate import moderation as evaluate_lib
from jaxalign.models import loading
from jaxalign.models import moderation as moderation_model
from jaxalign.objectives import moderation as objective
from jaxalign.stages import common
from jaxalign.train import loop, optim, state as state_lib

log = logging.getLogger(__name__)


class Subset(Sequence):
    """Examples at `indices` of a view (eager or lazy), keeping `.kind`, `.counts` and batched `read`."""

    def __init__(self, examples: Sequence[dict], indices: np.ndarray):
        self.examples, self.indices = examples, np.asarray(indices, np.int64)
        self.kind, self.counts = examples.kind, Counter(kept=len(self.indices))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        return self.examples[int(self.indices[index])]

    def __iter__(self):
        for start in range(0, len(self), 1024):
            yield from self.read(range(start, min(start + 1024, len(self))))

    def read(self, indices) -> list[dict]:
        picked = self.indices[np.asarray(list(indices), np.int64)]
        read = getattr(self.examples, "read", None)
        return read(picked) if read is not None else [self.examples[int(i)] for i in picked]


def qa_examples(config, split: str, template) -> Sequence[dict]:
    rows, _ = common.read_rows(config, split)
    examples = views.qa_examples(rows, template=template)
    log.info("%s: %d rows -> %d QA examples", split, len(examples) // 2, len(examples))
    return examples


def train_and_validation(config, template) -> tuple[Sequence[dict], Sequence[dict]]:
    """The training examples and the validation examples the threshold is chosen on: the
    validation split, or the last validation_fraction of the train rows (both answers of a row
    stay on one side)."""
    group = config.moderation
    train = qa_examples(config, config.data.train_split, template)
    if group.validation_split:
        return train, qa_examples(config, group.validation_split, template)
    fraction = float(group.validation_fraction)
    rows = len(train) // 2
    held = int(round(fraction * rows))
    if not 0.0 < fraction < 1.0 or held < 1 or held >= rows:
        raise ValueError(f"config.moderation.validation_fraction={fraction} holds out {held} of the {rows} train rows; "
                         "it must hold out at least one row and leave some, or set config.moderation.validation_split")
    cut = 2 * (rows - held)
    log.info("threshold validation: the last %d train rows (%d QA examples), not trained on", held, len(train) - cut)
    return Subset(train, np.arange(cut)), Subset(train, np.arange(cut, len(train)))


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


def make_eval_fn(config, module, head, arrays, mesh, rules):
    """eval_fn(state, frozen) -> the headline metrics (evaluate_lib.summary) on the eval split."""
    scorer = evaluate_lib.make_scorer(module, mesh, rules)

    def eval_fn(state, frozen=None):
        del frozen
        scores = scorer(state.params, arrays, batch_size=int(config.data.eval_batch_size), threshold=head.threshold,
                        max_batches=int(config.train.eval_batches))
        return evaluate_lib.summary(evaluate_lib.moderation_report(scores, arrays, head))

    return eval_fn


def choose_thresholds(config, module, params, head, arrays, mesh, rules) -> moderation_model.ModerationHead:
    """The head with the unsafe threshold that maximises F1 on the validation arrays and, when
    config.moderation.tune_category_thresholds, each category's threshold maximising its F1 (the
    default category_threshold for a category without a validation positive)."""
    scorer = evaluate_lib.make_scorer(module, mesh, rules)
    scores = scorer(params, arrays, batch_size=int(config.data.eval_batch_size))
    threshold, f1 = evaluate_lib.best_threshold(~arrays["is_safe"], scores["unsafe"])
    log.info("unsafe threshold %.4f (validation F1 %.4f on %d answers)", threshold, f1, len(scores["unsafe"]))
    if not config.moderation.tune_category_thresholds:
        return dataclasses.replace(head, threshold=threshold)
    cutoffs = []
    for c in range(head.num_categories):
        labels = arrays["categories"][:, c]
        cutoffs.append(evaluate_lib.best_threshold(labels, scores["categories"][:, c])[0] if labels.any()
                       else head.category_threshold)
    log.info("category thresholds: %s", ", ".join(f"{n}: {t:.3f}" for n, t in zip(head.category_names, cutoffs)))
    return dataclasses.replace(head, threshold=threshold, category_thresholds=tuple(cutoffs))


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
        eval_fn = make_eval_fn(config, module, head, eval_arrays, mesh, rules)

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
        tuned = choose_thresholds(config, module, result.state.params, head, arrays, mesh, rules)
        loading.export_moderation_model(out, cfg, result.state.params, tuned, tokenizer)

    common.export_once(result, workdir, export)
    return result
