"""Pairwise (preference-optimisation) losses as a table: one `Method` entry per loss.

    method    batch kind         sides               scorers                  window      loss
    dpo       preference         better, worse       reference                divergence  Rafailov et al. 2023, Eq. 7
    safe_dpo  safety_preference  safer, unsafer      reference                divergence  Kim et al. 2025, §4
    c_dpo     preference         better, worse       reference, reward, cost  divergence  Liu et al. 2024, §4
    ipo       preference         better, worse       reference                divergence  Azar et al. 2023, Eq. 17
    simpo     preference         better, worse       (none)                   response    Meng et al. 2024, Eq. 6
    kto       qa                 answer, mismatched  reference                response    Ethayarajh et al. 2024, Eq. 8

A `Method` declares the pipeline batch kind it reads (data/pipeline.py), the view building its
examples from release rows, its sides (the batch's sequence prefixes; ``answer`` is the qa kind's
unprefixed sequence), the frozen models it scores with, the window each sequence
log-probability ℓ sums over, its typed settings (fields read from config.dpo by name) and its loss
`loss(LossInputs, settings) -> (loss, metrics)`. `make_loss_fn` / `make_metrics_fn` build every
method's training and evaluation functions the same way: one policy forward (and one reference
forward) over the sides stacked on the batch axis, ℓ per side, the frozen scores per side, then the
method's loss. Adding a method is one loss function and one `METHODS` entry here, a config and a test.

    DPO       loss_b = -logσ(β·[(ℓ_w - ℓ_w^ref) - (ℓ_l - ℓ_l^ref)])
              (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7; safe-rlhf
              safe_rlhf/algorithms/dpo/trainer.py)
    SafeDPO   helpfulness pairs with safety indicators h (1 = unsafe). The safety-aware transform
              swaps a pair whose preferred answer is unsafe and the other safe; then
              loss_b = -logσ(β·[Δℓ_w - Δℓ_l] - (h_l - h_w)·Δ), Δ >= 0 the one extra hyper-parameter
              (Kim et al., SafeDPO, ICLR 2026, arXiv:2505.20065, §4; the closed form and the
              tractable objective are its Eqs. 9-12 per the ICLR reviews; numbering not re-checked
              against the PDF, which was not reachable from here)
    C-DPO     DPO under the Bradley-Terry preference p*_λ of r_λ = r - λc:
              p_λ = σ(r_λ(y_1) - r_λ(y_2)),  loss_b = -[p_λ·logσ(m) + (1 - p_λ)·logσ(-m)]
              with λ by dual ascent, λ <- λ + η·(J_C - threshold) (Liu, Sun & Zheng, "Enhancing LLM
              Safety via Constrained Direct Preference Optimization", arXiv:2403.02475, §4 and its
              dual-gradient algorithm; equation numbers not re-checked). Deviation: the paper
              estimates J_C = E_{y~π_θ}[c] from fresh samples of the policy; here J_C is estimated
              without sampling, as the cost of the answer the policy's implicit preference picks
              from each training pair (σ(m)·c_1 + σ(-m)·c_2), averaged over a window of batches.
              λ lives in log space and steps with PPO-Lagrangian's code (lagrange.py).
    IPO       loss_b = (h_b - 1/(2τ))², h = (ℓ_w - ℓ_w^ref) - (ℓ_l - ℓ_l^ref) (Azar et al. 2023,
              arXiv:2310.12036, Eq. 17: the empirical IPO loss, ℓ summed over tokens as written there.
              TRL's trl/trainer/dpo_trainer.py averages ℓ over the completion tokens for its "ipo" loss
              instead, noting that the IPO authors confirmed the paper's results used that form; with
              sums, τ sets a per-answer margin, with means a per-token one)
    SimPO     loss_b = -logσ(β/|y_w|·log π(y_w|x) - β/|y_l|·log π(y_l|x) - γ), no reference model
              (Meng, Xia & Chen 2024, arXiv:2405.14734, Eq. 6; princeton-nlp/SimPO
              scripts/simpo_trainer.py: mean log-prob over the response tokens, γ = beta·gamma_beta_ratio)
    KTO       unpaired answers labelled desirable (safe) or undesirable (unsafe):
              r = ℓ - ℓ^ref, z_0 = max(0, mean_b[ℓ(y'_b|x_b) - ℓ^ref(y'_b|x_b)]) (no gradient) over
              mismatched pairs (the prompt of row b with the answer of row b + B/2 of the batch),
              loss = mean_b[λ_y - v_b], v_b = λ_D·σ(β(r_b - z_0)) if desirable, λ_U·σ(β(z_0 - r_b))
              if not (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 8; TRL's
              trl/trainer/kto_trainer.py labels the same loss Eq. 7, after another arXiv version)

Windows of ℓ. "divergence" (safe-rlhf's DPO): the tokens from the first index d where the two
sequences of a pair differ up to each sequence's last real token, i.e. shifted slots [d-1, end-1].
Upstream sums the shifted slots [d, end] instead (skips the first divergent token and adds
log p(pad)); the shared prefix cancels in ℓ^θ - ℓ^ref differences either way. "response": the
answer's tokens (the batch's `*response_mask`: after the prompt, EOS included), for the methods
whose ℓ is not a difference against a reference on the same prefix (SimPO normalises by |y|, KTO
compares one answer with a reference point).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxalign import models
from jaxalign.data import views
from jaxalign.models import loading, score
from jaxalign.objectives import lagrange as lagrange_lib
from jaxalign.objectives.common import last_token_scores, next_token_log_probs

log = logging.getLogger(__name__)

# (params, input_ids [N,L], attention_mask [N,L]) -> logits [N,L,V]
PolicyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# (params, input_ids [N,L], attention_mask [N,L]) -> per-token scores [N,L]
ScoreFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
ANSWER = "answer"  # the side name of a single-sequence batch (qa): its keys carry no prefix


# ---------------------------------------------------------------------------------------------
# Sequence log-probabilities


def divergence_index(ids_a: jax.Array, ids_b: jax.Array) -> jax.Array:
    """First index where two token sequences differ. ids_*: [B, L] -> [B] int (0 if identical)."""
    return jnp.argmax(ids_a != ids_b, axis=-1)


def window_log_probs(logits: jax.Array, input_ids: jax.Array, window: jax.Array) -> jax.Array:
    """ℓ = Σ_{t >= 1, window[t]} log π(x_t | x_<t). logits [N, L, V]; input_ids, window [N, L] -> [N] fp32."""
    log_probs = next_token_log_probs(logits, input_ids)  # slot t scores token t+1
    return jnp.sum(jnp.where(window[:, 1:], log_probs, 0.0), axis=-1)


def divergence_window(input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The window of pairs stacked as concat([first; second]) ([2B, L] each -> [2B, L] bool):
    real tokens from the pair's first differing token on (at least token 1)."""
    first_ids, second_ids = jnp.split(input_ids, 2, axis=0)
    start = jnp.maximum(divergence_index(first_ids, second_ids), 1)
    tokens = jnp.arange(input_ids.shape[1])[None, :]
    return (tokens >= jnp.concatenate([start, start])[:, None]) & attention_mask.astype(bool)


def pair_log_probs(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ℓ of both sides of pairs stacked as concat([first; second]) over the divergence window.

    logits: [2B, L, V], input_ids, attention_mask: [2B, L] -> (ℓ_first [B], ℓ_second [B]).
    """
    ell = window_log_probs(logits, input_ids, divergence_window(input_ids, attention_mask))
    return tuple(jnp.split(ell, 2, axis=0))


def mismatched_answers(batch: dict) -> dict:
    """KTO's mismatched pairs: row b = the prompt of row b + the answer of row b + B/2 (cyclic), cut
    to the batch's length. batch: input_ids, attention_mask, response_mask [B, L] (right-padded, the
    prompt first) -> the batch plus mismatched_input_ids / _attention_mask / _response_mask [B, L].

    Half a batch away rather than the next row: on an unshuffled split (evaluation) the neighbours of
    a row often answer the same prompt (the qa view puts a release row's two answers next to each
    other, and the release has several rows per prompt).
    """
    ids = batch["input_ids"]
    mask = batch["attention_mask"].astype(bool)
    response = batch["response_mask"].astype(bool)
    rows, length = ids.shape
    if rows < 2:
        raise ValueError("KTO estimates its KL reference point from mismatched answers in the batch: a "
                         "(micro-)batch of 1 answer has none; use at least 2")
    other = (jnp.arange(rows) + rows // 2) % rows
    prompt_length = jnp.sum(mask & ~response, axis=1)[:, None]  # [B, 1]
    answer_length = jnp.sum(response, axis=1)[other][:, None]
    tokens = jnp.arange(length)[None, :]
    in_prompt = tokens < prompt_length
    source_row = jnp.where(in_prompt, jnp.arange(rows)[:, None], other[:, None])
    source_position = jnp.where(in_prompt, tokens, tokens - prompt_length + prompt_length[other])
    new_mask = tokens < prompt_length + answer_length
    return dict(batch, mismatched_input_ids=ids[source_row, jnp.clip(source_position, 0, length - 1)],
                mismatched_attention_mask=new_mask, mismatched_response_mask=new_mask & ~in_prompt)


def _keys(side: str) -> tuple[str, str, str]:
    prefix = "" if side == ANSWER else f"{side}_"
    return f"{prefix}input_ids", f"{prefix}attention_mask", f"{prefix}response_mask"


def stack_sides(batch: dict, sides: tuple[str, ...], window: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(input_ids, attention_mask, ℓ window), each [S·B, L], of the sides stacked on the batch axis."""
    keys = [_keys(side) for side in sides]
    ids = jnp.concatenate([batch[k[0]] for k in keys], axis=0)
    mask = jnp.concatenate([batch[k[1]] for k in keys], axis=0)
    if window == "divergence":
        return ids, mask, divergence_window(ids, mask)
    return ids, mask, jnp.concatenate([batch[k[2]] for k in keys], axis=0).astype(bool)


# ---------------------------------------------------------------------------------------------
# The losses (pure functions of per-side log-probabilities; each checked against numpy in tests)


def implicit_rewards(policy_logp: jax.Array, reference_logp: jax.Array, beta: float) -> jax.Array:
    """β·(ℓ^θ - ℓ^ref). [B]."""
    return beta * (policy_logp - reference_logp)


def preference_metrics(better_reward: jax.Array, worse_reward: jax.Array) -> dict[str, jax.Array]:
    """reward_accuracy = mean(r_w > r_l), reward_margin = mean(r_w - r_l) and the two means
    of the implicit rewards (upstream's logged values). [B] each -> scalars."""
    return {
        "reward_accuracy": jnp.mean((better_reward > worse_reward).astype(jnp.float32)),
        "reward_margin": jnp.mean(better_reward - worse_reward),
        "better_reward": jnp.mean(better_reward),
        "worse_reward": jnp.mean(worse_reward),
    }


def dpo_loss(better_logp: jax.Array, worse_logp: jax.Array, ref_better_logp: jax.Array, ref_worse_logp: jax.Array,
             beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mean_b -logσ(β·[(ℓ_w - ℓ_w^ref) - (ℓ_l - ℓ_l^ref)]) (Rafailov et al. 2023, Eq. 7). Inputs [B].
    -> (loss, metrics)."""
    better_reward = implicit_rewards(better_logp, ref_better_logp, beta)
    worse_reward = implicit_rewards(worse_logp, ref_worse_logp, beta)
    loss = jnp.mean(-jax.nn.log_sigmoid(better_reward - worse_reward))
    return loss, preference_metrics(better_reward, worse_reward)


def safety_transform(better_unsafe: jax.Array, worse_unsafe: jax.Array) -> jax.Array:
    """SafeDPO's safety-aware transform: True where the helpfulness-preferred answer is unsafe and
    the other safe, i.e. where the pair is swapped. *_unsafe: [B] bool -> [B] bool."""
    return better_unsafe.astype(bool) & ~worse_unsafe.astype(bool)


def safe_dpo_loss(better_logp: jax.Array, worse_logp: jax.Array, ref_better_logp: jax.Array,
                  ref_worse_logp: jax.Array, better_unsafe: jax.Array, worse_unsafe: jax.Array, beta: float,
                  margin: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SafeDPO (arXiv:2505.20065, §4): swap the pairs whose preferred answer is unsafe and the other
    safe, then mean_b -logσ(β·[Δℓ_w - Δℓ_l] - (h_l - h_w)·Δ), h = 1 for unsafe, Δ = margin >= 0.

    Inputs [B] (log-probs and unsafe indicators, in helpfulness order). Metrics are on the
    transformed pairs, plus the swapped fraction. -> (loss, metrics).
    """
    swap = safety_transform(better_unsafe, worse_unsafe)
    r_better = implicit_rewards(better_logp, ref_better_logp, beta)
    r_worse = implicit_rewards(worse_logp, ref_worse_logp, beta)
    r_w, r_l = jnp.where(swap, r_worse, r_better), jnp.where(swap, r_better, r_worse)
    h_w = jnp.where(swap, worse_unsafe, better_unsafe).astype(jnp.float32)
    h_l = jnp.where(swap, better_unsafe, worse_unsafe).astype(jnp.float32)
    loss = jnp.mean(-jax.nn.log_sigmoid(r_w - r_l - (h_l - h_w) * margin))
    metrics = preference_metrics(r_w, r_l)
    metrics["swapped_fraction"] = jnp.mean(swap.astype(jnp.float32))
    metrics["safe_over_unsafe_fraction"] = jnp.mean(h_l - h_w)
    return loss, metrics


def c_dpo_loss(better_logp: jax.Array, worse_logp: jax.Array, ref_better_logp: jax.Array, ref_worse_logp: jax.Array,
               better_score: jax.Array, worse_score: jax.Array, better_cost: jax.Array, worse_cost: jax.Array,
               lam: jax.Array, beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """C-DPO (arXiv:2403.02475, §4) for a fixed λ: DPO with the soft label
    p_λ = σ(r_λ(y_1) - r_λ(y_2)), r_λ = r - λ·c, of the frozen reward and cost models.

    loss = mean_b -[p_λ·logσ(m) + (1 - p_λ)·logσ(-m)], m = β·[Δℓ_1 - Δℓ_2]. Inputs [B]
    (first = helpfulness-better side), lam []. Metrics: the DPO metrics in helpfulness order,
    label_mean = mean p_λ, and policy_cost = mean_b[σ(m)·c_1 + σ(-m)·c_2], the cost of the answer the
    policy's implicit preference picks from each pair (the estimate of J_C used by `c_dpo_step`).
    """
    r_1 = implicit_rewards(better_logp, ref_better_logp, beta)
    r_2 = implicit_rewards(worse_logp, ref_worse_logp, beta)
    margin = r_1 - r_2
    lam = jax.lax.stop_gradient(lam)
    label = jax.nn.sigmoid((better_score - lam * better_cost) - (worse_score - lam * worse_cost))
    label = jax.lax.stop_gradient(label)
    loss = jnp.mean(-(label * jax.nn.log_sigmoid(margin) + (1.0 - label) * jax.nn.log_sigmoid(-margin)))
    pick = jax.lax.stop_gradient(jax.nn.sigmoid(margin))
    metrics = preference_metrics(r_1, r_2)
    metrics["label_mean"] = jnp.mean(label)
    metrics["policy_cost"] = jnp.mean(pick * better_cost + (1.0 - pick) * worse_cost)
    return loss, metrics


def c_dpo_step(state: lagrange_lib.LagrangeState, policy_cost: jax.Array, threshold: float, lambda_lr: float,
               lambda_max: float | None) -> lagrange_lib.LagrangeState:
    """C-DPO's dual ascent on λ with PPO-Lagrangian's machinery (lagrange.py): push the batch's
    policy-cost estimate into the window, then one log-space step on -(J_C - threshold)·λ. Traced."""
    state = lagrange_lib.push_costs(state, jax.lax.stop_gradient(policy_cost)[None])
    return lagrange_lib.update_lagrange(state, lagrange_lib.window_mean(state), 0, threshold, lambda_lr,
                                        lambda_max, 0)


def ipo_loss(better_logp: jax.Array, worse_logp: jax.Array, ref_better_logp: jax.Array, ref_worse_logp: jax.Array,
             tau: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mean_b (h_b - 1/(2τ))², h = (ℓ_w - ℓ_w^ref) - (ℓ_l - ℓ_l^ref) (Azar et al. 2023, Eq. 17).
    Inputs [B]. Metrics on the log-ratios ℓ - ℓ^ref (reward_margin = mean h). -> (loss, metrics)."""
    better_ratio = better_logp - ref_better_logp
    worse_ratio = worse_logp - ref_worse_logp
    loss = jnp.mean(jnp.square(better_ratio - worse_ratio - 1.0 / (2.0 * tau)))
    return loss, preference_metrics(better_ratio, worse_ratio)


def simpo_loss(better_logp: jax.Array, worse_logp: jax.Array, better_length: jax.Array, worse_length: jax.Array,
               beta: float, gamma: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mean_b -logσ(β·ℓ_w/|y_w| - β·ℓ_l/|y_l| - γ) (Meng et al. 2024, Eq. 6). ℓ summed over the
    response tokens, |y| their number ([B] each; an empty response counts as length 1). Metrics on the
    rewards β·ℓ/|y|. -> (loss, metrics)."""
    better_reward = beta * better_logp / jnp.maximum(better_length, 1)
    worse_reward = beta * worse_logp / jnp.maximum(worse_length, 1)
    loss = jnp.mean(-jax.nn.log_sigmoid(better_reward - worse_reward - gamma))
    return loss, preference_metrics(better_reward, worse_reward)


def kto_loss(logp: jax.Array, mismatched_logp: jax.Array, ref_logp: jax.Array, ref_mismatched_logp: jax.Array,
             desirable: jax.Array, beta: float, desirable_weight: float,
             undesirable_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KTO (Ethayarajh et al. 2024, Eq. 8): mean_b[λ_y - v_b] with r = ℓ - ℓ^ref, the reference point
    z_0 = max(0, mean(ℓ' - ℓ'^ref)) of the mismatched answers (no gradient), and
    v_b = λ_D·σ(β(r_b - z_0)) for a desirable answer, λ_U·σ(β(z_0 - r_b)) for an undesirable one.

    Inputs [B]: ℓ of the answers and of the mismatched answers, then the same under the reference,
    desirable (bool). Metrics: kl = z_0, the mean implicit reward β·r of each class,
    reward_margin (their difference), reward_accuracy (r on the label's side of z_0) and the
    desirable fraction. -> (loss, metrics)."""
    desirable = desirable.astype(bool)
    ratio = logp - ref_logp
    z_0 = jax.lax.stop_gradient(jnp.maximum(jnp.mean(mismatched_logp - ref_mismatched_logp), 0.0))
    weight = jnp.where(desirable, desirable_weight, undesirable_weight)
    value = weight * jax.nn.sigmoid(beta * jnp.where(desirable, ratio - z_0, z_0 - ratio))
    loss = jnp.mean(weight - value)
    reward = beta * ratio
    count = jnp.sum(desirable)
    good = jnp.sum(jnp.where(desirable, reward, 0.0)) / jnp.maximum(count, 1)
    bad = jnp.sum(jnp.where(desirable, 0.0, reward)) / jnp.maximum(desirable.size - count, 1)
    return loss, {
        "kl": z_0,
        "desirable_reward": good,
        "undesirable_reward": bad,
        "reward_margin": good - bad,
        "reward_accuracy": jnp.mean(jnp.where(desirable, ratio > z_0, ratio < z_0).astype(jnp.float32)),
        "desirable_fraction": jnp.mean(desirable.astype(jnp.float32)),
    }


# ---------------------------------------------------------------------------------------------
# Settings (one frozen dataclass per method; the stage fills each field from config.dpo.<field>)


def _check_positive(owner: Any, *names: str) -> None:
    for name in names:
        if not getattr(owner, name) > 0:
            raise ValueError(f"config.dpo.{name} is {getattr(owner, name)!r}: expected > 0")


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1  # β: upstream dpo.sh --scale_coeff 0.1

    def __post_init__(self):
        _check_positive(self, "beta")


@dataclasses.dataclass(frozen=True)
class SafeDPOSettings(DPOSettings):
    safety_margin: float = 2.0  # Δ: extra margin of a safe preferred answer over an unsafe one


@dataclasses.dataclass(frozen=True)
class CDPOSettings(DPOSettings):
    reward_model_path: str = ""  # score-model dir (reward stage export)
    cost_model_path: str = ""  # score-model dir (cost stage export)
    normalize_reward: bool = False  # apply the reward model's stored mean/var
    normalize_cost: bool = False  # apply the cost model's stored var (sign kept)
    threshold: float = 0.0  # the constraint J_C <= threshold
    lambda_init: float = 1.0
    lambda_lr: float = 0.05  # one log-space step per micro-batch
    lambda_max: float = 5.0  # <= 0: no cap
    episode_cost_window_size: int = 16  # batches of policy-cost estimates averaged into J_C


@dataclasses.dataclass(frozen=True)
class IPOSettings:
    tau: float = 0.1  # τ of Eq. 17: the log-ratio margin h is regressed to 1/(2τ)

    def __post_init__(self):
        _check_positive(self, "tau")


@dataclasses.dataclass(frozen=True)
class SimPOSettings:
    beta: float = 2.0  # β: the paper uses 2.0-2.5 (much larger than DPO's)
    gamma: float = 1.0  # γ: target reward margin (upstream recommends γ/β = 0.5)

    def __post_init__(self):
        _check_positive(self, "beta")


@dataclasses.dataclass(frozen=True)
class KTOSettings:
    beta: float = 0.1
    desirable_weight: float = 1.0  # λ_D
    undesirable_weight: float = 1.0  # λ_U: the paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3]

    def __post_init__(self):
        _check_positive(self, "beta", "desirable_weight", "undesirable_weight")


# ---------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass(frozen=True)
class LossInputs:
    """What the builder hands a method's loss: per side (in `Method.sides` order) [B] arrays."""

    logp: tuple[jax.Array, ...]  # ℓ of the policy
    ref_logp: tuple[jax.Array, ...] | None  # ℓ of the frozen reference (None without one)
    length: tuple[jax.Array, ...]  # tokens in the window
    scores: dict[str, tuple[jax.Array, ...]]  # end scores of the frozen score models ("reward", "cost")
    batch: dict  # the batch (signs, labels, ...)
    extra: dict  # TrainState.extra (C-DPO: {"lagrange": LagrangeState})


def safe_dpo_examples(rows, *, template: views.Template = views.PROMPT_TEMPLATE) -> views.Examples:
    """SafeDPO pairs of dual-preference rows after the safety-aware transform (arXiv:2505.20065 §4):
    preferred = the helpfulness-better answer, unless it is unsafe and the other safe (then the
    other); as safety_preference examples (safer = preferred, signs +1 safe / -1 unsafe).
    Identical answers are skipped; `.counts` has kept, swapped and per-safety-pattern counts."""
    out = views.Examples("safety_preference", counts=Counter())
    needed = ("prompt", "response_0", "response_1", "better_response_id", "is_response_0_safe", "is_response_1_safe")
    for index, row in enumerate(rows):
        for name in needed:
            if name not in row:
                raise KeyError(f"safe_dpo_examples: row {index} has no field {name!r}; SafeDPO needs the "
                               f"dual-preference release (fields {list(needed)})")
        b = row["better_response_id"]
        safe = (bool(row[f"is_response_{b}_safe"]), bool(row[f"is_response_{1 - b}_safe"]))
        if row[f"response_{b}"] == row[f"response_{1 - b}"]:
            out.counts["skipped_identical"] += 1
            continue
        first = 1 - b if (not safe[0] and safe[1]) else b
        out.counts["swapped"] += int(first != b)
        out.counts[{(True, True): "both_safe", (False, False): "both_unsafe"}.get(safe, "one_safe")] += 1
        out.append({
            "prompt": views.format_prompt(row["prompt"], template),
            "safer": row[f"response_{first}"],
            "unsafer": row[f"response_{1 - first}"],
            "safer_sign": 1 if row[f"is_response_{first}_safe"] else -1,
            "unsafer_sign": 1 if row[f"is_response_{1 - first}_safe"] else -1,
        })
    out.counts["kept"] = len(out)
    return out


def _no_extra(settings) -> dict:
    return {}


def _c_dpo_extra(settings: CDPOSettings) -> dict:
    return {"lagrange": lagrange_lib.init_lagrange(float(settings.lambda_init),
                                                   int(settings.episode_cost_window_size))}


def _c_dpo_update(extra: dict, metrics: dict, settings: CDPOSettings) -> tuple[dict, dict]:
    """After each training micro-batch: one dual-ascent step of λ; episode_cost = the window mean it used."""
    lambda_max = float(settings.lambda_max) if settings.lambda_max > 0 else None
    lagrange = c_dpo_step(extra["lagrange"], metrics["policy_cost"], float(settings.threshold),
                          float(settings.lambda_lr), lambda_max)
    return dict(extra, lagrange=lagrange), dict(metrics, episode_cost=lagrange_lib.window_mean(lagrange))


def _dpo(x: LossInputs, s: DPOSettings):
    return dpo_loss(*x.logp, *x.ref_logp, s.beta)


def _safe_dpo(x: LossInputs, s: SafeDPOSettings):
    return safe_dpo_loss(*x.logp, *x.ref_logp, x.batch["safer_sign"] < 0, x.batch["unsafer_sign"] < 0, s.beta,
                         s.safety_margin)


def _c_dpo(x: LossInputs, s: CDPOSettings):
    lam = lagrange_lib.lagrange_multiplier(x.extra["lagrange"])
    loss, metrics = c_dpo_loss(*x.logp, *x.ref_logp, *x.scores["reward"], *x.scores["cost"], lam, s.beta)
    return loss, dict(metrics, **{"lambda": lam})


def _ipo(x: LossInputs, s: IPOSettings):
    return ipo_loss(*x.logp, *x.ref_logp, s.tau)


def _simpo(x: LossInputs, s: SimPOSettings):
    return simpo_loss(*x.logp, *x.length, s.beta, s.gamma)


def _kto(x: LossInputs, s: KTOSettings):
    return kto_loss(*x.logp, *x.ref_logp, x.batch["is_safe"], s.beta, s.desirable_weight, s.undesirable_weight)


@dataclasses.dataclass(frozen=True)
class Method:
    """One pairwise method: what it reads, what it scores with and its loss."""

    batch_kind: str  # data/pipeline.py kind of its batches
    view: Callable[..., Any]  # view(rows, template=...) -> examples of batch_kind (data/views.py)
    sides: tuple[str, ...]  # the batch's sequence prefixes, stacked on the batch axis in this order
    scorers: tuple[str, ...]  # frozen models: "reference" (the initial policy), "reward", "cost"
    window: str  # what ℓ sums over: "divergence" (pairs) | "response" (the *response_mask tokens)
    settings: type  # its frozen settings dataclass (fields = config.dpo keys)
    loss: Callable[[LossInputs, Any], tuple[jax.Array, dict]]
    prepare: Callable[[dict], dict] | None = None  # adds derived sequences to the batch (KTO's mismatched pairs)
    init_extra: Callable[[Any], dict] = _no_extra  # TrainState.extra at step 0
    # training only, after each micro-batch: (extra, metrics, settings) -> (extra, metrics)
    update_extra: Callable[[dict, dict, Any], tuple[dict, dict]] | None = None


METHODS: dict[str, Method] = {
    "dpo": Method("preference", views.preference_examples, ("better", "worse"), ("reference",), "divergence",
                  DPOSettings, _dpo),
    "safe_dpo": Method("safety_preference", safe_dpo_examples, ("safer", "unsafer"), ("reference",), "divergence",
                       SafeDPOSettings, _safe_dpo),
    "c_dpo": Method("preference", views.preference_examples, ("better", "worse"), ("reference", "reward", "cost"),
                    "divergence", CDPOSettings, _c_dpo, init_extra=_c_dpo_extra, update_extra=_c_dpo_update),
    "ipo": Method("preference", views.preference_examples, ("better", "worse"), ("reference",), "divergence",
                  IPOSettings, _ipo),
    "simpo": Method("preference", views.preference_examples, ("better", "worse"), (), "response", SimPOSettings,
                    _simpo),
    "kto": Method("qa", views.qa_examples, (ANSWER, "mismatched"), ("reference",), "response", KTOSettings, _kto,
                  prepare=mismatched_answers),
}


def method(name: str) -> Method:
    """The table entry of `name` (config.stage)."""
    if name not in METHODS:
        raise ValueError(f"config.stage: unknown pairwise method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


# ---------------------------------------------------------------------------------------------
# Building the training / evaluation functions of any entry


def make_metrics_fn(entry: Method, settings, policy: PolicyFn, score_fns: dict[str, ScoreFn] | None = None):
    """metrics_fn(params, batch, extra, frozen) -> (loss, metrics) of one method.

    frozen: {role: params} of entry.scorers; score_fns[role](params, ids, mask) -> per-token scores
    [N, L] for the score roles ("reward", "cost"). One policy forward (and one reference forward)
    over the sides stacked on the batch axis.
    """
    num_sides = len(entry.sides)

    def metrics_fn(params, batch, extra, frozen):
        if entry.prepare is not None:
            batch = entry.prepare(batch)
        ids, mask, window = stack_sides(batch, entry.sides, entry.window)
        logp = tuple(jnp.split(window_log_probs(policy(params, ids, mask), ids, window), num_sides))
        ref_logp = None
        if "reference" in entry.scorers:
            ref_logits = jax.lax.stop_gradient(policy(frozen["reference"], ids, mask))
            ref_logp = tuple(jnp.split(window_log_probs(ref_logits, ids, window), num_sides))
        scores = {role: tuple(jnp.split(last_token_scores(score_fns[role](frozen[role], ids, mask), mask), num_sides))
                  for role in entry.scorers if role != "reference"}
        length = tuple(jnp.split(jnp.sum(window[:, 1:], axis=-1), num_sides))
        return entry.loss(LossInputs(logp, ref_logp, length, scores, batch, extra), settings)

    return metrics_fn


def make_eval_metrics_fn(entry: Method, settings, policy: PolicyFn, score_fns: dict[str, ScoreFn] | None = None):
    """For loop.make_eval_fn: (params, batch, extra, frozen) -> {"loss": ..., **metrics}."""
    metrics_fn = make_metrics_fn(entry, settings, policy, score_fns)

    def eval_metrics(params, batch, extra, frozen):
        loss, metrics = metrics_fn(params, batch, extra, frozen)
        return dict(metrics, loss=loss)

    return eval_metrics


def make_loss_fn(entry: Method, settings, policy: PolicyFn, score_fns: dict[str, ScoreFn] | None = None):
    """loss_fn(params, batch, rng, extra, frozen) -> (loss, (metrics, extra)) for `loop.train`;
    entry.update_extra runs after each micro-batch (C-DPO's λ step)."""
    metrics_fn = make_metrics_fn(entry, settings, policy, score_fns)

    def loss_fn(params, batch, rng, extra, frozen):
        del rng  # no dropout
        loss, metrics = metrics_fn(params, batch, extra, frozen)
        if entry.update_extra is not None:
            extra, metrics = entry.update_extra(extra, metrics, settings)
        return loss, (metrics, extra)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# The models a method runs with


def policy_fn(cfg) -> PolicyFn:
    """PolicyFn of a causal LM of any family: (params, ids, mask) -> logits [N, L, V] fp32."""
    module = models.causal_lm(cfg)
    return lambda params, ids, mask: module.apply({"params": params}, ids, attention_mask=mask).logits


def score_fn(module, stats: dict | None = None, score_type: str = "reward") -> ScoreFn:
    """ScoreFn of a ScoreModel `module` (first score dimension), normalized by `score_type` with
    `stats` ({"mean", "var"}) when given: (params, ids, mask) -> per-token scores [N, L] fp32."""

    def apply(params, ids, mask):
        scores = module.apply({"params": params}, ids, attention_mask=mask).scores
        if stats is not None:
            scores = score.normalize(scores, stats, score_type)
        return scores[..., 0]

    return apply


@dataclasses.dataclass
class Frozen:
    """The frozen models of a method on the mesh: params and shardings by role, ScoreFns of the score roles."""

    params: dict
    shardings: dict
    score_fns: dict


def load_frozen(entry: Method, settings, model: loading.ModelSettings, mesh, rules, *, vocab_size: int,
                special: dict | None, rng: jax.Array) -> Frozen:
    """entry.scorers on the mesh: "reference" is the policy of model.init_path (a separate copy: the
    trained policy is donated); "reward" / "cost" the score models at settings.<role>_model_path,
    normalized when settings.normalize_<role>."""
    for role in entry.scorers:  # every path is checked before anything loads
        if role != "reference" and not getattr(settings, f"{role}_model_path", ""):
            raise ValueError(f"config.dpo.{role}_model_path is empty: the method scores with "
                             f"{', '.join(entry.scorers)}; set it to a {role} stage export")
    frozen = Frozen({}, {}, {})
    for role in entry.scorers:
        if role == "reference":
            placed = loading.load_policy(model, mesh, rules, vocab_size=vocab_size, special=special, rng=rng)
        else:
            path = getattr(settings, f"{role}_model_path")
            placed = loading.load_score_model(path, mesh, rules, model, score_type=role, min_vocab_size=vocab_size)
            stats = placed.stats if getattr(settings, f"normalize_{role}") else None
            frozen.score_fns[role] = score_fn(placed.module, stats, placed.head.score_type)
            log.info("%s model: %s", role, path)
        frozen.params[role], frozen.shardings[role] = placed.params, placed.shardings
    return frozen
