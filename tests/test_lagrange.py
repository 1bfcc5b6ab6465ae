"""The Lagrange multiplier update and the episode-cost window against a plain-python reference."""

import collections
import math

import numpy as np
import pytest

import jax.numpy as jnp

from jaxalign.objectives import lagrange


class ReferenceLagrange:
    """Upstream ppo_lag/trainer.py semantics: a deque window, SGD on log_lambda, cap, delay."""

    def __init__(self, lambda_init, window, threshold, lr, lambda_max, delay):
        self.log_lambda = math.log(lambda_init)
        self.costs = collections.deque(maxlen=window)
        self.threshold, self.lr, self.delay = threshold, lr, delay
        self.max_log = None if lambda_max is None else math.log(lambda_max)

    def step(self, batch_costs, global_step):
        self.costs.extend(batch_costs)
        episode_cost = sum(self.costs) / len(self.costs)
        if global_step >= self.delay:
            grad = -(episode_cost - self.threshold) * math.exp(self.log_lambda)
            self.log_lambda -= self.lr * grad
            if self.max_log is not None:
                self.log_lambda = min(self.log_lambda, self.max_log)
        return episode_cost


@pytest.mark.parametrize("lambda_max,delay,window", [(5.0, 0, 8), (None, 3, 5), (2.0, 2, 32)])
def test_lambda_trajectory_matches_reference(lambda_max, delay, window):
    rng = np.random.default_rng(1)
    ref = ReferenceLagrange(1.0, window, 0.5, 0.1, lambda_max, delay)
    state = lagrange.init_lagrange(1.0, window)
    hit_cap = False
    for step in range(12):
        costs = rng.normal(loc=1.5 if step < 8 else -2.0, size=3)
        expected_cost = ref.step(costs.tolist(), step)
        state = lagrange.push_costs(state, jnp.asarray(costs))
        episode_cost = lagrange.window_mean(state)
        assert float(episode_cost) == pytest.approx(expected_cost, rel=1e-5, abs=1e-6)
        state = lagrange.update_lagrange(state, episode_cost, step, threshold=0.5, lambda_lr=0.1,
                                         lambda_max=lambda_max, delay_steps=delay)
        assert float(state.log_lambda) == pytest.approx(ref.log_lambda, rel=1e-5, abs=1e-6)
        if step < delay:
            assert float(state.log_lambda) == 0.0
        if lambda_max is not None and ref.log_lambda == math.log(lambda_max):
            hit_cap = True
    if lambda_max is not None:
        assert hit_cap and float(lagrange.lagrange_multiplier(state)) <= lambda_max + 1e-5


def test_window_keeps_only_the_newest_costs():
    state = lagrange.init_lagrange(1.0, 4)
    assert float(lagrange.window_mean(state)) == 0.0
    state = lagrange.push_costs(state, jnp.asarray([1.0, 2.0, 3.0]))
    assert float(lagrange.window_mean(state)) == pytest.approx(2.0)
    state = lagrange.push_costs(state, jnp.asarray([10.0, 20.0]))  # window now 2, 3, 10, 20
    assert float(lagrange.window_mean(state)) == pytest.approx(35.0 / 4)
    state = lagrange.push_costs(state, jnp.arange(7.0))  # larger than the window: last 4 = 3..6
    assert float(lagrange.window_mean(state)) == pytest.approx(4.5)
    assert int(state.window_count) == 4


def test_lambda_direction_and_process_mean():
    state = lagrange.init_lagrange(2.0, 4)
    up = lagrange.update_lagrange(state, 1.0, 0, threshold=0.0, lambda_lr=0.1, lambda_max=None, delay_steps=0)
    down = lagrange.update_lagrange(state, -1.0, 0, threshold=0.0, lambda_lr=0.1, lambda_max=None, delay_steps=0)
    assert float(up.log_lambda) == pytest.approx(math.log(2.0) + 0.1 * 1.0 * 2.0)
    assert float(down.log_lambda) == pytest.approx(math.log(2.0) - 0.1 * 1.0 * 2.0)
    assert lagrange.cross_process_mean(3.5) == pytest.approx(3.5)
    with pytest.raises(ValueError):
        lagrange.init_lagrange(0.0, 4)
