"""PPO objectives against independent numpy computations written with explicit loops."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxalign.objectives import ppo

RNG = np.random.default_rng(0)


def _reference_gae(rewards, values, mask, start, gamma=1.0, lam=0.95):
    """Upstream get_advantages_and_returns, loop by loop."""
    batch, length = rewards.shape
    rewards = rewards * mask
    values = values * mask
    advantages = np.zeros((batch, length - start))
    for b in range(batch):
        last = 0.0
        for t in reversed(range(start, length)):
            next_value = values[b, t + 1] if t < length - 1 else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            advantages[b, t - start] = last
    return advantages, advantages + values[:, start:]


def _response_mask(batch, length, start):
    mask = np.zeros((batch, length), bool)
    for b in range(batch):
        end = RNG.integers(start, length)
        mask[b, : end + 1] = True  # prompt (and its left pad, here unmasked) + response up to end
    return mask


def test_gae_matches_loop():
    batch, length, start = 4, 12, 3
    rewards = RNG.normal(size=(batch, length))
    values = RNG.normal(size=(batch, length))
    mask = _response_mask(batch, length, start)
    advantages, returns = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), start)
    ref_adv, ref_ret = _reference_gae(rewards, values, mask, start)
    np.testing.assert_allclose(advantages, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, ref_ret, rtol=1e-5, atol=1e-5)
    # Slots past the end have zero advantage and zero return.
    for b in range(batch):
        assert np.all(np.asarray(advantages)[b][~mask[b, start:]] == 0.0)


def test_gae_other_gamma_lambda_and_no_gradient():
    batch, length, start = 2, 7, 0
    rewards = RNG.normal(size=(batch, length))
    values = RNG.normal(size=(batch, length))
    mask = np.ones((batch, length), bool)
    advantages, _ = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), start,
                            gamma=0.9, lam=0.5)
    ref_adv, _ = _reference_gae(rewards, values, mask, start, gamma=0.9, lam=0.5)
    np.testing.assert_allclose(advantages, ref_adv, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda v: ppo.gae(jnp.asarray(rewards), v, jnp.asarray(mask), start)[0].sum())(
        jnp.asarray(values))
    assert np.all(np.asarray(grad) == 0.0)


def _reference_shaping(end_scores, kl, end_index, coeff, clip, sign):
    out = np.zeros_like(kl)
    for b in range(kl.shape[0]):
        for t in range(kl.shape[1]):
            value = sign * coeff * kl[b, t]
            if t == end_index[b]:
                value += end_scores[b]
            out[b, t] = min(max(value, -clip), clip)
    return out


def test_kl_shaping_and_score_clipping():
    batch, length = 3, 6
    kl = RNG.normal(size=(batch, length))
    end_scores = np.array([2.0, 80.0, -70.0])  # two of them get clipped at +-50
    end_index = np.array([5, 2, 0])
    rewards = ppo.kl_shaped_rewards(jnp.asarray(end_scores), jnp.asarray(kl), jnp.asarray(end_index), 0.1, 50.0)
    costs = ppo.kl_shaped_costs(jnp.asarray(end_scores), jnp.asarray(kl), jnp.asarray(end_index), 0.1, 50.0)
    np.testing.assert_allclose(rewards, _reference_shaping(end_scores, kl, end_index, 0.1, 50.0, -1), rtol=1e-6)
    np.testing.assert_allclose(costs, _reference_shaping(end_scores, kl, end_index, 0.1, 50.0, +1), rtol=1e-6)
    assert float(rewards[1, 2]) == 50.0 and float(costs[2, 0]) == -50.0


def _masked_mean_loop(x, mask):
    per_sequence = []
    for b in range(x.shape[0]):
        total, count = 0.0, 0
        for t in range(x.shape[1]):
            if mask[b, t]:
                total += x[b, t]
                count += 1
        per_sequence.append(total / max(count, 1))
    return np.mean(per_sequence)


def test_actor_loss_clipping():
    batch, length, eps = 3, 5, 0.2
    old = RNG.normal(size=(batch, length))
    new = old + RNG.normal(scale=0.5, size=(batch, length))  # many ratios outside [0.8, 1.2]
    adv = RNG.normal(size=(batch, length))
    mask = RNG.random((batch, length)) > 0.3
    expected = np.zeros((batch, length))
    for b in range(batch):
        for t in range(length):
            ratio = np.exp(new[b, t] - old[b, t])
            clipped_ratio = min(max(ratio, 1 - eps), 1 + eps)
            expected[b, t] = min(adv[b, t] * ratio, adv[b, t] * clipped_ratio)
    loss = ppo.actor_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), eps)
    np.testing.assert_allclose(loss, -_masked_mean_loop(expected, mask), rtol=1e-5)
    # Clipped tokens carry no gradient: with A > 0 and rho > 1 + eps the gradient is zero.
    g = jax.grad(lambda lp: ppo.actor_loss(lp, jnp.zeros(1), jnp.ones(1)[None], jnp.ones((1, 1), bool), eps))(
        jnp.full((1, 1), 0.5))
    assert float(g[0, 0]) == 0.0


def test_critic_loss_clipping():
    batch, length, c = 3, 5, 0.5
    old = RNG.normal(size=(batch, length))
    new = old + RNG.normal(scale=1.0, size=(batch, length))
    returns = RNG.normal(size=(batch, length))
    mask = RNG.random((batch, length)) > 0.3
    expected = np.zeros((batch, length))
    for b in range(batch):
        for t in range(length):
            clipped = min(max(new[b, t], old[b, t] - c), old[b, t] + c)
            expected[b, t] = max((new[b, t] - returns[b, t]) ** 2, (clipped - returns[b, t]) ** 2)
    loss = ppo.critic_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(returns), jnp.asarray(mask), c)
    np.testing.assert_allclose(loss, 0.5 * _masked_mean_loop(expected, mask), rtol=1e-5)


def test_combined_advantage_stops_lambda_gradient():
    a_r, a_c = jnp.asarray([[1.0, 2.0]]), jnp.asarray([[3.0, -1.0]])
    np.testing.assert_allclose(ppo.combined_advantages(a_r, a_c, jnp.asarray(2.0)), [[(1 - 6) / 3, (2 + 2) / 3]],
                               rtol=1e-6)
    grad = jax.grad(lambda lam: ppo.combined_advantages(a_r, a_c, lam).sum())(jnp.asarray(2.0))
    assert float(grad) == 0.0


def test_whiten_and_adaptive_kl():
    x = RNG.normal(loc=3.0, scale=2.0, size=(4, 6))
    mask = RNG.random((4, 6)) > 0.2
    white = np.asarray(ppo.whiten(jnp.asarray(x), jnp.asarray(mask)))
    assert abs(white[mask].mean()) < 1e-5 and abs(white[mask].std() - 1.0) < 1e-3
    assert np.all(white[~mask] == 0.0)
    # KL above target raises beta by at most 20% * n / horizon; below target lowers it.
    assert float(ppo.adaptive_kl_coeff(0.1, 10.0, 1.0, 100.0, 50)) == pytest.approx(0.1 * (1 + 0.2 * 0.5))
    assert float(ppo.adaptive_kl_coeff(0.1, 0.9, 1.0, 100.0, 50)) == pytest.approx(0.1 * (1 - 0.1 * 0.5))
