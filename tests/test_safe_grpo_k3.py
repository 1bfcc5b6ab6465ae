"""Safe GRPO with the KL in the loss (rl/algorithms/safe_grpo_k3.py): DeepSeekMath's eq. 3-4 loss and its
gradient against a numpy loop, the reference's log-probs kept in the Experience, advantages from the
raw (not KL-shaped) scores."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.rl import algorithms, steps
from jaxalign.rl.algorithms.safe_grpo_k3 import grpo_kl_loss
from jaxalign.rl.rollout import score_experience
from test_rl import bigram_fns, bigram_params, make_settings, sampled_batch
from test_safe_grpo import numpy_group_normalize


def numpy_grpo_kl(log_probs, old, ref, advantages, mask, eps, beta):
    """-J of DeepSeekMath (arXiv:2402.03300) eq. 3 with eq. 4's k3 KL, token by token in float64, and
    its gradient w.r.t. each log-prob. -> (loss, grad [B,R])."""
    b = len(log_probs)
    total, grad = 0.0, np.zeros(log_probs.shape)
    for i in range(b):
        tokens = np.flatnonzero(mask[i])
        for t in tokens:
            rho = np.exp(np.float64(log_probs[i, t]) - old[i, t])
            a = np.float64(advantages[i, t])
            r = np.exp(np.float64(ref[i, t]) - log_probs[i, t])  # π_ref / π_θ
            term = min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a) - beta * (r - np.log(r) - 1)
            total += term / len(tokens)
            d_clip = -a * rho if rho * a <= min(max(rho, 1 - eps), 1 + eps) * a else 0.0
            grad[i, t] = (d_clip + beta * (1 - r)) / len(tokens) / b
    return -total / b, grad


def test_loss_and_gradient_against_numpy():
    rng = np.random.default_rng(0)
    b, r = 6, 5
    mask = np.arange(r)[None, :] < rng.integers(1, r + 1, size=b)[:, None]
    old = rng.normal(-2.0, 0.5, size=(b, r)).astype(np.float32)
    new = (old + rng.normal(0, 0.3, size=(b, r))).astype(np.float32)  # ratios on both sides of the clip
    ref = (old + rng.normal(0, 0.5, size=(b, r))).astype(np.float32)
    advantages = rng.normal(size=(b, r)).astype(np.float32)
    args = tuple(jnp.asarray(x) for x in (old, ref, advantages, mask))
    loss, grad = jax.value_and_grad(lambda lp: grpo_kl_loss(lp, *args, 0.2, 0.04))(jnp.asarray(new))
    want_loss, want_grad = numpy_grpo_kl(new, old, ref, advantages, mask, 0.2, 0.04)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)
    # the KL term alone: 0 when the policy is the reference, > 0 otherwise
    zero = np.zeros_like(advantages)
    assert float(grpo_kl_loss(jnp.asarray(ref), args[0], args[1], jnp.asarray(zero), args[3], 0.2, 1.0)) == 0.0
    assert float(grpo_kl_loss(jnp.asarray(new), args[0], args[1], jnp.asarray(zero), args[3], 0.2, 1.0)) > 0.0


def test_experience_keeps_the_reference_log_probs_and_advantages_are_not_kl_shaped():
    settings = make_settings(num_return_sequences=4, kl_coeff=0.5, num_minibatches=1, ptx_coeff=0.0)
    algorithm = algorithms.make("safe_grpo_k3", True)
    params = bigram_params(2)
    ids, mask = sampled_batch(2)
    exp, stats = jax.jit(score_experience, static_argnums=(0, 1, 2))(bigram_fns(), algorithm, settings, params,
                                                                     jnp.float32(0.5), ids, mask)
    start = settings.start
    log_softmax = jax.nn.log_softmax(params["reference"]["table"][ids[:, start:-1]], axis=-1)
    want_ref = np.take_along_axis(np.asarray(log_softmax), np.asarray(ids)[:, start + 1:, None], axis=-1)[..., 0]
    response = np.asarray(exp.response_mask)
    np.testing.assert_allclose(np.where(response, exp.ref_log_probs, 0), np.where(response, want_ref, 0), atol=1e-5)
    assert float(stats["kl_divergence"].mean()) > 0.1  # the reference differs: KL-shaping would move the advantages
    for stream in ("reward", "cost"):
        expected = numpy_group_normalize(np.asarray(stats[stream]), 4)
        np.testing.assert_allclose(np.where(response, exp.advantages[stream], 0.0),
                                   np.where(response, expected[:, None], 0.0), atol=1e-5)
    # the train step's loss is the hook's: PPO-clip + β k3 on the policy's own log-probs
    advantages = steps.actor_advantages(algorithm, settings, exp, jnp.float32(1.0))
    log_probs = exp.old_log_probs
    want = grpo_kl_loss(log_probs, exp.old_log_probs, exp.ref_log_probs, advantages, exp.response_mask, 0.2, 0.5)
    got = steps.actor_rl_loss(bigram_fns(), algorithm, settings, params["actor"], exp, advantages)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="safe_grpo_k3 has β = config.rl.kl_coeff in its loss"):
        score_experience(bigram_fns(), algorithm, dataclasses.replace(settings, adaptive_kl=True), params,
                         jnp.float32(0.5), ids, mask)


def test_the_tiny_config_builds_it():
    from jaxalign import config as config_lib

    config = config_lib.load_config("configs/safe_grpo_k3_tiny.py")
    settings = algorithms.settings_from_group(config.stage, config.rl)
    assert (settings.threshold, settings.episode_cost_window_size, config.rl.kl_coeff) == (-5.5, 32, 0.04)
    assert algorithms.make(config.stage, True, settings).critics == ()
