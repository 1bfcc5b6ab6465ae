"""Supervised fine-tuning loss: next-token cross-entropy on response tokens.

Matches the HF causal-LM loss of upstream `finetune/trainer.py`: logits at position t predict
token t+1, positions whose target is not a response token (labels = -100 upstream; here
`loss_mask` False) are ignored, and the loss is the mean over all predicted tokens of the
micro-batch (a token mean, not the per-sequence mean of `common.masked_mean`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.objectives import common


def token_mean_nll(log_probs: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token-mean NLL of next-token log-probs over response tokens.

    log_probs: [B, T - 1] (slot t scores input_ids[:, t + 1]), loss_mask: [B, T] bool (True where
    input_ids[:, t] is a response token). Returns (loss scalar, number of loss tokens).
    """
    mask = loss_mask[:, 1:].astype(jnp.float32)
    num_tokens = jnp.sum(mask)
    return -jnp.sum(log_probs * mask) / jnp.maximum(num_tokens, 1.0), num_tokens


def sft_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
    """Token-mean next-token NLL over response tokens.

    logits: [B, T, V] (any float dtype; computed in fp32), input_ids: [B, T] int,
    loss_mask: [B, T] bool, True where input_ids[:, t] is a response token to predict.
    Returns (loss scalar, {"accuracy", "num_loss_tokens"}).
    """
    loss, num_tokens = token_mean_nll(common.next_token_log_probs(logits, input_ids), loss_mask)
    mask = loss_mask[:, 1:].astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1)[:, :-1] == input_ids[:, 1:]).astype(jnp.float32)
    accuracy = jnp.sum(correct * mask) / jnp.maximum(num_tokens, 1.0)
    return loss, {"accuracy": accuracy, "num_loss_tokens": num_tokens}


def make_loss_fn(model):
    """loss_fn(params, batch, rng, extra) -> (loss, (metrics, extra)) for `jaxalign.train.loop`.

    model: a `jaxalign.models.llama.Llama`; batch: an "sft" batch (input_ids, attention_mask,
    loss_mask, all [B, L]).
    """

    def loss_fn(params, batch, rng, extra):
        del rng  # no dropout in Llama
        out = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"])
        loss, metrics = sft_loss(out.logits, batch["input_ids"], batch["loss_mask"])
        return loss, (metrics, extra)

    return loss_fn


def make_metrics_fn(model):
    """metrics_fn(params, batch, extra) -> {"loss", "accuracy", "num_loss_tokens"} for evaluation."""

    def metrics_fn(params, batch, extra):
        del extra
        out = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"])
        loss, metrics = sft_loss(out.logits, batch["input_ids"], batch["loss_mask"])
        return dict(metrics, loss=loss)

    return metrics_fn
