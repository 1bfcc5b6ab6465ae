"""The moderation model's validation data and the decision thresholds chosen on it.

    train, validation = hold_out_rows(examples, fraction=0.05)   # the last 5% of the rows, never trained on
    eval_fn = make_eval_fn(module, head, eval_arrays, mesh, rules, batch_size=32)   # loop.train's eval_fn
    head = choose_thresholds(head, scores, validation_arrays, tune_categories=True)

The unsafe threshold is the one maximising F1 on the validation answers (evaluate.moderation.
best_threshold, unsafe = positive, as the guard-model benchmarks report F1); each category's
threshold likewise when `tune_categories`, the head's category_threshold where the validation data
has no positive of that category. The thresholds are saved with the model (config.json), so every
consumer of the export (`jaxalign moderate`, the RL cost signal) decides the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Sequence

import numpy as np

from jaxalign.evaluate import moderation as evaluate_lib
from jaxalign.models.moderation import ModerationHead

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


def hold_out_rows(examples: Sequence[dict], fraction: float) -> tuple[Subset, Subset]:
    """(train, validation) of a qa view (two answers per release row, views.qa_examples): the last
    round(fraction · rows) rows go to validation, both answers of a row on one side."""
    rows = len(examples) // 2
    held = int(round(fraction * rows))
    if not 0.0 < fraction < 1.0 or held < 1 or held >= rows:
        raise ValueError(f"config.moderation.validation_fraction={fraction} holds out {held} of the {rows} train rows; "
                         "it must hold out at least one row and leave some, or set config.moderation.validation_split")
    cut = 2 * (rows - held)
    log.info("threshold validation: the last %d train rows (%d QA examples), not trained on", held, len(examples) - cut)
    return Subset(examples, np.arange(cut)), Subset(examples, np.arange(cut, len(examples)))


def make_eval_fn(module, head: ModerationHead, arrays: dict[str, np.ndarray], mesh, rules, *, batch_size: int,
                 max_batches: int = -1):
    """eval_fn(state, frozen=None) -> the headline metrics (evaluate.moderation.summary) of the model in
    `state.params` on `arrays` (pipeline.tokenize_examples("qa", ...)) at head.threshold."""
    scorer = evaluate_lib.make_scorer(module, mesh, rules)

    def eval_fn(state, frozen=None):
        del frozen
        scores = scorer(state.params, arrays, batch_size=batch_size, threshold=head.threshold, max_batches=max_batches)
        return evaluate_lib.summary(evaluate_lib.moderation_report(scores, arrays, head))

    return eval_fn


def choose_thresholds(head: ModerationHead, scores: dict[str, np.ndarray], arrays: dict[str, np.ndarray], *,
                      tune_categories: bool) -> ModerationHead:
    """The head with the unsafe threshold maximising F1 of scores["unsafe"] [N] against ~is_safe and,
    when tune_categories, each category's threshold maximising its F1 of scores["categories"] [N, C]
    against arrays["categories"] [N, C] (head.category_threshold for a category without a positive)."""
    threshold, f1 = evaluate_lib.best_threshold(~np.asarray(arrays["is_safe"], bool), scores["unsafe"])
    log.info("unsafe threshold %.4f (validation F1 %.4f on %d answers)", threshold, f1, len(scores["unsafe"]))
    if not tune_categories:
        return dataclasses.replace(head, threshold=threshold)
    labels = np.asarray(arrays["categories"], bool)
    cutoffs = [evaluate_lib.best_threshold(labels[:, c], scores["categories"][:, c])[0] if labels[:, c].any()
               else head.category_threshold for c in range(head.num_categories)]
    log.info("category thresholds: %s", ", ".join(f"{n}: {t:.3f}" for n, t in zip(head.category_names, cutoffs)))
    return dataclasses.replace(head, threshold=threshold, category_thresholds=tuple(cutoffs))


def tune_thresholds(module, params, head: ModerationHead, arrays: dict[str, np.ndarray], mesh, rules, *,
                    batch_size: int, tune_categories: bool) -> ModerationHead:
    """choose_thresholds on the scores of the model (`module`, `params`) on the validation `arrays`."""
    scores = evaluate_lib.make_scorer(module, mesh, rules)(params, arrays, batch_size=batch_size)
    return choose_thresholds(head, scores, arrays, tune_categories=tune_categories)
