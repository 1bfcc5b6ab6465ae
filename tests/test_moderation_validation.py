"""moderation/validation.py: held-out rows (Subset over eager and lazy views), thresholds chosen on
validation scores against a brute-force F1 search. (The stage end to end: test_moderation_stage.py.)"""

import numpy as np
import pytest

from jaxalign.data import mini, prepared, views
from jaxalign.models.moderation import ModerationHead
from jaxalign.moderation import validation


@pytest.fixture(scope="module")
def rows():
    return mini.generate_rows(20, seed=3)


def test_hold_out_rows_keeps_both_answers_of_a_row_on_one_side(rows):
    examples = views.qa_examples(rows)
    train, held = validation.hold_out_rows(examples, 0.25)
    assert len(train) == 2 * 15 and len(held) == 2 * 5  # the last 5 of 20 rows
    assert train.kind == held.kind == "qa" and held.counts["kept"] == 10
    assert list(held) == list(examples[30:]) and list(train) == list(examples[:30])
    assert held[0] == examples[30] and held.read([1, 0]) == [examples[31], examples[30]]
    train_prompts = {e["prompt"] + e["response"] for e in train}
    assert not train_prompts & {e["prompt"] + e["response"] for e in held}
    for fraction, held_rows in ((0.0, 0), (0.01, 0), (1.0, 20)):
        message = f"validation_fraction={fraction} holds out {held_rows} of the 20 train rows"
        with pytest.raises(ValueError, match=message):
            validation.hold_out_rows(examples, fraction)


def test_subset_of_a_lazy_view_reads_through_it(tmp_path, monkeypatch):
    """Over a prepared ArrayRecord split (a lazy view) the subsets give the eager view's examples,
    each batch of them through one `read` of the view."""
    mini.write_mini(tmp_path / "mini", rows=40, seed=0)
    prepared.prepare(tmp_path / "mini", tmp_path / "prepared", "default")
    split = prepared.load_prepared(tmp_path / "prepared", "default", "train")
    lazy, eager = views.qa_examples(split), views.qa_examples(list(split))
    train, held = validation.hold_out_rows(lazy, 0.1)
    calls = []
    read = lazy.read
    monkeypatch.setattr(lazy, "read", lambda indices: calls.append(list(indices)) or read(indices))
    assert list(held) == list(eager[len(train):]) and train.read([0, 5]) == [eager[0], eager[5]]
    assert calls[0] == list(range(len(train), len(eager))) and calls[1] == [0, 5]


def brute_force_f1(labels, scores):
    """max over thresholds t in the scores (positive iff score >= t) of F1 -> (best F1, predictions)."""
    best, best_pred = -1.0, None
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp = np.sum(pred & labels)
        f1 = 2 * tp / (2 * tp + np.sum(pred & ~labels) + np.sum(~pred & labels))
        if f1 > best:
            best, best_pred = f1, pred
    return best, best_pred


def test_choose_thresholds_maximise_f1_per_decision():
    rng = np.random.default_rng(0)
    n, c = 200, 19
    is_safe = rng.random(n) < 0.6
    unsafe = np.clip(np.where(is_safe, 0.3, 0.7) + rng.normal(0, 0.2, n), 0, 1)  # overlapping classes
    categories = rng.random((n, c)) < 0.1
    categories[:, 5] = False  # no validation positive: keeps the default
    category_scores = np.clip(categories * 0.4 + rng.random((n, c)) * 0.6, 0, 1)
    arrays = {"is_safe": is_safe, "categories": categories}
    scores = {"unsafe": unsafe, "categories": category_scores}
    head = validation.choose_thresholds(ModerationHead(category_threshold=0.45), scores, arrays, tune_categories=True)
    f1, pred = brute_force_f1(~is_safe, unsafe)
    np.testing.assert_array_equal(unsafe >= head.threshold, pred)
    assert 0.0 < head.threshold < 1.0 and f1 > 0.7
    assert len(head.category_thresholds) == c and head.category_thresholds[5] == 0.45
    for k in (0, 7, 18):
        _, pred = brute_force_f1(categories[:, k], category_scores[:, k])
        np.testing.assert_array_equal(category_scores[:, k] >= head.category_thresholds[k], pred)
    untuned = validation.choose_thresholds(ModerationHead(), scores, arrays, tune_categories=False)
    assert untuned.threshold == head.threshold and untuned.category_thresholds == ()
