"""Moderation as the RL constraint: PPO-Lagrangian whose cost is a moderation model's
P(unsafe) (per token from its streaming head: against a numpy GAE, and the credit it gives), and the
vector Lagrange update of several constraints against a numpy loop."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

import conftest

from jaxalign import cli
from jaxalign.models import moderation as mm
from jaxalign.train import metrics as metrics_lib


def test_ppo_lag_with_a_moderation_cost(tmp_path):
    """`jaxalign train --config configs/ppo_lag_moderation_tiny.py`: the cost model is a moderation export
    read per token (config.rl.ppo_lag.cost_per_token: each token costs the change of the streaming P(unsafe) it
    caused), the episode cost lambda compares with the 0.05 threshold is P(unsafe) of the answer in
    [0, 1], the cost critic is the moderation backbone + a fresh head."""
    tok, cfg, params = conftest.tiny_rl_inputs(tmp_path, rows=150, policy_dir="sft", score_kinds=("reward",))
    head = mm.ModerationHead()
    moderation = mm.init_params_from_backbone(params["model"], cfg, jax.random.PRNGKey(2), head)
    moderation["unsafe_head"]["kernel"] = 20 * moderation["unsafe_head"]["kernel"]  # costs spread over (0, 1)
    mm.save_moderation_model(tmp_path / "moderation", cfg, moderation, head)
    workdir = tmp_path / "run"
    argv = ["train", "--config", "configs/ppo_lag_moderation_tiny.py", "--workdir", str(workdir),
            f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
            f"--config.rl.reward_model_path={tmp_path / 'reward'}",
            f"--config.rl.cost_model_path={tmp_path / 'moderation'}", "--config.rl.prompt_length=40",
            "--config.rl.max_new_tokens=8", "--config.data.batch_size=8", "--config.train.num_steps=2",
            "--config.checkpoint.save_every=1"]
    assert cli.main(argv) == 0
    records = metrics_lib.read_metrics(workdir)
    assert [m["step"] for m in records] == [1, 2]
    for record in records:
        assert 0.0 < record["cost"] < 1.0 and 0.0 < record["episode_cost"] < 1.0
        assert np.isfinite(record["cost_critic_loss"]) and np.isfinite(record["lambda"])
    # P(unsafe) of the batch is far above the 5% threshold: lambda grows from lambda_init = 1
    assert records[-1]["lambda"] > 1.0
    saved = json.loads((workdir / "config.json").read_text())["rl"]
    assert saved["cost_model_path"].endswith("moderation") and saved["ppo_lag"]["cost_per_token"] is True
    assert saved["ppo_lag"]["threshold"] == 0.05


def _settings():
    from jaxalign import config as config_lib
    from jaxalign.rl.settings import RLSettings

    return RLSettings.from_group(config_lib.load_config("configs/ppo_lag_tiny.py").rl)


def test_vector_lambda_update_against_a_numpy_loop():
    """Two constraints with their own thresholds, windows and rates: P(severity 3) <= 1% holds (its
    lambda decays), P(unsafe) <= 5% binds (its lambda grows); every step against a numpy loop."""
    from jaxalign.rl.algorithms.multi_lag import Constraint, MultiLagrangian, MultiLagSettings

    constraints = (Constraint("severity3", threshold=0.01, lambda_init=0.5, lambda_lr=0.5, window_size=6),
                   Constraint("unsafe", threshold=0.05, lambda_init=1.0, lambda_lr=0.2, window_size=10))
    algorithm = MultiLagrangian(constraints=constraints, settings=MultiLagSettings(lambda_max=3.0))
    assert algorithm.roles == ("actor", "reference", "reward", "severity3", "unsafe", "reward_critic",
                               "severity3_critic", "unsafe_critic")
    settings = _settings()
    state = algorithm.init_state(settings)
    rng = np.random.default_rng(0)
    windows = {c.name: [] for c in constraints}
    log_lambda = {c.name: math.log(c.lambda_init) for c in constraints}
    for step in range(12):
        batch = {"severity3": rng.uniform(0, 0.01, 4), "unsafe": rng.uniform(0.1, 0.3, 4)}
        state = algorithm.observe(settings, state, batch)
        state, metrics = algorithm.before_update(settings, state, step)
        for c in constraints:
            windows[c.name] = (windows[c.name] + list(batch[c.name]))[-c.window_size:]
            j = float(np.mean(windows[c.name]))
            log_lambda[c.name] += c.lambda_lr * (j - c.threshold) * math.exp(log_lambda[c.name])
            log_lambda[c.name] = min(log_lambda[c.name], math.log(3.0))
            assert metrics[f"episode_cost/{c.name}"] == pytest.approx(j, abs=1e-6)
        np.testing.assert_allclose(algorithm.multiplier(settings, state),
                                   [math.exp(log_lambda[c.name]) for c in constraints], rtol=1e-5)
    lam = np.asarray(algorithm.multiplier(settings, state))
    assert lam[0] < 0.5 and lam[1] > 1.0  # severity-3 holds, the looser unsafe constraint binds


def test_combined_advantage_against_a_numpy_loop():
    from jaxalign.rl.algorithms.multi_lag import Constraint, MultiLagrangian

    algorithm = MultiLagrangian(constraints=(Constraint("a", 0.1), Constraint("b", 0.2), Constraint("c", 0.3)))
    rng = np.random.default_rng(1)
    advantages = {name: rng.normal(size=(2, 5)).astype(np.float32) for name in ("reward", "a", "b", "c")}
    lambdas = np.array([0.5, 2.0, 0.1], np.float32)
    got = np.asarray(algorithm.actor_advantages(_settings(), advantages, lambdas))
    for b in range(2):
        for t in range(5):
            numerator = advantages["reward"][b, t] - sum(lam * advantages[n][b, t] for lam, n in zip(lambdas, "abc"))
            assert got[b, t] == pytest.approx(numerator / (1 + lambdas.sum()), abs=1e-5)
    with pytest.raises(ValueError, match="distinct names"):
        MultiLagrangian(constraints=(Constraint("a", 0.1), Constraint("a", 0.2)))


def test_multi_lag_from_jaxalign_train(tmp_path):
    """`jaxalign train` with stage multi_lag and two constraints read from one moderation model:
    P(severity 3) ~ 0 holds its 1% bound (its lambda decays), P(unsafe) ~ 0.5 breaks its 5% bound
    (its lambda grows); "lambda" is their sum, each constraint has its own critic. A third constraint on
    "cost" with config.rl.cost_signal=severity3 reads the same P(severity 3) from the cost role."""
    tok, cfg, params = conftest.tiny_rl_inputs(tmp_path, rows=150, policy_dir="sft", score_kinds=("reward",))
    head = mm.ModerationHead()
    moderation = mm.init_params_from_backbone(params["model"], cfg, jax.random.PRNGKey(2), head)
    moderation["unsafe_head"]["kernel"] = 20 * moderation["unsafe_head"]["kernel"]  # P(unsafe) spread over (0, 1)
    moderation["severity_head"]["bias"] = moderation["severity_head"]["bias"].at[-1].set(-30.0)  # P(severity 3) ~ 0
    mm.save_moderation_model(tmp_path / "moderation", cfg, moderation, head)
    workdir = tmp_path / "run"
    argv = ["train", "--config", "configs/multi_lag_tiny.py", "--workdir", str(workdir),
            f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
            f"--config.rl.reward_model_path={tmp_path / 'reward'}",
            f"--config.rl.cost_model_path={tmp_path / 'moderation'}",
            "--config.rl.multi_lag.constraints=severity3<=0.01;lambda_lr=2.0;window_size=8,unsafe<=0.05;lambda_init=1.0,"
            "cost<=0.5", "--config.rl.cost_signal=severity3",
            "--config.rl.prompt_length=40", "--config.rl.max_new_tokens=8", "--config.data.batch_size=8",
            "--config.rl.ptx_coeff=0", "--config.train.num_steps=3", "--config.checkpoint.save_every=3"]
    assert cli.main(argv) == 0
    records = metrics_lib.read_metrics(workdir)
    assert [m["step"] for m in records] == [1, 2, 3]
    for record in records:
        assert record["episode_cost/severity3"] < 0.01 < 0.05 < record["episode_cost/unsafe"] < 1.0
        assert np.isfinite(record["severity3_critic_loss"]) and np.isfinite(record["unsafe_critic_loss"])
        assert record["episode_cost/cost"] == pytest.approx(record["episode_cost/severity3"], rel=1e-4, abs=1e-9)
        assert record["lambda"] == pytest.approx(
            record["lambda/severity3"] + record["lambda/unsafe"] + record["lambda/cost"], rel=1e-5)
        assert record["lambda/cost"] < 0.5  # P(severity 3) <= 0.5 holds
    sev3 = [0.5] + [m["lambda/severity3"] for m in records]  # from rl.multi_lag.lambda_init = 0.5 (multi_lag_tiny)
    unsafe = [1.0] + [m["lambda/unsafe"] for m in records]  # from its own lambda_init=1.0
    assert all(b < a for a, b in zip(sev3, sev3[1:])), sev3  # the constraint that holds: lambda decays
    assert all(b > a for a, b in zip(unsafe, unsafe[1:])), unsafe  # the binding one: lambda grows


def test_multi_lag_constraint_specs(tmp_path):
    """config.rl.multi_lag.constraints: parsed with per-constraint overrides (defaults: the group's
    lambda_init, lambda_lr, window); a bad spec is one error naming the field; moderation signals need
    a moderation export as the cost model."""
    from jaxalign import config as config_lib
    from jaxalign.rl import algorithms, roles
    from jaxalign.rl.algorithms.multi_lag import parse_constraints

    config = config_lib.load_config("configs/multi_lag_tiny.py", [])
    settings = algorithms.settings_from_group("multi_lag", config.rl)
    algorithm = algorithms.make("multi_lag", True, settings)
    assert algorithm.moderation_signals == (("severity3", "severity3"), ("unsafe", "unsafe"))
    with pytest.raises(ValueError, match=r"config.rl.multi_lag.constraints: severity3, unsafe read a moderation model"):
        roles.RolePaths(cost="", constraints=algorithm.moderation_signals).check(where="config.rl.multi_lag")
    with pytest.raises(ValueError, match="multi_lag needs a cost model"):
        algorithms.make("multi_lag", False, settings)
    (constraint,) = parse_constraints(dataclasses.replace(settings, constraints="cost<=-3;window_size=8"))
    assert (constraint.name, constraint.threshold, constraint.lambda_init, constraint.window_size) == (
        "cost", -3, 0.5, 8)
    assert constraint.signal == ""
    (category,) = parse_constraints(dataclasses.replace(settings, constraints="category:3<=0.1"))
    assert (category.name, category.signal) == ("category_3", "category:3")
    for bad, message in [("unsafe<0.1", "bad constraint"), ("unsafe<=0.1;lr=2", "bad constraint"),
                         ("harm<=0.1", "unknown moderation signal 'harm'"), ("category:19<=0.1", "index < 19"),
                         ("cost<=1,cost<=2", "its own name"), ("", "at least one constraint")]:
        with pytest.raises(ValueError, match=f"config.rl.multi_lag.constraints.*{message}"):
            parse_constraints(dataclasses.replace(settings, constraints=bad))


# ---------------------------------------------------------------------------------------------
# The per-token streaming cost (cost_per_token of ppo_lag and multi_lag)

def _np_gae(rewards, values, mask, gamma, lam):
    """Upstream's GAE loop in numpy over masked rewards and values [B,R]. -> (advantages, returns)."""
    rewards, values = rewards * mask, values * mask
    advantages = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        carry = 0.0
        for t in reversed(range(rewards.shape[1])):
            next_value = values[b, t + 1] if t + 1 < rewards.shape[1] else 0.0
            carry = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * carry
            advantages[b, t] = carry
    return advantages, advantages + values


def _np_log_probs(table, ids, start):
    """log softmax(table[ids[:, p]])[ids[:, p + 1]] for the slots p >= start. -> [B,R]."""
    logits = table[ids[:, start:-1]]
    logits = logits - logits.max(-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(log_softmax, ids[:, start + 1:, None], axis=-1)[..., 0]


def test_per_token_cost_stream_against_numpy_gae():
    """score_experience with cost_per_token on exact per-token functions of the tokens (a policy
    table, a prefix cost s = sigmoid(c[token]) that jumps up and down, table critics): every cost stream of
    ppo_lag and multi_lag is +beta*KL + (s_t - s at the previous real slot) at each real response slot,
    GAE'd against its critic exactly as a numpy loop; the costs sum to the end score; the reward stream
    stays end-scored."""
    import dataclasses

    import jax.numpy as jnp

    from jaxalign.rl import algorithms, roles
    from jaxalign.rl.algorithms.multi_lag import Constraint, MultiLagrangian, MultiLagSettings
    from jaxalign.rl.algorithms.ppo_lag import PPOLagSettings
    from jaxalign.rl.rollout import score_experience

    vocab, prompt, new, eos = 12, 4, 6, 2
    settings = dataclasses.replace(_settings(), prompt_length=prompt, max_new_tokens=new, kl_coeff=0.1, gamma=0.9,
                                   gae_lambda=0.8)
    rng = np.random.default_rng(3)
    tables = {name: rng.normal(size=(vocab, vocab)).astype(np.float32) for name in ("actor", "reference")}
    weights = {name: rng.normal(size=vocab).astype(np.float32) for name in ("reward", "cost", "value")}
    ids = rng.integers(3, vocab, size=(3, prompt + new))
    mask = np.ones_like(ids, bool)
    mask[0, 0] = False  # left padding
    ids[0, prompt + 3], mask[0, prompt + 4:] = eos, False  # EOS at response token 3, then pad
    mask[1, prompt + 2] = False  # a <pad>/<unk> masked mid-response: neither attended nor scored
    ids[2, -1] = eos  # the longest answer
    table_fn = lambda params, i, m: params[i]  # noqa: E731  (logits [B,L,V] or scores [B,L] of the tokens)
    cost_fn = lambda params, i, m: jax.nn.sigmoid(params[i])  # noqa: E731
    policy_fn = lambda params, i, m, logits_from=0: params[i[:, logits_from:]]  # noqa: E731
    fns = roles.RoleFns(policy=policy_fn, generate=None,
                        scores={"reward": table_fn, "cost": cost_fn, "unsafe": cost_fn, "reward_critic": table_fn,
                                "cost_critic": table_fn, "unsafe_critic": table_fn})
    params = {"actor": tables["actor"], "reference": tables["reference"], "reward": weights["reward"],
              "cost": weights["cost"], "unsafe": weights["cost"], "reward_critic": weights["value"],
              "cost_critic": weights["value"], "unsafe_critic": weights["value"]}
    start = prompt - 1

    kl = _np_log_probs(tables["actor"], ids, start) - _np_log_probs(tables["reference"], ids, start)
    response_mask = mask[:, start + 1:].astype(np.float32)
    values = weights["value"][ids[:, start:-1]]
    prefix = 1 / (1 + np.exp(-weights["cost"][ids[:, start + 1:]]))  # s after each response token
    costs = np.zeros_like(prefix)
    for b in range(len(ids)):
        previous = 0.0
        for t in np.flatnonzero(response_mask[b]):
            costs[b, t], previous = prefix[b, t] - previous, prefix[b, t]
    end = np.array([np.flatnonzero(row)[-1] for row in response_mask])
    end_cost = prefix[np.arange(len(ids)), end]
    want_cost = _np_gae(0.1 * kl + costs, values, response_mask, 0.9, 0.8)
    end_reward = weights["reward"][ids[np.arange(len(ids)), start + 1 + end]]
    reward_stream = -0.1 * kl + np.where(np.arange(new)[None, :] == end[:, None], end_reward[:, None], 0.0)
    want_reward = _np_gae(reward_stream, values, response_mask, 0.9, 0.8)

    multi = MultiLagrangian(constraints=(Constraint("unsafe", 0.05),), settings=MultiLagSettings(cost_per_token=True))
    per_token_lag = algorithms.make("ppo_lag", has_cost_model=True, settings=PPOLagSettings(cost_per_token=True))
    for algorithm, stream in ((per_token_lag, "cost"), (multi, "unsafe")):
        assert algorithm.token_streams(settings) == (stream,)
        exp, stats = score_experience(fns, algorithm, settings, params, jnp.asarray(0.1), jnp.asarray(ids),
                                      jnp.asarray(mask))
        np.testing.assert_allclose(stats[stream], end_cost, rtol=1e-5)  # the episode cost: the end score
        np.testing.assert_allclose(costs.sum(-1), end_cost, rtol=1e-5)  # ... which the per-token costs sum to
        np.testing.assert_allclose(stats[f"{stream}_with_kl_penalty"], (0.1 * kl * response_mask + costs).sum(-1),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(exp.advantages[stream], want_cost[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(exp.returns[stream], want_cost[1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(exp.advantages["reward"], want_reward[0], rtol=1e-4, atol=1e-5)
    end_mode = dataclasses.replace(multi, settings=MultiLagSettings(cost_per_token=False))
    assert end_mode.token_streams(settings) == () and algorithms.make("safe_grpo", True).token_streams(settings) == ()


def test_first_unsafe_token_gets_the_largest_cost_advantage():
    """A hand-built answer whose streaming P(unsafe | prefix) jumps at its 3rd token (0.02 -> 0.9), with a
    fresh critic (values 0) and upstream's GAE (gamma 1, lambda 0.95): per token, that token gets the
    largest cost advantage and so the most negative actor advantage (A_R - lambda A_C) / (1 + lambda);
    scored at the end, the blame lands on the last token instead (until the critic has learned where the
    answer turned)."""
    import dataclasses

    import jax.numpy as jnp

    from jaxalign.rl import algorithms
    from jaxalign.rl.algorithms.ppo_lag import PPOLagSettings

    algorithm = algorithms.make("ppo_lag", has_cost_model=True, settings=PPOLagSettings(cost_per_token=True))
    settings = _settings()
    prefix = jnp.asarray([[0.02, 0.02, 0.9, 0.92, 0.95, 0.95]])
    zeros, mask = jnp.zeros((1, 6)), jnp.ones((1, 6), bool)
    args = (settings, "cost", prefix[:, -1], zeros, jnp.asarray([5]), jnp.asarray(0.0), zeros, mask)
    _, per_token, _ = algorithm.stream_advantages(*args, token_scores=prefix)
    _, at_end, _ = algorithm.stream_advantages(*args)
    actor = algorithm.actor_advantages(settings, {"reward": zeros, "cost": per_token}, jnp.asarray(1.0))
    assert int(jnp.argmax(per_token[0])) == 2 and int(jnp.argmin(actor[0])) == 2
    assert float(per_token[0, 2]) > 0.7 and float(per_token[0, 5]) < 0.01  # nothing new happens after token 2
    assert int(jnp.argmax(at_end[0])) == 5


def test_cost_per_token_needs_ppo_lag_or_multi_lag_and_a_moderation_export(tmp_path):
    from jaxalign import config as config_lib
    from jaxalign.rl import algorithms
    from jaxalign.rl.settings import RLSettings
    from jaxalign.stages import rl as rl_stage

    config = config_lib.load_config("configs/ppo_lag_tiny.py", ["--config.rl.ppo_lag.cost_per_token=True"])
    settings = RLSettings.from_group(config.rl)
    algorithm = algorithms.make("ppo_lag", True, algorithms.settings_from_group("ppo_lag", config.rl))
    with pytest.raises(ValueError, match=r"cost_per_token needs config.rl.cost_model_path to be a moderation export"):
        rl_stage.role_paths(config, algorithm, settings)
    for stage in ("ppo", "safe_grpo", "ppo_reward_shaping"):  # only ppo_lag and multi_lag have the field
        with pytest.raises(config_lib.ConfigError, match=f"unknown key (.cost_per_token. in rl.{stage}|.{stage}.)"):
            config_lib.load_config("configs/ppo_lag_tiny.py", [f"--config.rl.{stage}.cost_per_token=True"])
