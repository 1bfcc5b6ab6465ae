"""Experience of one rollout batch: log-probs, scores, values and advantages (upstream
safe-rlhf/safe_rlhf/algorithms/ppo/trainer.py post_rollout, safe_rlhf/trainers/rl_trainer.py).

All functions are pure and traced inside one jit (`score_experience`); shapes use
B = batch, L = S + max_new_tokens, T = L - 1 (shifted slots), R = T - start (response slots).
What differs between algorithms (which scores, which streams, critics or not) comes from the
algorithm object (rl/algorithms); nothing here branches on its name.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models.masks import last_true_index
from jaxalign.objectives.common import last_token_scores, masked_row_mean, next_token_log_probs
from jaxalign.rl import stacking
from jaxalign.rl.algorithms.base import Algorithm
from jaxalign.rl.roles import RoleFns
from jaxalign.rl.settings import RLSettings


@flax.struct.dataclass
class Experience:
    """Everything the PPO update needs from one rollout batch (response slots only)."""

    input_ids: jax.Array  # [B,L] int32: left-padded prompt + response + pad
    attention_mask: jax.Array  # [B,L] bool
    response_mask: jax.Array  # [B,R] bool: attention_mask[:, 1:][:, start:]
    old_log_probs: jax.Array  # [B,R] the actor's log-probs at rollout time
    ref_log_probs: jax.Array  # [B,R] the reference's (the KL's other term; a KL-in-the-loss actor_loss reads it)
    advantages: dict  # {stream: [B,R]}
    values: dict  # {stream with a critic: [B,R]} critic values at rollout time
    returns: dict  # {stream with a critic: [B,R]}


def policy_log_probs(fns: RoleFns, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                     start: int) -> jax.Array:
    """log pi(token_{t+1} | tokens_<=t) for the slots t >= start. -> [B,R] (R = L - start - 1): from
    fns.log_probs when set (rl.logits_chunk: without the full logits), else from fns.policy's logits."""
    if fns.log_probs is not None:
        return fns.log_probs(params, input_ids, attention_mask, start)
    logits = fns.policy(params, input_ids, attention_mask, start)  # [B, L - start, V]
    return next_token_log_probs(logits, input_ids[:, start:])


def end_scores(score_fn, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Sequence score = per-token score at the last real token (EOS). -> [B]."""
    return last_token_scores(score_fn(params, input_ids, attention_mask), attention_mask)


def read_scores(algorithm: Algorithm, settings: RLSettings, per_token: dict, inputs: dict,
                retokenized=()) -> tuple[dict, dict]:
    """Each scorer's end score and, for the algorithm's token streams, its per-token scores.

    per_token: {scorer: [B,L]} one pass of each scorer over inputs {scorer: (ids, mask) [B,L]};
    retokenized: the scorers whose inputs are re-tokenised (their tokens do not align with the actor's).
    -> (end scores {scorer: [B]}, {token stream: [B,R]}): slot t of a per-token score is the
    scorer's score of the prefix ending with the response token of slot t (position start + 1 + t),
    so its last real slot is the end score.
    """
    token_streams = algorithm.token_streams(settings)
    if set(token_streams) - set(per_token):
        raise ValueError(f"{algorithm.name}: per-token streams {token_streams} need scorers of the same name, "
                         f"got {tuple(per_token)}")
    scores = {name: last_token_scores(values, inputs[name][1]) for name, values in per_token.items()}
    token_scores = {}
    for name in token_streams:
        if name in retokenized:
            raise ValueError(f"config.rl.{algorithm.name}.cost_per_token: the {name} model has its own tokenizer, "
                             f"so its per-token scores do not align with the actor's tokens")
        token_scores[name] = per_token[name][:, settings.start + 1:].astype(jnp.float32)
    return scores, token_scores


def critic_values(score_fn, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                  start: int) -> jax.Array:
    """Critic values V_t = scores[:, t] for the response slots. -> [B,R]."""
    return score_fn(params, input_ids, attention_mask)[:, start:-1].astype(jnp.float32)


def retokenize(input_ids: np.ndarray, attention_mask: np.ndarray, source, dest,
               length: int) -> tuple[np.ndarray, np.ndarray]:
    """The actor's sequences in a score model's own tokenizer, on the host (upstream
    `batch_retokenize` in safe_rlhf/trainers/rl_trainer.py): each row's real tokens (mask) decoded with `source` skipping
    special tokens, `dest.eos_token` appended as text, encoded with `dest` (add_special_tokens,
    as the score model was trained: BOS first), then right-padded with dest's pad id / cut to
    `length` (static shapes instead of upstream's LONGEST padding).
    input_ids, attention_mask: [B,L]. -> (ids [B,length] int32, mask [B,length] bool)."""
    rows = [ids[mask.astype(bool)] for ids, mask in zip(np.asarray(input_ids), np.asarray(attention_mask))]
    texts = [text + dest.eos_token for text in source.batch_decode(rows, skip_special_tokens=True)]
    encoded = dest(texts, add_special_tokens=True)["input_ids"]
    out = np.full((len(rows), length), dest.pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for row, ids in enumerate(encoded):
        ids = ids[:length]
        out[row, :len(ids)], mask[row, :len(ids)] = ids, True
    return out, mask


def score_experience(fns: RoleFns, algorithm: Algorithm, settings: RLSettings, params: dict, kl_coeff: jax.Array,
                     input_ids: jax.Array, attention_mask: jax.Array,
                     retokenized: dict | None = None, stack: bool = False,
                     sample_log_probs: jax.Array | None = None) -> tuple[Experience, dict]:
    """Scores a rollout batch with the algorithm's roles and computes each stream's advantages.

    params: {role: pytree} for "actor", "reference", the algorithm's scorers and critics;
    kl_coeff: [] (beta); input_ids, attention_mask: [B,L]; retokenized: {scorer: (ids, mask)
    [B,L']} for the scorers with their own tokenizer (`retokenize`), scored on those instead;
    stack: roles of one architecture (actor + reference; scorers + critics) as one batched pass
    (rl/stacking.py); sample_log_probs [B,R]: the sampler's log-probs, the old log-probs when
    settings.old_log_probs == "sampler" (then the actor has no forward here).
    Returns (Experience, per-sequence stats {name: [B]}).
    """
    retokenized = retokenized or {}
    start = settings.start
    response_mask = attention_mask[:, 1:][:, start:]
    # Slot of the last real token within the response slots (upstream end_index - start).
    end_index = last_true_index(response_mask)
    mask = response_mask.astype(jnp.float32)

    log_probs_fn = lambda p, ids, mask: policy_log_probs(fns, p, ids, mask, start)  # noqa: E731 (one fn: stackable)
    policies = ("reference",) if settings.old_log_probs == "sampler" else ("actor", "reference")
    log_probs = stacking.score_pass(dict.fromkeys(policies, log_probs_fn), params,
                                    dict.fromkeys(policies, (input_ids, attention_mask)), stack)
    if settings.old_log_probs == "sampler":
        if sample_log_probs is None:
            raise ValueError("config.rl.old_log_probs='sampler' needs the sampler's log-probs of the rollout")
        log_probs["actor"] = jnp.where(response_mask, sample_log_probs.astype(jnp.float32), 0.0)
    old_log_probs = log_probs["actor"]
    kl = old_log_probs - log_probs["reference"]
    critics = tuple(f"{stream}_critic" for stream in algorithm.critics)
    inputs = {name: retokenized.get(name, (input_ids, attention_mask)) for name in algorithm.scorers}
    # One pass of each scorer and critic (per-token scores [B,L]), stacked where they share an architecture.
    passes = stacking.score_pass({role: fns.scores[role] for role in (*algorithm.scorers, *critics)}, params,
                                 dict(inputs, **dict.fromkeys(critics, (input_ids, attention_mask))), stack)
    per_token = {name: passes[name] for name in algorithm.scorers}
    scores, token_scores = read_scores(algorithm, settings, per_token, inputs, retokenized)
    sequence = algorithm.sequence_scores(settings, scores)

    stats = dict(scores, kl_divergence=jnp.sum(kl * mask, axis=-1), generated_length=jnp.sum(mask, axis=-1))
    advantages, values, returns = {}, {}, {}
    for stream in algorithm.streams:
        stream_values = None
        if stream in algorithm.critics:
            critic = f"{stream}_critic"
            stream_values = passes[critic][:, start:-1].astype(jnp.float32)  # as critic_values
        per_token = {"token_scores": token_scores[stream]} if stream in token_scores else {}
        shaped, advantages[stream], stream_returns = algorithm.stream_advantages(
            settings, stream, sequence[stream], kl, end_index, kl_coeff, stream_values, response_mask, **per_token)
        stats[f"{stream}_with_kl_penalty"] = jnp.sum(shaped * mask, axis=-1)
        stats[f"{stream}_advantage"] = masked_row_mean(advantages[stream], mask)
        if stream_values is not None:
            values[stream], returns[stream] = stream_values, stream_returns
            stats[f"{stream}_value"] = masked_row_mean(stream_values, mask)
            stats[f"{stream}_return"] = masked_row_mean(stream_returns, mask)
    experience = Experience(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                            old_log_probs=old_log_probs, ref_log_probs=log_probs["reference"], advantages=advantages,
                            values=values, returns=returns)
    return experience, stats
