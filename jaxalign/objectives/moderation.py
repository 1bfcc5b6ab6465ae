"""Moderation losses: unsafe BCE, weighted per-category BCE, severity CE, at the end and streaming.

    weights = ModerationLossSettings(category_pos_weight=tuple(positive_weights(train_categories)))
    loss, metrics = moderation_loss(out, batch, weights)          # out: models.moderation.ModerationOutput

Per position t of a sequence with labels (y unsafe, y_c categories, s severity):

    l_t = a_u * BCE(u_t, y) + a_c * (1/C) sum_c BCE_w(c_t,c, y_c; w_c) + a_s * CE(softmax(s_t), s)

    BCE_w(x, y; w) = -(w y log sigmoid(x) + (1 - y) log sigmoid(-x))     (torch's pos_weight)

Class imbalance: harm categories are rare (PKU-SafeRLHF: a few % of answers each, some < 0.5%),
so every category's positive term gets w_c = clip(N_neg,c / N_pos,c, 1, max_pos_weight) from the
*training-set* frequencies (`positive_weights`; the stage logs them). That balances the expected
gradient of positives and negatives per category; the cap keeps a category with a handful of
positives from dominating (and 0 positives -> weight 1). The unsafe label is not reweighted
(roughly balanced in the release; the decision threshold is tuned on validation data instead).

The loss of a batch:

    loss = mean_b l_end(b) + stream_coeff * mean_b [ mean_{t in R_b, t != end_b} l_t(b) ]

end = the last real token (the verdict); R_b = the response tokens of row b (batch
"response_mask"). The streaming term is the Qwen3Guard-Stream recipe: every response prefix is
trained against the *final* label, so the prefix score estimates P(final label | prefix) and a
generation can be stopped at the first token judged unsafe. Each row's prefix losses are averaged
first (a long answer does not outweigh a short one), so with stream_coeff <= 1 the single end
token carries at least as much weight as all prefixes of its row together: the end token
dominates, and the prefixes (which often cannot know the label yet, e.g. "Sure.") pull the
verdict less than the verdict pulls itself. stream_coeff = 0 trains only the end verdict.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.objectives.common import masked_row_mean


@dataclasses.dataclass(frozen=True)
class ModerationLossSettings:
    """Coefficients of the three heads and of the streaming term; per-category positive weights."""

    unsafe_coeff: float = 1.0
    category_coeff: float = 1.0
    severity_coeff: float = 1.0
    stream_coeff: float = 0.5  # weight of the mean prefix loss of a row relative to its end loss
    category_pos_weight: tuple[float, ...] | None = None  # [C]; None = 1 for every category

    def __post_init__(self):
        for name in ("unsafe_coeff", "category_coeff", "severity_coeff", "stream_coeff"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"config.moderation.{name} must be >= 0, got {getattr(self, name)}")


def positive_weights(categories: np.ndarray, max_pos_weight: float = 10.0) -> np.ndarray:
    """Per-category positive weights from training labels: categories [N, C] bool -> [C] float32,
    w_c = clip(N_neg / N_pos, 1, max_pos_weight); 1 where a category has no positive."""
    categories = np.asarray(categories, bool)
    pos = categories.sum(axis=0).astype(np.float64)
    neg = categories.shape[0] - pos
    ratio = np.divide(neg, pos, out=np.ones_like(pos), where=pos > 0)
    return np.clip(ratio, 1.0, max(1.0, float(max_pos_weight))).astype(np.float32)


def weighted_bce(logits: jax.Array, labels: jax.Array, pos_weight: jax.Array | float = 1.0) -> jax.Array:
    """Elementwise -(w y log sigmoid(x) + (1 - y) log sigmoid(-x)); logits, labels [...]; pos_weight
    broadcasts (e.g. [C] over [..., C])."""
    labels = labels.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    return -(pos_weight * labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits))


def severity_ce(logits: jax.Array, severity: jax.Array) -> jax.Array:
    """-log softmax(logits)[severity]: logits [..., S], severity [...] int -> [...]."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_p, severity[..., None].astype(jnp.int32), axis=-1)[..., 0]


def position_losses(unsafe_logits, category_logits, severity_logits, batch: dict,
                    settings: ModerationLossSettings) -> dict[str, jax.Array]:
    """The three head losses at every position against the row's final labels.

    unsafe_logits [B, (T)], category_logits [B, (T), C], severity_logits [B, (T), S]; batch:
    is_safe [B], categories [B, C], severity [B]. -> {"unsafe", "category", "severity", "total"},
    each [B] or [B, T] (the category loss is the mean over categories)."""
    per_token = unsafe_logits.ndim == 2
    expand = (lambda x: x[:, None]) if per_token else (lambda x: x)  # noqa: E731
    unsafe_label = expand(~batch["is_safe"].astype(bool))
    categories = batch["categories"].astype(bool)
    categories = categories[:, None, :] if per_token else categories
    pos_weight = 1.0 if settings.category_pos_weight is None else jnp.asarray(settings.category_pos_weight, jnp.float32)
    unsafe = weighted_bce(unsafe_logits, unsafe_label)
    category = jnp.mean(weighted_bce(category_logits, categories, pos_weight), axis=-1)
    severity_labels = jnp.broadcast_to(expand(batch["severity"]), severity_logits.shape[:-1])
    severity = severity_ce(severity_logits, severity_labels)
    total = settings.unsafe_coeff * unsafe + settings.category_coeff * category + settings.severity_coeff * severity
    return {"unsafe": unsafe, "category": category, "severity": severity, "total": total}


def stream_mask(batch: dict, end_index: jax.Array) -> jax.Array:
    """Response tokens other than the end token: [B, T] bool."""
    mask = batch["response_mask"].astype(bool)
    positions = jnp.arange(mask.shape[1])[None, :]
    return mask & (positions != end_index[:, None])


def moderation_loss(out, batch: dict, settings: ModerationLossSettings) -> tuple[jax.Array, dict]:
    """The batch loss (module docstring) and metrics: end losses per head, stream loss, and
    accuracies at the end token (unsafe at 0.5, severity argmax)."""
    end = position_losses(out.end_unsafe_logits, out.end_category_logits, out.end_severity_logits, batch, settings)
    end_loss = jnp.mean(end["total"])
    metrics = {f"{name}_loss": jnp.mean(value) for name, value in end.items() if name != "total"}
    metrics["end_loss"] = end_loss
    loss = end_loss
    if settings.stream_coeff > 0:
        tokens = position_losses(out.unsafe_logits, out.category_logits, out.severity_logits, batch, settings)
        stream = jnp.mean(masked_row_mean(tokens["total"], stream_mask(batch, out.end_index)))
        metrics["stream_loss"] = stream
        loss = loss + settings.stream_coeff * stream
    unsafe = ~batch["is_safe"].astype(bool)
    metrics["unsafe_accuracy"] = jnp.mean(((out.end_unsafe_logits > 0) == unsafe).astype(jnp.float32))
    metrics["severity_accuracy"] = jnp.mean(
        (jnp.argmax(out.end_severity_logits, axis=-1) == batch["severity"]).astype(jnp.float32))
    return loss, metrics


def make_loss_fn(module, settings: ModerationLossSettings):
    """loss_fn(params, batch, rng, extra) -> (loss, (metrics, extra)) for loop.train; module: a
    ModerationModel; batch: a "qa" batch (pipeline.py)."""

    def loss_fn(params, batch, rng, extra):
        del rng  # no dropout
        out = module.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"])
        loss, metrics = moderation_loss(out, batch, settings)
        return loss, (metrics, extra)

    return loss_fn


def as_tuple(values: Sequence[float] | np.ndarray) -> tuple[float, ...]:
    """Positive weights as a hashable tuple of floats (for the frozen settings)."""
    return tuple(float(v) for v in np.asarray(values).reshape(-1))
